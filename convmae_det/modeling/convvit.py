"""ConvViT: the ConvMAE hybrid convolution-transformer encoder.

Stages 1-2 are convolutional and work in NCHW; stage 3 is a plain ViT and works on a
B H W C token grid (detection) or on a B N C token sequence (pretraining, visible tokens only).
Parameter names follow the official ConvMAE checkpoints (``patch_embed1..4``, ``blocks1..3``,
the depthwise 5x5 conv named ``attn``), so published weights load without renaming.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, Mlp, trunc_normal_

from .layers import (
    LayerNorm2d,
    decomposed_rel_pos,
    get_2d_sincos_pos_embed,
    resample_abs_pos,
    window_partition,
    window_unpartition,
)

__all__ = [
    "CONVVIT_SIZES",
    "PatchEmbed",
    "ConvMlp",
    "ConvBlock",
    "Attention",
    "TransformerBlock",
    "ConvViT",
    "convvit_kwargs",
]

# embed dims, depths and heads per size. Base is the published ConvMAE-B; small and large follow
# the ConvMAE-v2 release and are only as exact as its tensor shapes (loaders read sizes from
# shapes, see convmae_det.checkpoint); tiny exists for tests and the CPU demo.
CONVVIT_SIZES: Dict[str, dict] = {
    "tiny": dict(embed_dims=(64, 128, 256), depths=(1, 1, 4), num_heads=4),
    "small": dict(embed_dims=(128, 256, 384), depths=(2, 2, 11), num_heads=6),
    "base": dict(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12),
    "large": dict(embed_dims=(384, 768, 1024), depths=(2, 2, 23), num_heads=16),
}


def convvit_kwargs(size: str, **overrides) -> dict:
    """Keyword arguments for :class:`ConvViT` of a named size, with overrides applied."""
    if size not in CONVVIT_SIZES:
        raise ValueError(f"unknown ConvViT size {size!r}; expected one of {sorted(CONVVIT_SIZES)}")
    kwargs = dict(CONVVIT_SIZES[size])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride, then channel LayerNorm and GELU. NCHW in, NCHW out."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm_eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm2d(embed_dim, eps=norm_eps)
        self.act = nn.GELU()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class ConvMlp(nn.Module):
    """MLP of two 1x1 convs (``fc1``, ``fc2``) on NCHW features."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Callable[..., nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """Stage 1-2 block (official ``CBlock``). NCHW in, NCHW out.

    x = x + drop_path(conv2(dwconv5x5(mask * conv1(norm1(x)))))
    x = x + drop_path(mlp(norm2(x)))

    ``mask`` (B 1 H W, 1 = visible, 0 = masked) is the masked convolution of pretraining: the
    depthwise conv, the only op that mixes positions, never sees a masked position's value.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Callable[..., nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=norm_eps)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)  # named attn in the checkpoints
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim, eps=norm_eps)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.conv1(self.norm1(x))
        if mask is not None:
            y = y * mask
        x = x + self.drop_path(self.conv2(self.attn(y)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class Attention(nn.Module):
    """Multi-head self-attention with optional ViTDet decomposed relative position.

    Two implementations compute the same function: ``"sdpa"`` (F.scaled_dot_product_attention)
    and ``"eager"`` (explicit attention matrix, as in the official code; kept for equivalence
    tests and benchmarks).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_size: Optional[Tuple[int, int]] = None,
        attn_impl: str = "sdpa",
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {attn_impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_impl = attn_impl
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if rel_pos_size is None:
                raise ValueError("use_rel_pos=True needs rel_pos_size=(H, W) of the attended grid")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """x: (B, N, C) tokens; ``hw`` is the (H, W) grid they form (needed for rel pos)."""
        B, N, C = x.shape
        # B N 3C -> B N 3 heads d -> 3 B heads N d
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            if hw is None or hw[0] * hw[1] != N:
                raise ValueError(f"relative position needs the token grid: got hw={hw} for {N} tokens")
            rel_h, rel_w = decomposed_rel_pos(
                q.reshape(B * self.num_heads, N, self.head_dim), self.rel_pos_h, self.rel_pos_w, hw
            )
            H, W = hw
            # (B heads) H W H, (B heads) H W W -> B heads N N additive logit bias
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.num_heads, N, N)
        if self.attn_impl == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype) if bias is not None else None)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            x = attn.softmax(dim=-1) @ v
        # B heads N d -> B N heads d -> B N C
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TransformerBlock(nn.Module):
    """Stage 3 pre-norm ViT block with optional window attention (ViTDet ``Block``).

    Takes a B H W C grid (window attention and rel pos available) or B N C tokens (global
    attention without rel pos, as in pretraining on visible tokens).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        window_size: int = 0,
        use_rel_pos: bool = False,
        rel_pos_size: Optional[Tuple[int, int]] = None,
        attn_impl: str = "sdpa",
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        if use_rel_pos and window_size > 0:
            rel_pos_size = (window_size, window_size)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, rel_pos_size=rel_pos_size, attn_impl=attn_impl
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.window_size = window_size

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # B N C, global attention over a sequence
            if self.window_size > 0 or self.attn.use_rel_pos:
                raise ValueError("window attention and relative position need a B H W C grid, got B N C tokens")
            return self.attn(x)
        B, H, W, C = x.shape
        if self.window_size > 0:
            x, pad_hw = window_partition(x, self.window_size)  # (B nW) ws ws C
            hw = (self.window_size, self.window_size)
        else:
            hw = (H, W)
        b = x.shape[0]
        x = self.attn(x.reshape(b, hw[0] * hw[1], C), hw).view(b, hw[0], hw[1], C)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ConvViT(nn.Module):
    """ConvMAE encoder: two conv stages (strides 4, 8) and a transformer stage (stride 16).

    ``forward`` takes B 3 H W images with H and W multiples of 16 (a detection backbone further
    needs multiples of 32 for its stride-32 output) and returns a dict of NCHW features
    ``{"s4", "s8", "s16", "s32"}`` restricted to ``out_features``; ``s32`` is a 2x2 max pool of
    ``s16``.
    """

    def __init__(
        self,
        *,
        embed_dims: Sequence[int] = (256, 384, 768),
        depths: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        drop_path_rate: float = 0.0,
        conv_norm_eps: float = 1e-6,
        window_size: int = 0,
        window_block_indexes: Sequence[int] = (),
        use_rel_pos: bool = False,
        rel_pos_grid: Optional[Tuple[int, int]] = None,
        pos_embed_trainable: bool = True,
        use_act_checkpoint: bool = False,
        attn_impl: str = "sdpa",
        out_features: Sequence[str] = ("s4", "s8", "s16", "s32"),
    ):
        """
        Args:
            embed_dims, depths: per stage. num_heads: heads of stage 3.
            pretrain_img_size: image size of pretraining; the absolute position embedding has
                (pretrain_img_size / 16) ** 2 positions and is resampled to other grids.
            conv_norm_eps: eps of the conv blocks' LayerNorms (1e-6 in the official detection
                code, 1e-5 in the official pretraining code).
            window_size: window of the blocks listed in ``window_block_indexes``; the others
                attend globally. 0 disables windows.
            use_rel_pos: ViTDet decomposed relative position in every stage-3 block.
            rel_pos_grid: (H, W) token grid the global blocks' tables are sized for; defaults
                to the pretraining grid.
            pos_embed_trainable: False keeps the sin-cos embedding fixed (pretraining).
        """
        super().__init__()
        if len(embed_dims) != 3 or len(depths) != 3:
            raise ValueError(f"ConvViT has 3 stages: got embed_dims={embed_dims}, depths={depths}")
        unknown = set(out_features) - {"s4", "s8", "s16", "s32"}
        if unknown:
            raise ValueError(f"unknown out_features {sorted(unknown)}; choose from s4, s8, s16, s32")
        bad = [i for i in window_block_indexes if not 0 <= i < depths[2]]
        if bad:
            raise ValueError(f"window_block_indexes {bad} out of range for {depths[2]} stage-3 blocks")
        if pretrain_img_size % 16 != 0:
            raise ValueError(f"pretrain_img_size {pretrain_img_size} is not a multiple of 16")
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_heads = num_heads
        self.pretrain_img_size = pretrain_img_size
        self.use_act_checkpoint = use_act_checkpoint
        self._out_features = tuple(out_features)
        d1, d2, d3 = embed_dims

        self.patch_embed1 = PatchEmbed(in_chans, d1, 4)
        self.patch_embed2 = PatchEmbed(d1, d2, 2)
        self.patch_embed3 = PatchEmbed(d2, d3, 2)
        self.patch_embed4 = nn.Linear(d3, d3)
        grid = pretrain_img_size // 16
        self.pos_embed = nn.Parameter(
            get_2d_sincos_pos_embed(d3, grid).unsqueeze(0), requires_grad=pos_embed_trainable
        )

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks1 = nn.ModuleList(
            [ConvBlock(d1, mlp_ratio, dpr[i], norm_eps=conv_norm_eps) for i in range(depths[0])]
        )
        self.blocks2 = nn.ModuleList(
            [ConvBlock(d2, mlp_ratio, dpr[depths[0] + i], norm_eps=conv_norm_eps) for i in range(depths[1])]
        )
        rel_pos_grid = tuple(rel_pos_grid) if rel_pos_grid else (grid, grid)
        norm_layer = lambda dim: nn.LayerNorm(dim, eps=1e-6)  # noqa: E731
        self.blocks3 = nn.ModuleList(
            [
                TransformerBlock(
                    d3,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[depths[0] + depths[1] + i],
                    norm_layer=norm_layer,
                    window_size=window_size if i in window_block_indexes else 0,
                    use_rel_pos=use_rel_pos,
                    rel_pos_size=rel_pos_grid,
                    attn_impl=attn_impl,
                )
                for i in range(depths[2])
            ]
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def out_feature_channels(self) -> Dict[str, int]:
        d1, d2, d3 = self.embed_dims
        return {"s4": d1, "s8": d2, "s16": d3, "s32": d3}

    @property
    def out_feature_strides(self) -> Dict[str, int]:
        return {"s4": 4, "s8": 8, "s16": 16, "s32": 32}

    def set_attn_impl(self, attn_impl: str) -> None:
        """Switch every stage-3 block between the ``"sdpa"`` and ``"eager"`` attention."""
        if attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {attn_impl!r}")
        for blk in self.blocks3:
            blk.attn.attn_impl = attn_impl

    def _run(self, blk: nn.Module, *args) -> torch.Tensor:
        if self.use_act_checkpoint and self.training and torch.is_grad_enabled():
            return cp.checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def forward_conv_stages(
        self, x: torch.Tensor, masks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stages 1-2 and the stage-3 patch embedding.

        x: B 3 H W. ``masks``: optional (B 1 H/4 W/4, B 1 H/8 W/8) visibility masks (1 = visible)
        for masked convolution. Returns (s4: B C1 H/4 W/4, s8: B C2 H/8 W/8, tokens: B H/16 W/16 C3),
        the tokens after ``patch_embed4`` and before the position embedding.
        """
        H, W = x.shape[-2:]
        if H % 16 or W % 16:
            raise ValueError(f"ConvViT input {H}x{W}: height and width must be multiples of 16")
        m1, m2 = masks if masks is not None else (None, None)
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = self._run(blk, x, m1)
        s4 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = self._run(blk, x, m2)
        s8 = x
        x = self.patch_embed3(x)
        # B C H W -> B H W C (token grid of stage 3)
        x = self.patch_embed4(x.permute(0, 2, 3, 1))
        return s4, s8, x

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        s4, s8, x = self.forward_conv_stages(x)
        x = x + resample_abs_pos(self.pos_embed, x.shape[1:3])
        for blk in self.blocks3:
            x = self._run(blk, x)
        s16 = x.permute(0, 3, 1, 2)  # B H W C -> B C H W
        outs = {"s4": s4, "s8": s8, "s16": s16}
        if "s32" in self._out_features:
            outs["s32"] = F.max_pool2d(s16, kernel_size=2, stride=2)
        return {k: outs[k] for k in self._out_features}
