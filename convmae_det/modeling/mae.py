"""The pretraining-only parts of a ConvMAE model, shared by the product model
(:class:`convmae_det.pretrain.ConvMAE`) and the reference
(:class:`convmae_det.modeling.reference.ReferenceConvMAE`).

:class:`MAEMixin` adds, named as in the official full pretraining checkpoints, ``norm``,
``stage1_output_decode``, ``stage2_output_decode`` and the ``decoder_*`` modules to an encoder
class, and the masked-autoencoder ``forward``; the encoder class supplies ``forward_encoder``
(the part where the two computations differ) and ``_run`` (how it runs a list of blocks).
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .layers import get_2d_sincos_pos_embed, resample_abs_pos
from .masking import draw_masks, grid_of, masked_mse

__all__ = ["MAEMixin"]


class MAEMixin:
    """Masked autoencoder on a ConvViT encoder: ``forward(imgs)`` returns (loss, pred, mask).

    Mask convention (as in MAE): ``mask`` is (B, L) over the stage-3 grid, 1 = masked.
    """

    def __init__(self, *, img_size: int = 224, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, norm_pix_loss: bool = True, conv_norm_eps: float = 1e-5, **encoder_kwargs):
        """``encoder_kwargs`` go to the encoder class (embed_dims, depths, num_heads, mlp_ratio,
        drop_path_rate, use_act_checkpoint, ...); its position embedding is the fixed sin-cos
        one of the ``img_size`` grid. conv_norm_eps: 1e-5, as in the official pretraining code."""
        super().__init__(
            pretrain_img_size=img_size,
            conv_norm_eps=conv_norm_eps,
            pos_embed_trainable=False,
            out_features=("s16",),
            **encoder_kwargs,
        )
        mlp_ratio = encoder_kwargs.get("mlp_ratio", 4.0)
        d1, d2, d3 = self.embed_dims
        self.img_size = img_size
        self.patch_size = 16
        self.norm_pix_loss = norm_pix_loss
        self.norm = nn.LayerNorm(d3, eps=1e-6)
        self.stage1_output_decode = nn.Conv2d(d1, d3, 4, stride=4)
        self.stage2_output_decode = nn.Conv2d(d2, d3, 2, stride=2)

        self.decoder_embed = nn.Linear(d3, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            get_2d_sincos_pos_embed(decoder_embed_dim, img_size // 16).unsqueeze(0), requires_grad=False
        )
        norm_layer = functools.partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            [self.vit_block_cls(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer=norm_layer)
             for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_norm, self.decoder_pred, self.norm, *self.decoder_blocks]:
            m.apply(self._init_weights)

    def visible_ids(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L_vis) ascending visible positions of ``mask``; errors if it does not fit the
        images or keeps different numbers of tokens per image."""
        grid = grid_of(imgs)
        B, L = mask.shape
        if L != grid[0] * grid[1]:
            raise ValueError(f"mask has {L} positions, the {imgs.shape[-2]}x{imgs.shape[-1]} input has {grid[0] * grid[1]}")
        num_vis = (mask == 0).sum(1)
        if not torch.all(num_vis == num_vis[0]):
            raise ValueError(f"every image must keep the same number of visible tokens, got {num_vis.tolist()}")
        return torch.nonzero(mask == 0)[:, 1].reshape(B, -1)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs B 3 H W, mask (B, L) -> the normalised visible tokens (B, L_vis, C3) in ascending
        position order."""
        raise NotImplementedError

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """x: (B, L_vis, C3) visible tokens; returns per-patch pixel predictions (B, L, 16*16*3)."""
        x = self.decoder_embed(x)
        B, L = mask.shape
        full = self.mask_token.to(x.dtype).expand(B, L, -1).clone()
        full[mask == 0] = x.reshape(-1, x.shape[-1])  # visible tokens back at their positions
        x = full + resample_abs_pos(self.decoder_pos_embed, grid).reshape(1, L, -1)
        x = self._run(self.decoder_blocks, x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on masked patches only; per-patch normalised targets if norm_pix_loss."""
        return masked_mse(imgs, pred, mask, self.norm_pix_loss, self.patch_size)

    def forward(
        self,
        imgs: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        mask_ratio: float = 0.75,
        generator: Optional[torch.Generator] = None,
        complementary: int = 0,
    ):
        """imgs: B 3 H W (normalised). ``mask`` (B, L, 1 = masked) or drawn with ``mask_ratio``.

        ``complementary`` = K > 1 draws K disjoint masks per image instead (ratio 1 - 1/K, see
        :func:`~convmae_det.modeling.masking.complementary_masks`) and reconstructs all K views
        in this step; the batch the encoder and decoder see is then K * B, view-major.
        Returns (loss, pred (B', L, 768), mask (B', L)) with B' = B or K * B.
        """
        imgs, mask = draw_masks(imgs, mask, mask_ratio, generator, complementary)
        latent = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(latent, mask, grid_of(imgs))
        return self.forward_loss(imgs, pred, mask), pred, mask
