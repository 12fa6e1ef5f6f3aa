"""Masks, patches and the reconstruction loss of ConvMAE pretraining: pure functions shared by
the product model (:mod:`convmae_det.pretrain.model`) and the reference
(:mod:`convmae_det.modeling.reference`).

Mask convention (as in MAE): ``mask`` is (B, L) over the stage-3 grid with 1 = masked (removed)
and 0 = visible.
"""
from typing import Optional, Tuple

import torch

__all__ = [
    "random_masking",
    "complementary_masks",
    "draw_masks",
    "upsample_mask",
    "patchify",
    "unpatchify",
    "patch_mean_std",
    "masked_mse",
    "grid_of",
]


def grid_of(imgs: torch.Tensor, p: int = 16) -> Tuple[int, int]:
    """The stage-3 grid (H/16, W/16) of B 3 H W images; error unless H and W are multiples of 16."""
    H, W = imgs.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"pretraining input {H}x{W}: height and width must be multiples of {p}")
    return H // p, W // p


def random_masking(
    batch: int, grid: Tuple[int, int], mask_ratio: float, device=None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Block-wise random mask on the stage-3 grid: (B, H*W) with exactly round(L * ratio) ones
    (1 = masked) per image, drawn from ``generator`` when given."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    L = grid[0] * grid[1]
    num_masked = int(round(L * mask_ratio))
    noise = torch.rand(batch, L, generator=generator, device=generator.device if generator is not None else device)
    ids = noise.argsort(dim=1)
    mask = torch.zeros(batch, L, device=noise.device)
    mask.scatter_(1, ids[:, :num_masked], 1.0)
    return mask.to(device) if device is not None else mask


def complementary_masks(
    batch: int, grid: Tuple[int, int], num_views: int, device=None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``num_views`` disjoint visible sets per image that together cover the grid (FastConvMAE).

    Returns (num_views, B, L) masks (1 = masked): view k keeps the k-th of ``num_views`` equal
    slices of a random permutation of the positions, so its mask ratio is 1 - 1/num_views and
    every position is visible in exactly one view and a reconstruction target in the others.
    """
    L = grid[0] * grid[1]
    if num_views < 2 or L % num_views:
        raise ValueError(f"complementary masking needs 2 <= num_views dividing the {L} positions, got {num_views}")
    noise = torch.rand(batch, L, generator=generator, device=generator.device if generator is not None else device)
    ids = noise.argsort(dim=1).reshape(batch, num_views, L // num_views)
    masks = torch.ones(num_views, batch, L, device=noise.device)
    for k in range(num_views):
        masks[k].scatter_(1, ids[:, k], 0.0)
    return masks.to(device) if device is not None else masks


def draw_masks(
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    mask_ratio: float = 0.75,
    generator: Optional[torch.Generator] = None,
    complementary: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The images and masks of one pretraining step: ``mask`` as given, or drawn with
    ``mask_ratio``, or, for ``complementary`` = K > 1, K disjoint masks per image with the images
    repeated K times (view-major). Returns (imgs (B', 3, H, W), mask (B', L) float32)."""
    grid = grid_of(imgs)
    if complementary > 1:
        if mask is not None:
            raise ValueError("pass either an explicit mask or complementary=K, not both")
        B = imgs.shape[0]
        mask = complementary_masks(B, grid, complementary, device=imgs.device, generator=generator)
        mask = mask.reshape(complementary * B, -1)
        imgs = imgs.repeat(complementary, 1, 1, 1)
    elif mask is None:
        mask = random_masking(imgs.shape[0], grid, mask_ratio, device=imgs.device, generator=generator)
    mask = mask.to(imgs.device, torch.float32)
    if mask.shape != (imgs.shape[0], grid[0] * grid[1]):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit {imgs.shape[0]} images of a "
            f"{grid[0]}x{grid[1]} grid: expected ({imgs.shape[0]}, {grid[0] * grid[1]})"
        )
    if mask.sum() == 0:
        raise ValueError("the mask hides no patch: the loss is computed on masked patches only")
    return imgs, mask


def upsample_mask(mask: torch.Tensor, grid: Tuple[int, int], factor: int) -> torch.Tensor:
    """(B, H*W) stage-3 mask -> (B, 1, H*factor, W*factor) by nearest repetition."""
    B = mask.shape[0]
    m = mask.reshape(B, 1, grid[0], grid[1])
    return m.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def patchify(imgs: torch.Tensor, p: int = 16) -> torch.Tensor:
    """B 3 H W -> B L (p*p*3), patches in row-major order, pixels (p, p, 3) as in MAE."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    # B C h p w p -> B h w p p C
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, grid: Tuple[int, int], p: int = 16) -> torch.Tensor:
    """Inverse of :func:`patchify`: B L (p*p*3) -> B 3 H W."""
    B = x.shape[0]
    h, w = grid
    x = x.reshape(B, h, w, p, p, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, h * p, w * p)


def patch_mean_std(patches: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std of B L D pixel patches as MAE's ``norm_pix_loss`` uses them:
    unbiased variance, std = sqrt(var + eps). The target is (patch - mean) / std, and a
    prediction of that target is de-normalised by pred * std + mean."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return mean, (var + eps) ** 0.5


def masked_mse(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True, p: int = 16) -> torch.Tensor:
    """MAE's loss: mean squared error per patch, averaged over the masked patches only; targets
    normalised per patch if ``norm_pix_loss``."""
    target = patchify(imgs, p)
    if norm_pix_loss:
        mean, std = patch_mean_std(target)
        target = (target - mean) / std
    loss = (pred - target).pow(2).mean(dim=-1)  # B L
    return (loss * mask).sum() / mask.sum()
