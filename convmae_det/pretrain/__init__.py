from .model import ConvMAE, complementary_masks, convmae_pretrain, patchify, random_masking, unpatchify, upsample_mask

__all__ = ["ConvMAE", "complementary_masks", "convmae_pretrain", "patchify", "random_masking", "unpatchify", "upsample_mask"]
