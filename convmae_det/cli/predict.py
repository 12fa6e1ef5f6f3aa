"""Draw a trained model's predictions on image files.

  convmae-predict --config-file CONFIG --weights output/demo/finetune/model_final.pth \
      --input a.jpg b.png --output predictions/ [--score-thresh 0.5] [KEY VALUE ...]
  (from a clone: python tools/predict.py ...)

Writes one PNG per input (same stem) with boxes, masks and class names (a semantic
segmentation config: per-pixel classes) drawn by detectron2's Visualizer, and OUTPUT/log.txt. Class names come from the first dataset in DATASETS.TEST. The
weights must fit the whole model and are read without running code from them (--allow-pickle
to trust them); an input that is not a readable image is reported and skipped (exit status 1
at the end).
"""
import argparse
import logging
import os
import sys

from detectron2.data import MetadataCatalog

import convmae_det  # noqa: F401
from convmae_det.engine import add_safety_arguments, build_predictor, exit_on_user_error, predict_images, setup_cfg
from convmae_det.utils.argtypes import fraction
from convmae_det.utils.logger import setup_logging

__all__ = ["main"]

logger = logging.getLogger("convmae_det")


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="checkpoint written by convmae-train")
    p.add_argument("--input", nargs="+", required=True, help="image files")
    p.add_argument("--output", required=True, help="folder for the drawn PNGs")
    p.add_argument("--score-thresh", type=fraction, default=0.5)
    add_safety_arguments(p, overwrite=False)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if not os.path.isfile(args.weights):
        raise SystemExit(f"--weights {args.weights!r} does not exist")
    missing = [f for f in args.input if not os.path.isfile(f)]
    if missing:
        raise SystemExit(f"input images not found: {missing}")
    setup_logging(args.output)
    cfg = setup_cfg(args.config_file, args.opts + ["MODEL.WEIGHTS", args.weights], freeze=False)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.score_thresh
    cfg.freeze()
    predictor = build_predictor(cfg, allow_pickle=args.allow_pickle)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
    failed = predict_images(predictor, args.input, args.output, metadata)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(args.input)} inputs are not readable images: {failed}")


if __name__ == "__main__":
    sys.exit(main())
