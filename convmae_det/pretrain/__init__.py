from .model import (
    ConvMAE,
    complementary_masks,
    convmae_pretrain,
    grid_of,
    patch_mean_std,
    patchify,
    random_masking,
    unpatchify,
    upsample_mask,
)

__all__ = [
    "ConvMAE",
    "complementary_masks",
    "convmae_pretrain",
    "grid_of",
    "patch_mean_std",
    "patchify",
    "random_masking",
    "unpatchify",
    "upsample_mask",
]
