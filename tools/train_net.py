#!/usr/bin/env python
"""Train and evaluate Mask R-CNN with a ConvMAE backbone (box and mask AP with COCOEvaluator).

  python tools/train_net.py --config-file configs/COCO/mask_rcnn_convmae_base_25ep.yaml --num-gpus 8
  python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
  python tools/train_net.py --config-file CONFIG --resume          # continue from last_checkpoint
  python tools/train_net.py --config-file CONFIG --overwrite       # start over in an OUTPUT_DIR that holds a run
Trailing KEY VALUE pairs override the config.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402

import convmae_det  # noqa: E402,F401  (registers backbones, heads, datasets)
from convmae_det.data import add_register_argument, register_coco_datasets  # noqa: E402
from convmae_det.engine import Trainer, setup_cfg, visualize_predictions  # noqa: E402
from convmae_det.engine import add_safety_arguments, exit_on_user_error, load_eval_weights, prepare_output_dir  # noqa: E402


@exit_on_user_error
def main(args):
    try:
        register_coco_datasets(args.register)  # --register NAME JSON IMAGE_ROOT
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    cfg = setup_cfg(args.config_file, args.opts)
    prepare_output_dir(cfg.OUTPUT_DIR, resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only)
    default_setup(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_eval_weights(cfg, model, resume=args.resume, allow_pickle=args.allow_pickle)
        res = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg, allow_pickle=args.allow_pickle)
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
    add_safety_arguments(parser)
    args = parser.parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
