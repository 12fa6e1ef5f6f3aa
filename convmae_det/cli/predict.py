"""Draw a trained model's predictions on image files.

  convmae-predict --config-file CONFIG --weights output/demo/finetune/model_final.pth \
      --input a.jpg b.png --output predictions/ [--score-thresh 0.5] [KEY VALUE ...]
  (from a clone: python tools/predict.py ...)

Writes one PNG per input (same stem) with boxes, masks and class names drawn by detectron2's
Visualizer, and OUTPUT/log.txt. Class names come from the first dataset in DATASETS.TEST.
"""
import argparse
import logging
import os
import sys

from PIL import Image
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor

import convmae_det  # noqa: F401
from convmae_det.engine import setup_cfg
from convmae_det.utils.logger import setup_logging
from convmae_det.utils.visualize import draw_predictions

__all__ = ["main"]

logger = logging.getLogger("convmae_det")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="checkpoint written by convmae-train")
    p.add_argument("--input", nargs="+", required=True, help="image files")
    p.add_argument("--output", required=True, help="folder for the drawn PNGs")
    p.add_argument("--score-thresh", type=float, default=0.5)
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
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
    for path in args.input:
        img = read_image(path, format=cfg.INPUT.FORMAT)
        # the ROI heads already dropped the detections under SCORE_THRESH_TEST (= --score-thresh)
        instances = predictor(img)["instances"]
        rgb = img if cfg.INPUT.FORMAT == "RGB" else img[:, :, ::-1]
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        Image.fromarray(draw_predictions(rgb, instances, metadata)).save(out)
        logger.info(f"{path}: {len(instances)} instances -> {out}")


if __name__ == "__main__":
    sys.exit(main())
