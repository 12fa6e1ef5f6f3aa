"""Exactness and speed of the fast COCOeval (TEST.FAST_COCO_EVAL) against pycocotools.

Makes a synthetic COCO-sized val set with detectron2-style results (default: 5000 images,
80 classes, about 100 detections an image with RLE masks), evaluates bbox and segm with
detectron2's COCOEvaluator twice in one process, with pycocotools' COCOeval and with the fast
one, prints the times of both (the whole evaluation, and COCOeval's part of it) and their
ratios, and fails unless all 12 COCO stats of each task agree within --tol (detectron2's
results dict, per-class AP included, within 100 * tol percent). MODEL_ZOO.md has the numbers.

  convmae-coco-eval-bench                        # the COCO-sized case (minutes on 2 cores)
  convmae-coco-eval-bench --images 200 --out output/coco_eval_bench.json
  (from a clone: python tools/coco_eval_bench.py ...)

The work is done by convmae_det.utils.coco_eval_bench; this script parses the flags.
"""
import argparse
import sys

from convmae_det.utils.coco_eval_bench import run
from convmae_det.utils.logger import setup_logging

__all__ = ["main"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--dets-per-image", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="largest allowed difference of a COCO stat (fraction)")
    p.add_argument("--fast", default="faster_coco_eval", help="the TEST.FAST_COCO_EVAL value to compare (default faster_coco_eval)")
    p.add_argument("--out", default="", help="also write the numbers as JSON here")
    a = p.parse_args(argv)
    setup_logging()
    run(a.images, a.classes, a.dets_per_image, a.seed, a.tol, a.fast, a.out)


if __name__ == "__main__":
    sys.exit(main())
