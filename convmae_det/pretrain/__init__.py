from .model import ConvMAE, convmae_pretrain, patchify, random_masking, unpatchify, upsample_mask

__all__ = ["ConvMAE", "convmae_pretrain", "patchify", "random_masking", "unpatchify", "upsample_mask"]
