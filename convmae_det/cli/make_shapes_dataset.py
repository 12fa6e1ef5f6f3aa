"""Write the built-in shapes dataset (COCO format) to disk, or check that it is there.

  convmae-make-shapes [--root DIR] [--num-train N --num-val N --seed S] [--force]
      [--pool N] [--labeled N ...]
  (from a clone: python tools/make_shapes_dataset.py ...)

--pool N also writes N unlabeled images to ROOT/pool (for convmae-pretrain --data ROOT/pool);
--labeled N writes the labeled subset of the first N training images, the dataset
convmae_shapes_train_N of convmae-train.

Default root: $DETECTRON2_DATASETS/convmae_shapes (./datasets/convmae_shapes). convmae-train
writes it on first use too; this command is for pretraining on its images or for custom sizes.
"""
import argparse
import logging
import sys

from convmae_det.data import (
    ShapesSpec,
    generate_shapes_dataset,
    generate_shapes_pool,
    shapes_root,
    write_labeled_subset,
)
from convmae_det.utils.logger import setup_logging

__all__ = ["main"]

logger = logging.getLogger("convmae_det")


def main(argv=None):
    defaults = ShapesSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None)
    for key in ("num_train", "num_val", "image_size", "min_objects", "max_objects", "min_size", "max_size", "seed"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=defaults[key])
    p.add_argument("--force", action="store_true", help="rewrite even if an identical dataset is there")
    p.add_argument("--pool", type=int, default=0, help="unlabeled images to write to ROOT/pool (0: none)")
    p.add_argument("--labeled", type=int, nargs="*", default=[], help="sizes of labeled training subsets to write")
    args = p.parse_args(argv)
    setup_logging()
    spec = ShapesSpec(**{k: getattr(args, k) for k in ("num_train", "num_val", "image_size", "min_objects",
                                                        "max_objects", "min_size", "max_size", "seed")})
    paths = generate_shapes_dataset(args.root or shapes_root(), spec, force=args.force)
    logger.info(f"shapes dataset ready under {paths['root']} (train: {paths['train']}, val: {paths['val']})")
    for n in args.labeled:
        logger.info(f"labeled subset convmae_shapes_train_{n}: {write_labeled_subset(paths['root'], n)}")
    if args.pool:
        logger.info(f"unlabeled pool of {args.pool} images: {generate_shapes_pool(paths['root'], args.pool, spec, force=args.force)}")


if __name__ == "__main__":
    sys.exit(main())
