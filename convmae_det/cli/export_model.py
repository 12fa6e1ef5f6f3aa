"""Export a trained model to TorchScript or ONNX and check it against the Python model.

  convmae-export --config-file CONFIG --format torchscript|onnx --output DIR \
      [--verify N] [--atol 1e-3] [--register NAME JSON IMAGE_ROOT] MODEL.WEIGHTS W [KEY VALUE ...]
  (from a clone: python tools/export_model.py ...)

Traces the model (detectron2's TracingAdapter) on the first image of DATASETS.TEST[0] and writes
DIR/model.ts or DIR/model.onnx with DIR/export.json. Then runs the exported file (TorchScript,
or onnxruntime) and the Python model on the first N images of that dataset (0: all) and prints
the largest differences of boxes, scores, classes and masks; exits with status 1 if one exceeds
--atol. The log goes to the console and DIR/log.txt. What the exported graph takes and
returns: convmae_det/export.py.
"""
import argparse
import logging
import sys

from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model

import convmae_det  # noqa: F401
from convmae_det.checkpoint import SafeCheckpointer
from convmae_det.data import add_register_argument, prepare_builtin_datasets, register_coco_datasets
from convmae_det.engine import setup_cfg
from convmae_det.export import (
    FORMATS,
    ExportedModel,
    build_traceable_model,
    compare_predictions,
    export_model,
    worst_differences,
)
from convmae_det.utils.logger import setup_logging

__all__ = ["main"]

logger = logging.getLogger("convmae_det")
DIFFS = ("boxes", "scores", "mask_probs", "mask_pixels")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--output", required=True, help="folder for the exported model")
    p.add_argument("--verify", type=int, default=8, metavar="N", help="images to compare on (0: all; default 8)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest accepted difference (default 1e-3)")
    add_register_argument(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    setup_logging(args.output)
    try:
        register_coco_datasets(args.register)
        cfg = setup_cfg(args.config_file, args.opts)
        if not cfg.DATASETS.TEST:
            raise ValueError("DATASETS.TEST is empty: the sample image and the check come from its first dataset")
        traceable = build_traceable_model(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    prepare_builtin_datasets(cfg.DATASETS.TEST[:1])
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    dicts = dicts[: args.verify] if args.verify > 0 else dicts
    mapper = DatasetMapper(cfg, is_train=False)
    inputs = [mapper(dict(d)) for d in dicts]

    path = export_model(traceable, inputs[0], args.format, args.output)
    logger.info(f"wrote {path} (traced with MODEL.CONVMAE.IMPL eager on {tuple(inputs[0]['image'].shape)} "
                f"{inputs[0]['image'].dtype} input)")

    model = build_model(cfg)  # the Python model as configured
    SafeCheckpointer(model, complete=True).load(cfg.MODEL.WEIGHTS)
    model.eval()
    exported = ExportedModel(args.output)
    worst = worst_differences([compare_predictions(model, exported, x, args.atol) for x in inputs])
    print(f"{args.format} vs Python model (MODEL.CONVMAE.IMPL {cfg.MODEL.CONVMAE.IMPL}) on {int(worst['images'])} "
          f"images of {cfg.DATASETS.TEST[0]}, {int(worst['detections'])} detections "
          f"({int(worst['unpaired'])} unpaired at the score cut-off): largest differences "
          + ", ".join(f"{k} {worst[k]:.3g}" for k in DIFFS if k in worst))
    if "mismatch" in worst:
        print(f"detections differ: {worst['mismatch']}")
    bad = [k for k in DIFFS if worst.get(k, 0.0) > args.atol]
    if bad:
        print(f"FAILED: {', '.join(bad)} beyond --atol {args.atol}")
        return 1
    print(f"OK: every difference within --atol {args.atol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
