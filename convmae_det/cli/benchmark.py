"""Speed and memory of the fast path against the official code's eager computation.

One process, one run: every row is timed (median of --repeats runs after --warmup) and its
peak memory recorded, for the fast model and the eager one (the reference model of the
official computation: MODEL.CONVMAE.IMPL eager, or the reference ConvMAE, loaded with the fast
model's weights), fp32 and (GPU) bf16 autocast, with and without activation checkpointing. The
variants of a row (fast, eager, checkpointed) are timed in turn, one run of each per round, so
that the ratios between them do not depend on when in the run the machine was busy:

  backbone fwd / fwd+bwd   ConvMAE-Base encoder + simple feature pyramid (COCO config)
  maskrcnn train iter      the whole Mask R-CNN: forward, backward, AdamW step (data on device)
  pretrain step            ConvMAE-Base MAE at 224, mask ratio 0.75: sparse (fast) vs the dense
                           conv stages with explicit attention (eager); complementary masking

On the CPU (2 cores here) the run is trimmed to fit 10 minutes: activation checkpointing only
for the fast backbone, no checkpointed pretraining row, and no Mask R-CNN rows unless asked for
with --rows (an iteration of the COCO heads takes about a minute on 2 cores).

Prints a table, the checks the project promises (output equality, speed-up, checkpointing's
memory cut, pretraining FLOPs), and writes everything as JSON (the log beside it: cpu.log for
cpu.json). Among the checks, the number of
ATen ops (views excluded) one backbone fwd+bwd dispatches per path: on a GPU each is about a
kernel launch, and a path whose kernels are short is bound by their launches.

  convmae-benchmark --device cpu          # 512x512, batch 1 (fits 10 minutes on 2 cores)
  convmae-benchmark --device cuda         # 1024x1024, batch 2, plus the card's bf16 matmul peak
  (from a clone: python tools/benchmark.py ...)

FLOPs are counted by fvcore on the eager model (fvcore sees explicit matmuls, not fused
kernels; the sparse pretraining step on the fast model, each F.scaled_dot_product_attention
counted as the two matmuls it replaces) and are reported as GMACs per image for the forward
pass (fvcore's unit); achieved TFLOP/s counts 2 FLOPs per MAC and a backward pass as twice the
forward. Peak memory comes from one
more run after the timed ones: on the GPU torch.cuda.max_memory_allocated less what the other
variants' models hold; on the CPU the peak bytes of the tensors that run creates plus the weights.

--compile adds the backbone's fwd+bwd rows with torch.compile'd blocks (MODEL.CONVMAE.COMPILE),
in the last dtype only; the compile time is printed among the checks.

The measuring lives in convmae_det.utils.profiling, the rows and checks in
convmae_det.utils.benchmark_rows; this script parses the flags.
"""
import argparse
import os
import sys

import torch

from convmae_det.utils.benchmark_rows import run
from convmae_det.utils.logger import setup_logging

__all__ = ["main", "parse_args"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--img-size", type=int, default=None, help="backbone and Mask R-CNN input (default 1024 GPU, 512 CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per backbone / Mask R-CNN row (default 2 GPU, 1 CPU)")
    p.add_argument("--pretrain-batch", type=int, default=None, help="images per pretraining step (default 128 GPU, 4 CPU)")
    p.add_argument("--pretrain-img-size", type=int, default=224, help="pretraining image size (multiple of 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 10 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per row (default 3 GPU, 1 CPU)")
    p.add_argument("--size", default="base", choices=["tiny", "small", "base", "large"], help="encoder size (Base is the target)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add backbone rows with torch.compile'd blocks (default: on GPU only; compiling Base takes minutes on a small CPU)")
    p.add_argument("--rows", default=None,
                   help="comma-separated subset of backbone,maskrcnn,pretrain (default: all on GPU, backbone,pretrain on CPU)")
    p.add_argument("--dtypes", default=None, help="comma-separated fp32,bf16 (default: both on GPU, fp32 on CPU)")
    p.add_argument("--output", default=None, help="JSON file (default output/benchmark/<device>.json)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the detection config")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    for name, g, c in (("img_size", 1024, 512), ("batch", 2, 1), ("pretrain_batch", 128, 4), ("repeats", 10, 5), ("warmup", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, g if gpu else c)
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats {args.repeats} --warmup {args.warmup}: need at least one timed run and no negative warm-up")
    if args.img_size % 32:
        p.error(f"--img-size {args.img_size}: must be a multiple of 32 (the stride-32 pyramid level)")
    if args.pretrain_img_size % 16:
        p.error(f"--pretrain-img-size {args.pretrain_img_size}: must be a multiple of 16 (the patch size)")
    if args.compile is None:
        args.compile = gpu
    args.rows = args.rows or ("backbone,maskrcnn,pretrain" if gpu else "backbone,pretrain")
    unknown = set(args.rows.split(",")) - {"backbone", "maskrcnn", "pretrain"}
    if unknown:
        p.error(f"--rows: unknown {sorted(unknown)}")
    args.output = args.output or os.path.join("output", "benchmark", f"{args.device}.json")
    return args


def main(argv=None):
    args = parse_args(argv)
    setup_logging(os.path.splitext(args.output)[0] + ".log")  # beside the JSON
    run(args)


if __name__ == "__main__":
    sys.exit(main())
