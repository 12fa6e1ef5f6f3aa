"""The reference: what the official ConvMAE code computes, as a plain port.

This module is the specification the product modules are tested against (outputs and
gradients, fp32, 1e-4). It is deliberately plain and changes only when the official
computation does; speed belongs in :mod:`convmae_det.modeling.convvit`, never here.

- conv stages in NCHW, a permute around every channel LayerNorm, masked convolution by
  multiplying the depthwise conv's input with the visibility mask (official ``CBlock``);
- explicit attention matrices, with ViTDet's window partition (zero padding, then crop) and
  its decomposed relative position added as an N x N bias (``add_decomposed_rel_pos``);
- the position embedding resampled by bicubic ``F.interpolate``;
- MAE's dense ``forward_encoder``: stages 1-2 on the whole grid with masked convolution,
  then the visible tokens gathered for stage 3 (official ``MaskedAutoencoderConvViT``).

It ships with the package, rather than living under ``tests/``, because it is also a runtime
choice: ``MODEL.CONVMAE.IMPL eager`` builds it (the detection builders), and so do the
benchmark's eager rows and ``tools/pretrain.py --dense-conv-stages``. Parameter names equal
the product's, so ``ref.load_state_dict(model.state_dict())`` works, and the official
checkpoints load into either.

(The pyramid's reference is :class:`~convmae_det.modeling.pyramid.SimpleFeaturePyramid` with
``channels_last=False``: plain ``nn.Sequential`` stages of torch and detectron2 layers.)
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from timm.layers import ConvMlp, DropPath, Mlp

from .convvit import ConvViTBase
from .layers import LayerNorm2d, decomposed_rel_pos, resample_abs_pos, window_partition, window_unpartition
from .mae import MAEMixin
from .masking import grid_of, upsample_mask

__all__ = [
    "ReferencePatchEmbed",
    "ReferenceConvBlock",
    "ReferenceAttention",
    "ReferenceBlock",
    "ReferenceConvViT",
    "ReferenceConvMAE",
]


class ReferencePatchEmbed(nn.Module):
    """Conv2d with kernel = stride, channel LayerNorm, GELU. NCHW in, NCHW out."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm_eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm2d(embed_dim, eps=norm_eps)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class ReferenceConvBlock(nn.Module):
    """Official ``CBlock``, NCHW; ``mask`` (B 1 H W, 1 = visible) multiplies the depthwise conv's
    input (masked convolution)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=norm_eps)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim, eps=norm_eps)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)  # timm's, NCHW

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.conv1(self.norm1(x))
        if mask is not None:
            y = mask * y
        x = x + self.drop_path(self.conv2(self.attn(y)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ReferenceAttention(nn.Module):
    """ViTDet ``Attention``: explicit softmax(q k^T * scale + rel-pos bias) v. Takes a B H W C
    grid (relative position available) or B N C tokens."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.dim() == 4
        if grid:
            B, H, W, C = x.shape
            x = x.reshape(B, H * W, C)
        elif self.use_rel_pos:
            raise ValueError("relative position needs a B H W C grid")
        B, N, C = x.shape
        # B N 3C -> 3 (B heads) N d
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, N, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (H, W))
            attn = (attn.view(-1, H, W, H, W) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(-1, N, N)
        x = (attn.softmax(dim=-1) @ v).view(B, self.num_heads, N, -1).permute(0, 2, 1, 3).reshape(B, N, C)
        x = self.proj(x)
        return x.view(B, H, W, C) if grid else x


class ReferenceBlock(nn.Module):
    """ViTDet ``Block``: window partition with zero padding, attention, unpartition and crop."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 window_size: int = 0, use_rel_pos: bool = False, rel_pos_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ReferenceAttention(
            dim, num_heads, qkv_bias, use_rel_pos, (window_size, window_size) if window_size > 0 else rel_pos_size
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ReferenceConvViT(ConvViTBase):
    """The ConvMAE encoder as the official detection code computes it (NCHW outputs)."""

    patch_embed_cls = ReferencePatchEmbed
    conv_block_cls = ReferenceConvBlock
    vit_block_cls = ReferenceBlock

    def __init__(self, *, use_act_checkpoint: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.use_act_checkpoint = use_act_checkpoint

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward pass (``torch.utils.checkpoint``, as ViTDet)."""
        self.use_act_checkpoint = bool(enable)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, *args) -> torch.Tensor:
        for blk in blocks:
            if self.use_act_checkpoint and self.training and torch.is_grad_enabled():
                x = cp.checkpoint(blk, x, *args, use_reentrant=False)
            else:
                x = blk(x, *args)
        return x

    def forward_conv_stages(
        self, x: torch.Tensor, masks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stages 1-2 of B 3 H W images, with masked convolution if ``masks`` (B 1 H/4 W/4,
        B 1 H/8 W/8; 1 = visible) are given. Returns (s4 NCHW, s8 NCHW, tokens B H/16 W/16 C3
        after ``patch_embed4``)."""
        self._check_input(x)
        m4, m8 = masks if masks is not None else (None, None)
        s4 = self._run(self.blocks1, self.patch_embed1(x), *([m4] if m4 is not None else []))
        s8 = self._run(self.blocks2, self.patch_embed2(s4), *([m8] if m8 is not None else []))
        return s4, s8, self.patch_embed4(self.patch_embed3(s8).permute(0, 2, 3, 1))

    def forward_stages(
        self, x: torch.Tensor, conv_only: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        s4, s8, x = self.forward_conv_stages(x)
        if conv_only:
            return s4, s8, None
        x = self._run(self.blocks3, x + resample_abs_pos(self.pos_embed, x.shape[1:3]))
        return s4, s8, x.permute(0, 3, 1, 2).contiguous()


class ReferenceConvMAE(MAEMixin, ReferenceConvViT):
    """The official ConvMAE pretraining computation (dense conv stages with masked convolution,
    explicit attention). Same constructor and parameter names as
    :class:`convmae_det.pretrain.ConvMAE`."""

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids_keep = self.visible_ids(imgs, mask)
        grid = grid_of(imgs)
        visible = 1.0 - mask.to(imgs.dtype)
        s4, s8, x = self.forward_conv_stages(imgs, (upsample_mask(visible, grid, 4), upsample_mask(visible, grid, 2)))
        x = (x + resample_abs_pos(self.pos_embed, grid)).flatten(1, 2)  # B L C

        def gather(t):  # B L C -> B L_vis C
            return torch.gather(t, 1, ids_keep[..., None].expand(-1, -1, t.shape[-1]))

        x = self._run(self.blocks3, gather(x))
        # B C h w -> B L C, then the visible positions
        fused1 = gather(self.stage1_output_decode(s4).flatten(2).transpose(1, 2))
        fused2 = gather(self.stage2_output_decode(s8).flatten(2).transpose(1, 2))
        return self.norm(x + fused1 + fused2)
