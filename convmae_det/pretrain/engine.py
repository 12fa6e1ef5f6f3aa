"""Pieces of the pretraining loop that are worth testing on their own."""
import math
import os
from typing import Dict, List

import torch
import torch.nn as nn

from .model import ConvMAE, patchify, random_masking, unpatchify

__all__ = ["build_param_groups", "lr_at_step", "mask_generator", "save_checkpoint", "reconstruction_grid"]


def build_param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """No weight decay on biases and 1-D parameters (norms), as in MAE; frozen ones skipped."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at_step(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then half-cycle cosine from ``lr`` to ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mask_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """A generator whose masks depend only on (seed, step, micro-batch, rank): resumable."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + micro) * 1024 + rank)


def save_checkpoint(path: str, model: ConvMAE, optimizer, scaler, step: int, args: Dict) -> None:
    """Write the checkpoint (official names under "model") to a temporary file, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@torch.no_grad()
def reconstruction_grid(model: ConvMAE, dataset, mask_ratio: float, path: str, device, seed: int = 0) -> str:
    """PNG with one column per image: original, masked input, reconstruction (visible patches
    pasted back). Predictions of a norm_pix_loss model are de-normalised with each patch's
    own mean and std, as in the MAE visualisation."""
    from PIL import Image

    from .data import IMAGENET_MEAN, IMAGENET_STD

    was_training = model.training
    model.eval()
    imgs = torch.stack([dataset[i] for i in range(len(dataset))]).to(device)
    grid = model.grid_of(imgs)
    mask = random_masking(imgs.shape[0], grid, mask_ratio, generator=torch.Generator().manual_seed(seed)).to(device)
    _, pred, _ = model(imgs.float(), mask=mask)
    target = patchify(imgs)
    if model.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask[..., None]
    masked = unpatchify(target * (1 - m), grid)
    recon = unpatchify(target * (1 - m) + pred * m, grid)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    rows = [(t * std + mean).clamp(0, 1) for t in (imgs, masked, recon)]
    # rows of B 3 H W -> one (3H) x (B W) image
    canvas = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray((canvas.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")).save(path)
    model.train(was_training)
    return path
