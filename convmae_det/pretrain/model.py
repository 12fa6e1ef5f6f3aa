"""ConvMAE masked autoencoder (reference section 2) on the detection backbone's encoder.

:class:`ConvMAE` *is* a :class:`~convmae_det.modeling.ConvViT` (same blocks, same parameter
names) plus the pretraining-only parts of :class:`~convmae_det.modeling.mae.MAEMixin`, named as
in the official checkpoints, so an official full pretraining checkpoint loads with
``strict=True``.

Its encoder is sparse: stages 1-2 run only at the visible 16 x 16 patches. With masked
convolution no masked position ever reaches a visible output, so only the depthwise conv needs
the grid (zeros at masked positions) and every other op runs on the visible cells. The official
dense computation is :class:`~convmae_det.modeling.reference.ReferenceConvMAE`; the tests hold
the two equal (loss, outputs and gradients).
"""
import torch

from ..modeling.convvit import ConvViT, convvit_kwargs, patch_linear
from ..modeling.layers import resample_abs_pos
from ..modeling.mae import MAEMixin
from ..modeling.masking import grid_of

__all__ = ["ConvMAE", "convmae_pretrain"]


class ConvMAE(MAEMixin, ConvViT):
    """ConvMAE pretraining model. ``forward(imgs)`` returns (loss, pred, mask); see
    :meth:`MAEMixin.forward`. Constructor: :class:`MAEMixin`'s arguments."""

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs: B 3 H W; mask: (B, L) with 1 = masked, the same count per image.

        Returns the normalised visible tokens (B, L_vis, C3), in ascending position order: all
        three stages at the visible positions only, stage 3 fused with the stage-1/2 features.
        Stages 1-2 work on patch-major cells B Lv S S C (S = 4 cells per patch side in stage 1,
        2 in stage 2).
        """
        ids_keep = self.visible_ids(imgs, mask)
        grid = grid_of(imgs)
        B, Lv = ids_keep.shape
        h, w = grid
        # B 3 H W -> B h 16 w 16 3 -> B L 16 16 3 -> the visible patches
        pixels = imgs.permute(0, 2, 3, 1).reshape(B, h, 16, w, 16, 3).permute(0, 1, 3, 2, 4, 5)
        pixels = pixels.reshape(B, h * w, 16, 16, 3)[torch.arange(B, device=imgs.device)[:, None], ids_keep]
        s4 = self._run(self.blocks1, self.patch_embed1(pixels), ids_keep, grid)
        s8 = self._run(self.blocks2, self.patch_embed2(s4), ids_keep, grid)
        x = self.patch_embed4(self.patch_embed3(s8).reshape(B, Lv, -1))
        x = x + resample_abs_pos(self.pos_embed, grid).reshape(1, h * w, -1)[0][ids_keep]
        x = self._run(self.blocks3, x)
        fused1 = patch_linear(self.stage1_output_decode, s4).flatten(2)  # B Lv 1 1 C3 -> B Lv C3
        fused2 = patch_linear(self.stage2_output_decode, s8).flatten(2)
        return self.norm(x + fused1 + fused2)


def convmae_pretrain(size: str = "base", reference: bool = False, **kwargs):
    """A :class:`ConvMAE` of a named encoder size (tiny, small, base, large); ``reference=True``
    builds :class:`~convmae_det.modeling.reference.ReferenceConvMAE`, the official dense
    computation, with the same arguments and parameter names."""
    if reference:
        from ..modeling.reference import ReferenceConvMAE

        return ReferenceConvMAE(**convvit_kwargs(size), **kwargs)
    return ConvMAE(**convvit_kwargs(size), **kwargs)
