"""ConvMAE pretraining on any folder of images (recursive, no labels).

  convmae-pretrain --data /path/to/images --output output/pretrain --size base \
      --epochs 1600 --batch-size 128 --effective-batch 4096
  torchrun --nproc_per_node 8 -m convmae_det.cli.pretrain ...        # DDP on one machine
  torchrun --nnodes 3 --node_rank R --master_addr HOST --nproc_per_node 8 -m convmae_det.cli.pretrain ...
  convmae-pretrain ... --resume                                       # continue output/checkpoint.pth
  convmae-pretrain ... --overwrite                                    # start over in an OUTPUT that holds a run
(from a clone: python tools/pretrain.py ..., torchrun ... tools/pretrain.py ...)

Recipe (reference section 2): RandomResizedCrop(224, 0.2-1.0) + flip, block-wise masking at
ratio 0.75, AdamW (betas 0.9/0.95, weight decay 0.05, none on biases and norms),
lr = blr * effective_batch / 256 with blr 1.5e-4, linear warm-up then cosine decay per step.
The effective batch is batch-size x GPUs x accumulation steps.

Every --checkpoint-every steps (and at the end) OUTPUT/checkpoint-STEP.pth is written and
OUTPUT/checkpoint.pth (what --resume reads) replaced by it, atomically (official key names under
"model"; convert either with convmae-convert); the newest --keep-last numbered ones are kept.
OUTPUT/vis/step_XXXXXX.png shows original / masked / reconstruction rows. With --probe-every N
the frozen encoder is probed (object class from box features) every N steps: OUTPUT/probe.jsonl
and OUTPUT/probe.png (accuracy against step). Progress goes to the
console and OUTPUT/log.txt, the loss of every step to OUTPUT/log.jsonl and TensorBoard (OUTPUT/tb).
The run itself (model, data, steps, checkpoints) is convmae_det.pretrain.engine.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from timm.utils import init_distributed_device

from convmae_det.pretrain import engine
from convmae_det.utils.argtypes import fraction, nonnegative_float, nonnegative_int, open_fraction, positive_float, positive_int
from convmae_det.utils.logger import setup_logging

__all__ = ["main", "get_args", "setup_distributed"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of images (searched recursively)")
    p.add_argument("--output", required=True)
    p.add_argument("--size", default="base", choices=["tiny", "small", "base", "large"])
    p.add_argument("--img-size", type=positive_int, default=224)
    p.add_argument("--mask-ratio", type=open_fraction, default=0.75)
    for part, default in (("dim", 512), ("depth", 8), ("heads", 16)):
        p.add_argument(f"--decoder-{part}", type=positive_int, default=default)
    p.add_argument("--no-norm-pix-loss", action="store_true", help="regress raw pixels instead of per-patch normalised ones")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=positive_float, default=None)
    g.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: from --epochs, else 1000)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per GPU (or CPU process) per forward")
    p.add_argument("--effective-batch", type=positive_int, default=None, help="target batch per optimizer step (sets accumulation)")
    p.add_argument("--accum-iter", type=positive_int, default=1)
    p.add_argument("--blr", type=positive_float, default=1.5e-4, help="base lr: lr = blr * effective batch / 256")
    p.add_argument("--lr", type=positive_float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=nonnegative_float, default=0.0)
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.05)
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=None)
    p.add_argument("--warmup-steps", type=nonnegative_int, default=None, help="default: 40 epochs' worth, at most 1/4 of the run")
    p.add_argument("--drop-path", type=fraction, default=0.0)
    p.add_argument("--num-workers", type=nonnegative_int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="autocast on GPU (auto: bf16 if supported)")
    p.add_argument("--act-checkpoint", action="store_true")
    p.add_argument("--complementary", type=nonnegative_int, default=0, metavar="K",
                   help="K > 1: K disjoint masks per image per step (mask ratio 1 - 1/K, FastConvMAE); "
                        "every patch is a target each step, at K times the per-image cost")
    p.add_argument("--dense-conv-stages", action="store_true", help="run the reference model, the official computation with dense stages 1-2 (same loss, slower)")
    p.add_argument("--checkpoint-every", type=positive_int, default=500)
    p.add_argument("--keep-last", type=nonnegative_int, default=2, metavar="N",
                   help="numbered checkpoints (checkpoint-STEP.pth) to keep, the newest; 0 keeps all (default 2)")
    p.add_argument("--divergence-factor", type=nonnegative_float, default=100.0, help="stop when a step's loss exceeds this many times the median of the last 100 (0: only non-finite losses stop)")
    p.add_argument("--stop-at", type=positive_int, default=None, help="checkpoint and exit after this step, keeping the schedule of --steps (time-limited jobs)")
    p.add_argument("--probe-every", type=nonnegative_int, default=0, metavar="N",
                   help="every N steps (and at step 0 and the end) classify the objects of --probe-data from the frozen "
                        "encoder's box features (convmae_det.pretrain.probe): OUTPUT/probe.jsonl and probe.png; 0: off")
    p.add_argument("--probe-data", default=None, metavar="ROOT",
                   help="a dataset in the built-in shapes layout (annotations/instances_{train,val}.json, train/, val/)")
    p.add_argument("--probe-images", type=positive_int, default=300, help="training and validation images the probe reads")
    p.add_argument("--log-every", type=positive_int, default=20)
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="a checkpoint, or OUTPUT/checkpoint.pth if none given")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an OUTPUT that holds one: its checkpoints, logs and TensorBoard events are removed")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = p.parse_args(argv)
    if args.probe_every and not args.probe_data:
        p.error("--probe-every needs --probe-data ROOT (e.g. datasets/convmae_shapes)")
    if args.keep_last < 0:
        p.error(f"--keep-last {args.keep_last}: must be >= 0 (0 keeps every numbered checkpoint)")
    return args


def setup_distributed(device_arg):
    """(device, rank, world size) from torchrun's or SLURM's environment (timm's
    init_distributed_device): with several processes it joins the process group (NCCL on
    CUDA, else gloo) and gives each its local GPU."""
    ns = argparse.Namespace(device=device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = init_distributed_device(ns)
    return device, ns.rank, ns.world_size


def main(argv=None):
    args = get_args(argv)
    device, rank, world = setup_distributed(args.device)
    removed = engine.prepare_output(args.output, resume=args.resume is not None, overwrite=args.overwrite, rank=rank)
    setup_logging(args.output, rank)  # after prepare_output, which may remove an earlier log.txt
    if removed:
        engine.logger.info(f"--overwrite: removed {', '.join(removed)} from {args.output}")
    run = engine.build_run(args, device, rank, world)  # sets args.accum_iter from --effective-batch, writes args.json
    engine.logger.info(f"{run.num_images} images, {world} process(es), batch {args.batch_size} x {world} x accum {run.accum} = {run.eff_batch}, "
                       f"{run.total} steps ({run.total / run.steps_per_epoch:.1f} epochs), warm-up {run.warmup}, lr {run.lr:.3g}")
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output, "tb"))
        log_file = open(os.path.join(args.output, "log.jsonl"), "a", buffering=1)  # line-buffered: no step lost
    t0, imgs_seen = time.time(), 0
    for step, loss, lr, images in engine.train(run):
        done, imgs_seen = step + 1, imgs_seen + images * world
        if rank == 0:
            log_file.write(json.dumps({"step": done, "loss": loss, "lr": lr}) + "\n")
        if rank == 0 and (done % args.log_every == 0 or done == run.total or step == run.start_step):
            elapsed = time.time() - t0
            ips = imgs_seen / max(elapsed, 1e-9)
            eta = datetime.timedelta(seconds=int((run.total - done) * elapsed / max(done - run.start_step, 1)))
            engine.logger.info(f"step {done}/{run.total} epoch {done / run.steps_per_epoch:.2f} loss {loss:.4f} lr {lr:.3e} {ips:.1f} img/s eta {eta}")
            for name, value in (("loss", loss), ("lr", lr), ("images_per_s", ips)):
                writer.add_scalar(f"train/{name}", value, done)
    if rank == 0:
        log_file.close()
        writer.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
