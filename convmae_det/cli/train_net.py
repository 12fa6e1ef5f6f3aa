"""Train and evaluate Mask R-CNN with a ConvMAE backbone (box and mask AP with COCOEvaluator).

  convmae-train --config-file configs/COCO/mask_rcnn_convmae_base_25ep.yaml --num-gpus 8
  convmae-train --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
  convmae-train --config-file CONFIG --resume          # continue from last_checkpoint
  convmae-train --config-file CONFIG --overwrite       # start over in an OUTPUT_DIR that holds a run
(from a clone: python tools/train_net.py ...). Trailing KEY VALUE pairs override the config;
a LazyConfig (CONFIG.py) takes key=value overrides.
A --config-file that is not a file is looked up among the packaged configs by name
(COCO/mask_rcnn_convmae_base_25ep.yaml, or with a leading configs/).
"""
import os
import sys

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, launch

import convmae_det  # noqa: F401  (registers backbones, heads, datasets)
from convmae_det.data import add_register_argument, register_coco_datasets
from convmae_det.engine import Trainer, setup_cfg, visualize_predictions
from convmae_det.engine.lazy import is_lazy_config, main_lazy
from convmae_det.engine import add_safety_arguments, exit_on_user_error, load_eval_weights, prepare_output_dir
from convmae_det.model_zoo import resolve_config_file
from convmae_det.utils.logger import setup_logging

__all__ = ["main", "cli"]


@exit_on_user_error
def main(args):
    try:
        if args.config_file:
            args.config_file = resolve_config_file(args.config_file)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    if is_lazy_config(args.config_file):
        return main_lazy(args)  # a LazyConfig (.py): ViTDet's train.*/dataloader.* conventions
    try:
        register_coco_datasets(args.register)  # --register NAME JSON IMAGE_ROOT
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    cfg = setup_cfg(args.config_file, args.opts)
    prepare_output_dir(cfg.OUTPUT_DIR, resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only)
    default_setup(cfg, args)
    setup_logging(cfg.OUTPUT_DIR, comm.get_rank())
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
        visualize_predictions(
            cfg, model, cfg.DATASETS.TEST[0], cfg.TEST.VIS_NUM_IMAGES,
            os.path.join(cfg.OUTPUT_DIR, "vis"), cfg.TEST.VIS_SCORE_THRESH,
        )
    return res


def cli(argv=None):
    """The command: parse ``argv`` (default sys.argv[1:]) and run :func:`main` in each process."""
    parser = default_argument_parser()
    add_register_argument(parser)
    add_safety_arguments(parser)
    args = parser.parse_args(argv)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    sys.exit(cli())
