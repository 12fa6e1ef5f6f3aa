"""The ConvMAE pretraining run: everything of ``convmae-pretrain`` (convmae_det/cli/pretrain.py)
but its command line.

As upstream ConvMAE splits ``main_pretrain.py`` from ``engine_pretrain.py``, the tool keeps the
arguments, the process set-up and the logging, and calls:

- :func:`build_run`: model, optimizer (:func:`build_optimizer`), grad scaler, data loader
  (:func:`train_transform`) and schedule from the tool's options, resumed from a checkpoint
  when asked (:func:`resume`);
- :func:`train`: the steps, yielding (step, loss, lr, images) after each; it checkpoints
  (:func:`save_checkpoints`) and draws a :func:`reconstruction_grid` every ``checkpoint_every``
  steps, at the end and at ``stop_at``;
- :func:`train_step`: one optimizer step over the micro-batches of gradient accumulation;
- :func:`log_probe`: with ``probe_every``, the frozen-encoder probe (:mod:`.probe`) at step 0
  of a new run, every ``probe_every`` steps and at the end, into OUTPUT/probe.jsonl and
  OUTPUT/probe.png;
- :func:`prepare_output` and :func:`trim_log`: what an OUTPUT folder may hold.

A diverged run never replaces the checkpoint: a non-finite loss, a loss over
``divergence_factor`` times the median of the last 100 steps, or a non-finite parameter or
optimizer moment at a save stops the run with :class:`PretrainError`, naming the step and the
checkpoint that is kept (:func:`nonfinite_tensors`).

Resumable: a step's random draws depend only on (seed, step, micro-batch, rank): the masks come
from :func:`mask_generator`, drop path from the global seed set by :func:`step_seed`, the crops
from the sample's key (:class:`~.data.ImageFolderDataset`), so a resumed run repeats the loss
curve of an uninterrupted one. Errors a user fixes on the command line raise
:class:`PretrainError`, with a message naming the file or option.
"""
import argparse
import collections
import contextlib
import json
import logging
import math
import os
import re
import shutil
import statistics
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torchvision.transforms as T
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from ..modeling.masking import grid_of, patch_mean_std, patchify, unpatchify
from ..utils.fileio import atomic_link, atomic_write, remove_stale_temp_files
from . import convmae_pretrain
from .data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, ResumableSampler, list_images
from .probe import load_shapes_probe, plot_probe, read_probe_log, run_probe

__all__ = [
    "PretrainError",
    "Run",
    "build_run",
    "build_optimizer",
    "log_probe",
    "train",
    "train_step",
    "lr_at_step",
    "mask_generator",
    "step_seed",
    "train_transform",
    "vis_transform",
    "prepare_output",
    "trim_log",
    "resume",
    "save_checkpoint",
    "save_checkpoints",
    "numbered_checkpoints",
    "nonfinite_tensors",
    "reconstruction_grid",
]

logger = logging.getLogger("convmae_det.pretrain")
RUN_FILES = ("checkpoint.pth", "log.jsonl", "tb", "probe.jsonl", "probe.png")  # with checkpoint-STEP.pth: an earlier run's
NUMBERED = re.compile(r"checkpoint-(\d+)\.pth")
DIVERGENCE_FACTOR = 100.0  # default of --divergence-factor


class PretrainError(SystemExit):
    """An error the user fixes on the command line; a :class:`SystemExit`, so that the tool
    stops with its message rather than a traceback."""


def lr_at_step(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then half-cycle cosine from ``lr`` to ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mask_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """A generator whose masks depend only on (seed, step, micro-batch, rank): resumable."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + micro) * 1024 + rank)


def step_seed(seed: int, step: int, micro: int = 0) -> None:
    """Seed the global generator (drop path) from (seed, step, micro-batch): resumable."""
    torch.manual_seed(seed * 7_919 + step * 131 + micro)


def train_transform(img_size: int) -> T.Compose:
    """The recipe's augmentation: RandomResizedCrop(img_size, scale 0.2-1.0, bicubic) and flip."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def vis_transform(img_size: int) -> T.Compose:
    """Deterministic input of the reconstruction grids: bicubic resize, then a center crop."""
    return T.Compose([
        T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with betas 0.9/0.95 and no weight decay on biases and 1-D parameters (norms), as in
    MAE (timm's ``param_groups_weight_decay``); frozen parameters are left out."""
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr, betas=(0.9, 0.95))


def prepare_output(output: str, resume: bool, overwrite: bool, rank: int = 0) -> List[str]:
    """A new run refuses an OUTPUT holding an earlier run's files (checkpoints, log.jsonl, tb)
    unless ``overwrite`` removes them, and its text log: appending a second run's log to the first
    one's would mix two runs. Rank 0 removes all but the other ranks' text logs (log.txt.rankN),
    which each rank removes itself. Returns the names removed (call before the log is set up)."""
    if rank == 0:
        remove_stale_temp_files(output)  # temporary files of interrupted checkpoint writes
    if resume:
        return []
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(output, f))]
    found += [os.path.basename(p) for _, p in numbered_checkpoints(output)]
    if not found:
        return []
    if not overwrite:
        raise PretrainError(
            f"{output} holds an earlier run ({', '.join(found)}): pass --resume to continue it, "
            "--overwrite to start over in it, or another --output"
        )
    mine = found if rank == 0 else []
    mine += [f for f in ("log.txt" if rank == 0 else f"log.txt.rank{rank}",) if os.path.exists(os.path.join(output, f))]
    for f in mine:
        path = os.path.join(output, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return mine


def trim_log(path: str, step: int) -> None:
    """Drop the log lines after the checkpoint's step (written before an interruption), so that
    the resumed run logs each step once. A partial last line (the process was killed while
    writing it) is dropped; another line that is not JSON is a :class:`PretrainError` naming
    it. The file is replaced atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not line.endswith("\n"):
                logger.warning(f"{path}: dropping its partial last line (written when the run was interrupted)")
                continue
            raise PretrainError(f"--resume: {path} line {i + 1} is not JSON ({e}): fix or remove that line") from None
        if row.get("step", 0) <= step:
            keep.append(line)
    with atomic_write(path) as f:
        f.writelines(keep)


def save_checkpoint(path: str, model: nn.Module, optimizer, scaler, step: int, args: dict) -> None:
    """Write model (official key names), optimizer, scaler, step and the plain-valued ``args``
    to ``path`` atomically: a reader never sees half a checkpoint."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def numbered_checkpoints(output: str) -> List[Tuple[int, str]]:
    """(step, path) of the ``checkpoint-STEP.pth`` files in ``output``, by step."""
    if not os.path.isdir(output):
        return []
    found = ((NUMBERED.fullmatch(f), f) for f in os.listdir(output))
    return sorted((int(m.group(1)), os.path.join(output, f)) for m, f in found if m)


def save_checkpoints(output: str, model: nn.Module, optimizer, scaler, step: int, args: dict, keep_last: int = 0) -> str:
    """Write ``output/checkpoint-{step}.pth`` (:func:`save_checkpoint`), make
    ``output/checkpoint.pth`` (what ``--resume`` reads) the same file, both atomically, and
    delete the numbered checkpoints of earlier steps beyond the newest ``keep_last`` (0 keeps
    all). Only ``checkpoint-STEP.pth`` files of steps up to ``step`` are deleted: never
    checkpoint.pth, nor those of later steps (left by a run that was resumed from an earlier
    checkpoint; this run overwrites them when it gets there). Returns the numbered path."""
    numbered = os.path.join(output, f"checkpoint-{step}.pth")
    save_checkpoint(numbered, model, optimizer, scaler, step, args)
    atomic_link(numbered, os.path.join(output, "checkpoint.pth"))
    if keep_last:
        older = [p for s, p in numbered_checkpoints(output) if s <= step][:-keep_last]
        for p in older:
            os.remove(p)
        if older:
            logger.info(f"removed {', '.join(os.path.basename(p) for p in older)} (--keep-last {keep_last})")
    return numbered


def nonfinite_tensors(model: nn.Module, optimizer=None) -> List[str]:
    """Names of the parameters, and of the optimizer's state tensors, that hold NaN or infinity."""
    names = {id(p): n for n, p in model.named_parameters()}
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    for p, state in (optimizer.state.items() if optimizer is not None else ()):
        bad += [f"optimizer {k} of {names.get(id(p), '?')}" for k, v in state.items()
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    return bad


def _kept(path: str, step: Optional[int]) -> str:
    if step is None:
        return "No checkpoint was written: start again with a lower --lr or --blr"
    return f"{path} of step {step} is kept: resume from it (--resume) with a lower --lr or --blr"


def resume(path: str, model: nn.Module, optimizer=None, scaler=None) -> int:
    """Load a :func:`save_checkpoint` file into ``model`` (strict), ``optimizer`` and ``scaler``
    (those given); return its step. :class:`PretrainError` naming ``path`` if it does not exist,
    cannot be read or does not fit."""
    if not os.path.isfile(path):
        raise PretrainError(f"--resume: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: zip, pickle and type errors
        raise PretrainError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(ckpt["scaler"])
        return int(ckpt["step"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise PretrainError(f"--resume: {path} does not fit this run ({type(e).__name__}: {e})") from e


@dataclass
class Run:
    """What :func:`build_run` builds: the pieces of a run and its schedule."""

    opts: argparse.Namespace  # the tool's options
    model: nn.Module  # what the steps call: DistributedDataParallel around raw_model if world > 1
    raw_model: nn.Module  # the ConvMAE itself: checkpoints and reconstruction grids
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]  # autocast dtype, None = fp32
    loader: DataLoader  # endless: the sampler starts at the resumed step's position
    vis_dataset: ImageFolderDataset  # 8 images spread over the folder, center crops
    device: torch.device
    rank: int
    world: int
    num_images: int
    accum: int  # micro-batches per optimizer step
    eff_batch: int  # batch_size x world x accum
    steps_per_epoch: int
    total: int  # optimizer steps of the schedule
    warmup: int
    lr: float  # peak lr
    start_step: int  # 0, or the resumed checkpoint's step
    probe: Optional[tuple] = None  # rank 0 with --probe-every: (train, test) ProbeData


def build_run(opts, device: torch.device, rank: int = 0, world: int = 1) -> Run:
    """Everything a run needs, from the options of ``convmae-pretrain`` (its argparse namespace,
    or a dict of the same keys; see its ``--help``): the accumulation from ``effective_batch``
    (written back to ``run.opts.accum_iter``), the schedule in steps, the model
    (``convmae_pretrain``; the reference with ``dense_conv_stages``) with the same initial
    weights in every process, AdamW, AMP, the checkpoint of ``resume`` (``"auto"``:
    OUTPUT/checkpoint.pth; on rank 0 OUTPUT/log.jsonl is trimmed to its step) and a data loader
    that continues where the checkpoint stopped. Rank 0 records the options as run in
    OUTPUT/args.json. Call :func:`prepare_output` first."""
    opts = argparse.Namespace(**opts) if isinstance(opts, dict) else opts
    files = list_images(opts.data)
    if opts.effective_batch:
        per_step = opts.batch_size * world
        if opts.effective_batch % per_step:
            raise PretrainError(f"--effective-batch {opts.effective_batch} is not a multiple of batch-size x processes = {per_step}")
        opts.accum_iter = opts.effective_batch // per_step
    eff_batch = opts.batch_size * world * opts.accum_iter
    steps_per_epoch = max(1, len(files) // eff_batch)
    total = opts.steps or (round(opts.epochs * steps_per_epoch) if opts.epochs else 1000)
    if opts.warmup_steps is not None:
        warmup = opts.warmup_steps
    elif opts.warmup_epochs is not None:
        warmup = round(opts.warmup_epochs * steps_per_epoch)
    else:
        warmup = min(40 * steps_per_epoch, total // 4)
    lr = opts.lr if opts.lr is not None else opts.blr * eff_batch / 256

    torch.manual_seed(opts.seed)  # same initial weights in every process and every run
    model = convmae_pretrain(
        opts.size, reference=opts.dense_conv_stages, img_size=opts.img_size, decoder_embed_dim=opts.decoder_dim,
        decoder_depth=opts.decoder_depth, decoder_num_heads=opts.decoder_heads, norm_pix_loss=not opts.no_norm_pix_loss,
        drop_path_rate=opts.drop_path, use_act_checkpoint=opts.act_checkpoint,
    ).to(device)
    optimizer = build_optimizer(model, lr, opts.weight_decay)
    amp_dtype = None
    if device.type == "cuda" and opts.amp != "off":
        bf16 = opts.amp == "bf16" or (opts.amp == "auto" and torch.cuda.is_bf16_supported())
        amp_dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    start_step = 0
    ckpt_path = os.path.join(opts.output, "checkpoint.pth") if opts.resume == "auto" else opts.resume
    if ckpt_path:
        start_step = resume(ckpt_path, model, optimizer, scaler)
        logger.info(f"resumed from {ckpt_path} at step {start_step}")
        if rank == 0:
            trim_log(os.path.join(opts.output, "log.jsonl"), start_step)
            trim_log(os.path.join(opts.output, "probe.jsonl"), start_step)
    wrapped = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = ImageFolderDataset(opts.data, train_transform(opts.img_size), seed=opts.seed, files=files)
    start = start_step * opts.accum_iter * opts.batch_size
    sampler = ResumableSampler(len(files), opts.seed, start=start, rank=rank, num_replicas=world)
    loader = DataLoader(
        dataset, batch_size=opts.batch_size, sampler=sampler, num_workers=opts.num_workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=opts.num_workers > 0,
    )
    vis_dataset = ImageFolderDataset(opts.data, vis_transform(opts.img_size), files=files[:: max(1, len(files) // 8)][:8])
    probe = None
    if rank == 0 and getattr(opts, "probe_every", 0):
        probe = load_shapes_probe(opts.probe_data, opts.probe_images)
    if rank == 0:
        with atomic_write(os.path.join(opts.output, "args.json")) as f:
            json.dump(vars(opts), f, indent=1)
    return Run(opts, wrapped, model, optimizer, scaler, amp_dtype, loader, vis_dataset, device, rank, world,
               len(files), opts.accum_iter, eff_batch, steps_per_epoch, total, warmup, lr, start_step, probe)


def log_probe(run: Run, step: int) -> dict:
    """Run the probe (:mod:`.probe`) on the encoder as it is after ``step`` steps (0: the random
    initialisation), append {"step", "linear", "knn"} to OUTPUT/probe.jsonl and redraw
    OUTPUT/probe.png from the whole file. Returns the row."""
    row = {"step": step, **run_probe(run.raw_model, *run.probe)}
    path = os.path.join(run.opts.output, "probe.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    plot_probe(read_probe_log(path), os.path.join(run.opts.output, "probe.png"),
               title=f"frozen-encoder probe, {os.path.basename(os.path.abspath(run.opts.output))}",
               chance=100.0 / run.probe[0].num_classes)
    logger.info(f"probe after step {step}: linear {row['linear']:.2f}%, kNN {row['knn']:.2f}% (probe.jsonl, probe.png)")
    return row


def train_step(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    step: int,
    lr: float,
    accum: int = 1,
    seed: int = 0,
    rank: int = 0,
    mask_ratio: float = 0.75,
    complementary: int = 0,
    amp_dtype: Optional[torch.dtype] = None,
) -> Tuple[float, int]:
    """One optimizer step at ``lr`` over ``accum`` micro-batches taken from ``batches`` (B 3 H W
    on the model's device).

    Per micro-batch: :func:`step_seed`, then the model draws its own masks from
    :func:`mask_generator` (``complementary`` = K > 1: K disjoint masks per image, the model
    repeats the images K times), and ``loss / accum`` is backpropagated; under DDP the gradients
    are synchronised on the last micro-batch only. Returns (the micro-batches' mean loss, the
    number of images taken, before any repetition). :class:`PretrainError` on a non-finite loss.
    """
    for g in optimizer.param_groups:
        g["lr"] = lr
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    loss_sum, images = 0.0, 0
    for micro in range(accum):
        imgs = next(batches)
        gen = mask_generator(seed, step, micro, rank)
        step_seed(seed, step, micro)
        with model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext():
            with torch.autocast(imgs.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, _, _ = model(imgs, mask_ratio=mask_ratio, generator=gen, complementary=complementary)
            if not math.isfinite(loss.item()):
                raise PretrainError(f"training diverged at step {step + 1}: the loss is {loss.item()} (lower the lr or use --amp bf16)")
            scaler.scale(loss / accum).backward()
        loss_sum += loss.item() / accum
        images += imgs.shape[0]
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, images


def train(run: Run) -> Iterator[Tuple[int, float, float, int]]:
    """The steps of ``run`` from its start to ``total`` (or ``stop_at``), yielding (step, loss,
    lr, images of this process) after each. On rank 0, after the yield, every
    ``checkpoint_every`` steps, at the end and at ``stop_at``: OUTPUT/checkpoint-STEP.pth and
    OUTPUT/checkpoint.pth (:func:`save_checkpoints`, keeping ``keep_last``) and
    OUTPUT/vis/step_XXXXXX.png. A diverged step raises :class:`PretrainError` (see the module
    docstring) and leaves the checkpoints as they were."""
    o = run.opts
    run.model.train()
    batches = (b.to(run.device, non_blocking=True) for b in run.loader)
    ckpt = os.path.join(o.output, "checkpoint.pth")
    saved = run.start_step if run.start_step and os.path.isfile(ckpt) else None  # the step of the checkpoint on disk
    factor = getattr(o, "divergence_factor", DIVERGENCE_FACTOR)
    recent = collections.deque(maxlen=100)
    probe_every = getattr(o, "probe_every", 0) if run.probe is not None else 0
    if probe_every and run.start_step == 0:
        log_probe(run, 0)
    for step in range(run.start_step, run.total):
        lr = lr_at_step(step, run.total, run.warmup, run.lr, o.min_lr)
        try:
            loss, images = train_step(
                run.model, batches, run.optimizer, run.scaler, step=step, lr=lr, accum=run.accum, seed=o.seed,
                rank=run.rank, mask_ratio=o.mask_ratio, complementary=o.complementary, amp_dtype=run.amp_dtype,
            )
        except PretrainError as e:
            raise PretrainError(f"{e}. {_kept(ckpt, saved)}") from None
        yield step, loss, lr, images
        done = step + 1
        if factor and len(recent) >= 10 and loss > factor * statistics.median(recent):
            raise PretrainError(
                f"training diverged at step {done}: the loss {loss:.4g} is over {factor:g} times the median "
                f"{statistics.median(recent):.4g} of the last {len(recent)} steps (--divergence-factor). {_kept(ckpt, saved)}"
            )
        recent.append(loss)
        stop = o.stop_at is not None and done >= o.stop_at
        if run.rank == 0 and (done % o.checkpoint_every == 0 or done == run.total or stop):
            bad = nonfinite_tensors(run.raw_model, run.optimizer)
            if bad:
                raise PretrainError(
                    f"training diverged by step {done}: {bad[0]} holds NaN or infinity ({len(bad)} tensors); "
                    f"not saved. {_kept(ckpt, saved)}"
                )
            numbered = save_checkpoints(o.output, run.raw_model, run.optimizer, run.scaler, done, vars(o), o.keep_last)
            saved = done
            vis = os.path.join(o.output, "vis", f"step_{done:06d}.png")
            logger.info(f"saved {numbered} (and checkpoint.pth) and {reconstruction_grid(run.raw_model, run.vis_dataset, o.mask_ratio, vis, run.device)}")
        if probe_every and (done % probe_every == 0 or done == run.total):
            log_probe(run, done)
        if stop:
            logger.info(f"stopping after step {done} (--stop-at); continue with --resume")
            return


@torch.no_grad()
def reconstruction_grid(model: nn.Module, dataset, mask_ratio: float, path: str, device, seed: int = 0) -> str:
    """PNG with one column per image: original, masked input, reconstruction (visible patches
    pasted back); the model draws the masks (``seed``). Predictions of a norm_pix_loss model are
    de-normalised with each patch's own mean and std (:func:`patch_mean_std`), as in the MAE
    visualisation. Returns ``path``."""
    was_training = model.training
    model.eval()
    imgs = torch.stack([dataset[i] for i in range(len(dataset))]).to(device).float()
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(seed))
    target = patchify(imgs)
    if model.norm_pix_loss:
        mean, std = patch_mean_std(target)
        pred = pred * std + mean
    grid, m = grid_of(imgs), mask[..., None]
    masked = unpatchify(target * (1 - m), grid)
    recon = unpatchify(target * (1 - m) + pred * m, grid)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    # 3 x (B 3 H W) -> (3B) 3 H W, laid out B to a row: one (3H) x (B W) image
    rows = torch.cat([(t * std + mean).clamp(0, 1) for t in (imgs, masked, recon)])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(rows, path, nrow=imgs.shape[0], padding=0)
    model.train(was_training)
    return path
