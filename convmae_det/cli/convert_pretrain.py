"""Convert a ConvMAE checkpoint into weights that MODEL.WEIGHTS loads.

  convmae-convert INPUT OUTPUT [--config CONFIG] [--allow-pickle] [KEY VALUE ...]
  (from a clone: python tools/convert_pretrain.py ...)

INPUT: an official ConvMAE pretraining checkpoint (full or encoder-only), a checkpoint of
convmae-pretrain, or an official ConvMAE detection checkpoint. The encoder size is read from
tensor shapes. Without --config the target is the config COCO/mask_rcnn_convmae_base_25ep.yaml
with the encoder size of the input; with --config (a file, or a config name as convmae-train
takes) a size mismatch is an error. Everything that
was not placed, and every model parameter the input does not provide, is listed. OUTPUT holds
tensors only ({"model": {...}}) and loads with torch.load(..., weights_only=True).
"""
import argparse
import logging
import os
import sys

from detectron2.modeling import build_model

import convmae_det  # noqa: F401
from convmae_det.checkpoint import (
    ENCODER_PREFIX,
    CheckpointError,
    convert_state_dict,
    detect_layout,
    infer_encoder_size,
    load_checkpoint_file,
    save_weights,
    unwrap_state_dict,
)
from convmae_det.engine import setup_cfg
from convmae_det.model_zoo import get_config_file, resolve_config_file
from convmae_det.modeling.backbone import global_attn_indexes
from convmae_det.utils.fileio import same_file
from convmae_det.utils.logger import setup_logging

__all__ = ["main", "build_target"]

logger = logging.getLogger("convmae_det")

DEFAULT_CONFIG = "COCO/mask_rcnn_convmae_base_25ep.yaml"  # a convmae_det.model_zoo name


def build_target(config, opts, size):
    """State dict of the target detectron2 model (built on the CPU)."""
    overrides = list(opts) + ["MODEL.DEVICE", "cpu"]
    if config is None:
        overrides += [
            "MODEL.CONVMAE.EMBED_DIMS", str(list(size["embed_dims"])),
            "MODEL.CONVMAE.DEPTHS", str(list(size["depths"])),
            "MODEL.CONVMAE.NUM_HEADS", str(max(1, size["embed_dims"][2] // 64)),
            "MODEL.CONVMAE.MLP_RATIO", str(size["mlp_ratio"]),
        ]
    cfg = setup_cfg(config or get_config_file(DEFAULT_CONFIG), overrides)
    if config is None:
        try:
            global_attn_indexes(cfg.MODEL.CONVMAE, size["depths"][2])
        except ValueError as e:
            raise CheckpointError(f"{e} of the input: give a --config whose GLOBAL_ATTN_INDEXES fit them") from None
    model = build_model(cfg)
    return {k: v for k, v in model.state_dict().items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--config", default=None, help="detectron2 config of the model to finetune")
    p.add_argument("--allow-pickle", action="store_true", help="trust the input: allow arbitrary unpickling")
    p.add_argument("opts", nargs="*", help="config overrides KEY VALUE ...")
    args = p.parse_intermixed_args(argv)
    setup_logging()
    if same_file(args.input, args.output):
        raise SystemExit("refusing to overwrite the input checkpoint: choose another OUTPUT")
    try:
        sd = unwrap_state_dict(load_checkpoint_file(args.input, args.allow_pickle))
        layout = detect_layout(sd)
        size = infer_encoder_size(sd, ENCODER_PREFIX if layout == "detection" else "")
        logger.info(f"input: {args.input} ({layout}, encoder dims {size['embed_dims']}, depths {size['depths']})")
        target = build_target(args.config and resolve_config_file(args.config), args.opts, size)
        want = infer_encoder_size(target, ENCODER_PREFIX)
        if (want["embed_dims"], want["depths"]) != (size["embed_dims"], size["depths"]):
            raise CheckpointError(
                f"model size mismatch: the checkpoint has dims {size['embed_dims']} depths {size['depths']}, "
                f"the config {args.config} builds dims {want['embed_dims']} depths {want['depths']}"
            )
        out, report = convert_state_dict(sd, target)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    save_weights(out, args.output)
    print(report.summary())
    logger.info(f"wrote {args.output} ({len(out)} tensors)")


if __name__ == "__main__":
    sys.exit(main())
