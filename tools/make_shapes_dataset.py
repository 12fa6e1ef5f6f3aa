#!/usr/bin/env python
"""Write the built-in shapes dataset (COCO format) to disk, or check that it is there.

  python tools/make_shapes_dataset.py [--root DIR] [--num-train N --num-val N --seed S] [--force]

Default root: $DETECTRON2_DATASETS/convmae_shapes (./datasets/convmae_shapes). tools/train_net.py
writes it on first use too; this command is for pretraining on its images or for custom sizes.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convmae_det.data import ShapesSpec, generate_shapes_dataset, shapes_root  # noqa: E402


def main(argv=None):
    defaults = ShapesSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None)
    for key in ("num_train", "num_val", "image_size", "min_objects", "max_objects", "min_size", "max_size", "seed"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=defaults[key])
    p.add_argument("--force", action="store_true", help="rewrite even if an identical dataset is there")
    args = p.parse_args(argv)
    spec = ShapesSpec(**{k: getattr(args, k) for k in ("num_train", "num_val", "image_size", "min_objects",
                                                        "max_objects", "min_size", "max_size", "seed")})
    paths = generate_shapes_dataset(args.root or shapes_root(), spec, force=args.force)
    print(f"shapes dataset ready under {paths['root']} (train: {paths['train']}, val: {paths['val']})")


if __name__ == "__main__":
    main()
