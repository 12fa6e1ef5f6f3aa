#!/usr/bin/env python
"""ConvMAE pretraining on any folder of images (recursive, no labels).

  python tools/pretrain.py --data /path/to/images --output output/pretrain --size base \
      --epochs 1600 --batch-size 128 --effective-batch 4096
  torchrun --nproc_per_node 8 tools/pretrain.py ...                   # DDP on one machine
  torchrun --nnodes 3 --node_rank R --master_addr HOST --nproc_per_node 8 tools/pretrain.py ...
  python tools/pretrain.py ... --resume                               # continue output/checkpoint.pth
  python tools/pretrain.py ... --overwrite                            # start over in an OUTPUT that holds a run

Recipe (reference section 2): RandomResizedCrop(224, 0.2-1.0) + flip, block-wise masking at
ratio 0.75, AdamW (betas 0.9/0.95, weight decay 0.05, none on biases and norms),
lr = blr * effective_batch / 256 with blr 1.5e-4, linear warm-up then cosine decay per step.
The effective batch is batch-size x GPUs x accumulation steps.

Every --checkpoint-every steps (and at the end) OUTPUT/checkpoint.pth is replaced atomically
(official key names under "model"; convert it with tools/convert_pretrain.py) and
OUTPUT/vis/step_XXXXXX.png shows original / masked / reconstruction rows.
"""
import argparse
import datetime
import json
import logging
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from convmae_det.pretrain import complementary_masks, convmae_pretrain, random_masking  # noqa: E402
from convmae_det.pretrain.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, ResumableSampler, list_images  # noqa: E402
from convmae_det.pretrain.engine import (  # noqa: E402
    build_param_groups,
    lr_at_step,
    mask_generator,
    reconstruction_grid,
    save_checkpoint,
)

logger = logging.getLogger("convmae_det.pretrain")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of images (searched recursively)")
    p.add_argument("--output", required=True)
    p.add_argument("--size", default="base", choices=["tiny", "small", "base", "large"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--decoder-heads", type=int, default=16)
    p.add_argument("--no-norm-pix-loss", action="store_true", help="regress raw pixels instead of per-patch normalised ones")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=None)
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs, else 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per GPU (or CPU process) per forward")
    p.add_argument("--effective-batch", type=int, default=None, help="target batch per optimizer step (sets accumulation)")
    p.add_argument("--accum-iter", type=int, default=1)
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 40 epochs' worth, at most 1/4 of the run")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="autocast on GPU (auto: bf16 if supported)")
    p.add_argument("--act-checkpoint", action="store_true")
    p.add_argument("--complementary", type=int, default=0, metavar="K",
                   help="K > 1: K disjoint masks per image per step (mask ratio 1 - 1/K, FastConvMAE); "
                        "every patch is a target each step, at K times the per-image cost")
    p.add_argument("--dense-conv-stages", action="store_true",
                   help="run stages 1-2 on the full grid as the official code does (same loss, more FLOPs)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--stop-at", type=int, default=None, help="checkpoint and exit after this step, keeping the schedule of --steps (time-limited jobs)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="a checkpoint, or OUTPUT/checkpoint.pth if none given")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an OUTPUT that holds one: its checkpoint, log and TensorBoard events are removed")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


def setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_arg or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return device, rank, world


RUN_FILES = ("checkpoint.pth", "log.jsonl", "tb")


def prepare_output(output: str, resume: bool, overwrite: bool, rank: int) -> None:
    """A new run refuses an OUTPUT holding an earlier run's files unless --overwrite removes them:
    appending a second run's log to the first one's would leave a log of two runs mixed."""
    if resume:
        return
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(output, f))]
    if not found:
        return
    if not overwrite:
        raise SystemExit(
            f"{output} holds an earlier run ({', '.join(found)}): pass --resume to continue it, "
            "--overwrite to start over in it, or another --output"
        )
    if rank == 0:
        for f in found:
            path = os.path.join(output, f)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        logger.info(f"--overwrite: removed {', '.join(found)} from {output}")


def trim_log(path: str, step: int) -> None:
    """Drop the log lines after the checkpoint's step (written before an interruption), so that
    the resumed run logs each step once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def main(argv=None):
    args = get_args(argv)
    device, rank, world = setup_distributed(args.device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(asctime)s pretrain] %(message)s")
    os.makedirs(args.output, exist_ok=True)
    prepare_output(args.output, resume=args.resume is not None, overwrite=args.overwrite, rank=rank)

    files = list_images(args.data)
    if args.effective_batch:
        per_step = args.batch_size * world
        if args.effective_batch % per_step:
            raise SystemExit(f"--effective-batch {args.effective_batch} is not a multiple of batch-size x processes = {per_step}")
        args.accum_iter = args.effective_batch // per_step
    eff_batch = args.batch_size * world * args.accum_iter
    steps_per_epoch = max(1, len(files) // eff_batch)
    total = args.steps or (round(args.epochs * steps_per_epoch) if args.epochs else 1000)
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
    elif args.warmup_epochs is not None:
        warmup = round(args.warmup_epochs * steps_per_epoch)
    else:
        warmup = min(40 * steps_per_epoch, total // 4)
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    logger.info(
        f"{len(files)} images, {world} process(es), batch {args.batch_size} x {world} x accum {args.accum_iter} = {eff_batch}, "
        f"{total} steps ({total / steps_per_epoch:.1f} epochs), warm-up {warmup}, lr {lr:.3g}"
    )

    torch.manual_seed(args.seed)  # same initial weights in every process and every run
    model = convmae_pretrain(
        args.size, img_size=args.img_size, decoder_embed_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_heads, norm_pix_loss=not args.no_norm_pix_loss,
        drop_path_rate=args.drop_path, use_act_checkpoint=args.act_checkpoint, sparse=not args.dense_conv_stages,
    ).to(device)
    optimizer = torch.optim.AdamW(build_param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    amp_dtype = None
    if device.type == "cuda" and args.amp != "off":
        amp_dtype = torch.float16 if args.amp == "fp16" or (args.amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    start_step = 0
    ckpt_path = os.path.join(args.output, "checkpoint.pth") if args.resume == "auto" else args.resume
    if ckpt_path:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"--resume: {ckpt_path} does not exist")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["step"])
        logger.info(f"resumed from {ckpt_path} at step {start_step}")
        if rank == 0:
            trim_log(os.path.join(args.output, "log.jsonl"), start_step)
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    transform = T.Compose([
        T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = ImageFolderDataset(args.data, transform, seed=args.seed, files=files)
    micro_per_step = args.accum_iter
    sampler = ResumableSampler(len(files), args.seed, start=start_step * micro_per_step * args.batch_size, rank=rank, num_replicas=world)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.num_workers > 0,
    )
    vis_dataset = ImageFolderDataset(args.data, T.Compose([
        T.Resize(args.img_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(args.img_size),
        T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]), files=files[:: max(1, len(files) // 8)][:8])
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.output, "tb"))
        with open(os.path.join(args.output, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    model.train()
    data_iter = iter(loader)
    t0, imgs_seen = time.time(), 0
    log_file = open(os.path.join(args.output, "log.jsonl"), "a") if rank == 0 else None
    for step in range(start_step, total):
        cur_lr = lr_at_step(step, total, warmup, lr, args.min_lr)
        for g in optimizer.param_groups:
            g["lr"] = cur_lr
        loss_sum = 0.0
        for micro in range(args.accum_iter):
            imgs = next(data_iter).to(device, non_blocking=True)
            gen = mask_generator(args.seed, step, micro, rank)
            torch.manual_seed(args.seed * 7_919 + step * 131 + micro)  # drop path, resumable
            grid = (args.img_size // 16, args.img_size // 16)
            if args.complementary > 1:
                views = complementary_masks(imgs.shape[0], grid, args.complementary, generator=gen)
                mask = views.reshape(-1, views.shape[-1]).to(device)  # view-major, as imgs.repeat below
                imgs = imgs.repeat(args.complementary, 1, 1, 1)
            else:
                mask = random_masking(imgs.shape[0], grid, args.mask_ratio, generator=gen).to(device)
            sync = micro == args.accum_iter - 1 or world == 1
            ctx = model.no_sync() if (world > 1 and not sync) else torch.enable_grad()
            with ctx, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, _, _ = model(imgs, mask=mask)
            if not math.isfinite(loss.item()):
                raise SystemExit(f"loss is {loss.item()} at step {step}: stopping (lower the lr or use --amp bf16)")
            scaler.scale(loss / args.accum_iter).backward()
            loss_sum += loss.item() / args.accum_iter
            imgs_seen += imgs.shape[0] // max(args.complementary, 1) * world
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if rank == 0 and (done % args.log_every == 0 or done == total or step == start_step):
            elapsed = time.time() - t0
            ips = imgs_seen / max(elapsed, 1e-9)
            eta = datetime.timedelta(seconds=int((total - done) * elapsed / max(done - start_step, 1)))
            logger.info(f"step {done}/{total} epoch {done / steps_per_epoch:.2f} loss {loss_sum:.4f} lr {cur_lr:.3e} {ips:.1f} img/s eta {eta}")
            writer.add_scalar("train/loss", loss_sum, done)
            writer.add_scalar("train/lr", cur_lr, done)
            writer.add_scalar("train/images_per_s", ips, done)
            log_file.write(json.dumps({"step": done, "loss": loss_sum, "lr": cur_lr}) + "\n")
            log_file.flush()
        elif rank == 0:
            log_file.write(json.dumps({"step": done, "loss": loss_sum, "lr": cur_lr}) + "\n")
        stop = args.stop_at is not None and done >= args.stop_at
        if rank == 0 and (done % args.checkpoint_every == 0 or done == total or stop):
            save_checkpoint(os.path.join(args.output, "checkpoint.pth"), raw_model, optimizer, scaler, done, vars(args))
            path = reconstruction_grid(raw_model, vis_dataset, args.mask_ratio, os.path.join(args.output, "vis", f"step_{done:06d}.png"), device)
            logger.info(f"saved {os.path.join(args.output, 'checkpoint.pth')} and {path}")
        if stop:
            logger.info(f"stopping after step {done} (--stop-at); continue with --resume")
            break
    if log_file:
        log_file.close()
    if writer:
        writer.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
