#!/usr/bin/env python
"""Train and evaluate Mask R-CNN with a ConvMAE backbone (box and mask AP with COCOEvaluator).

  python tools/train_net.py --config-file configs/COCO/mask_rcnn_convmae_base_25ep.yaml --num-gpus 8
  python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
  python tools/train_net.py --config-file CONFIG --resume          # continue from last_checkpoint
Trailing KEY VALUE pairs override the config; a LazyConfig (CONFIG.py) takes key=value overrides.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402

import convmae_det  # noqa: E402,F401  (registers backbones, heads, datasets)
from convmae_det.data import add_register_argument, register_coco_datasets  # noqa: E402
from convmae_det.engine import Trainer, setup_cfg, visualize_predictions  # noqa: E402
from convmae_det.engine.lazy import is_lazy_config, main_lazy  # noqa: E402
from convmae_det.engine.trainer import check_weights_fit  # noqa: E402


def main(args):
    if is_lazy_config(args.config_file):
        return main_lazy(args)
    try:
        register_coco_datasets(args.register)  # --register NAME JSON IMAGE_ROOT
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        check_weights_fit(model, cfg.MODEL.WEIGHTS)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        res = trainer.train()
        model = trainer.model
    if cfg.TEST.VIS_NUM_IMAGES > 0 and comm.is_main_process() and cfg.DATASETS.TEST:
        model = getattr(model, "module", model)
        paths = visualize_predictions(
            cfg, model, cfg.DATASETS.TEST[0], cfg.TEST.VIS_NUM_IMAGES,
            os.path.join(cfg.OUTPUT_DIR, "vis"), cfg.TEST.VIS_SCORE_THRESH,
        )
        print(f"wrote {len(paths)} prediction images to {os.path.join(cfg.OUTPUT_DIR, 'vis')}")
    return res


if __name__ == "__main__":
    parser = default_argument_parser()
    add_register_argument(parser)
    args = parser.parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
