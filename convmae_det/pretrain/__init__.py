"""ConvMAE pretraining: the model, and the mask and patch functions it uses."""
from ..modeling.masking import (
    complementary_masks,
    grid_of,
    patch_mean_std,
    patchify,
    random_masking,
    unpatchify,
    upsample_mask,
)
from .model import ConvMAE, convmae_pretrain

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
