"""Probe what pretraining learned: frozen-encoder box classification (convmae_det.pretrain.probe).

  convmae-probe output/pretrain/checkpoint-*.pth --data datasets/convmae_shapes --out output/probe
  (from a clone: python tools/probe.py ...)

Each CHECKPOINT is a checkpoint of convmae-pretrain (its "args" give the model). The random
initialisation of the first checkpoint's run (its --seed) is probed as step 0 unless
--no-random. Prints a table of step, linear-probe and kNN accuracy; with --out, writes
OUT/probe.jsonl and OUT/probe.png (accuracy against pretraining step), the files that
convmae-pretrain --probe-every writes during a run.
"""
import argparse
import json
import os
import sys

import torch

from convmae_det.checkpoint import CheckpointError, load_checkpoint_file
from convmae_det.pretrain import convmae_pretrain
from convmae_det.pretrain.probe import load_shapes_probe, plot_probe, run_probe
from convmae_det.utils.argtypes import positive_int
from convmae_det.utils.fileio import atomic_write

__all__ = ["main", "model_from_args"]


def model_from_args(args: dict) -> torch.nn.Module:
    """The pretraining model of a convmae-pretrain run's options, at its initialisation (seed)."""
    torch.manual_seed(args.get("seed", 0))  # the run's initial weights (engine.build_run)
    return convmae_pretrain(
        args["size"], img_size=args["img_size"], decoder_embed_dim=args["decoder_dim"], decoder_depth=args["decoder_depth"],
        decoder_num_heads=args["decoder_heads"], norm_pix_loss=not args.get("no_norm_pix_loss", False),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoints of convmae-pretrain (checkpoint-STEP.pth)")
    p.add_argument("--data", required=True, metavar="ROOT", help="a dataset in the built-in shapes layout")
    p.add_argument("--images", type=positive_int, default=300, help="training and validation images the probe reads")
    p.add_argument("--no-random", action="store_true", help="do not probe the random initialisation (step 0)")
    p.add_argument("--out", default=None, help="folder for probe.jsonl and probe.png")
    args = p.parse_args(argv)
    try:
        ckpts = [(path, load_checkpoint_file(path)) for path in args.checkpoints]
        for path, ckpt in ckpts:
            if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
                raise CheckpointError(f"{path} is not a checkpoint of convmae-pretrain (it needs 'model' and 'args')")
    except CheckpointError as e:
        p.exit(2, f"convmae-probe: error: {e}\n")
    train, test = load_shapes_probe(args.data, args.images)
    rows = []
    if not args.no_random:
        rows.append({"step": 0, "checkpoint": "random initialisation", **run_probe(model_from_args(ckpts[0][1]["args"]), train, test)})
    for path, ckpt in ckpts:
        model = model_from_args(ckpt["args"])
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            p.exit(2, f"convmae-probe: error: {path} does not fit its own args: {str(e).splitlines()[0]}\n")
        rows.append({"step": int(ckpt.get("step", 0)), "checkpoint": path, **run_probe(model, train, test)})
        print(f"{rows[-1]['step']:>7}  linear {rows[-1]['linear']:6.2f}  knn {rows[-1]['knn']:6.2f}  {path}", file=sys.stderr)
    rows.sort(key=lambda r: r["step"])
    print(f"| step | linear probe (%) | kNN (%) | checkpoint |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['linear']:.2f} | {r['knn']:.2f} | {r['checkpoint']} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with atomic_write(os.path.join(args.out, "probe.jsonl")) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        plot_probe(rows, os.path.join(args.out, "probe.png"), title=f"frozen-encoder probe ({args.images} + {args.images} images)",
                   chance=100.0 / train.num_classes)
    return rows


if __name__ == "__main__":
    sys.exit(main())
