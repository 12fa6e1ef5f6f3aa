"""ConvViT: the ConvMAE hybrid convolution-transformer encoder, as the product runs it.

Stages 1-2 are convolutional (strides 4 and 8), stage 3 is a plain ViT (stride 16). Every stage
works on channels-last B H W C grids, so the conv and token layouts meet without copies:

- conv stages: the 1x1 convs are matmuls over the channel axis, the LayerNorms need no
  permute, the depthwise 5x5 conv runs on a channels-last NCHW view of the same memory;
- attention: ``F.scaled_dot_product_attention``, with ViTDet's decomposed relative position
  folded into the query and key (no N x N bias tensor, fused kernels stay eligible), and window
  attention that never projects the padding.

Parameter names and shapes follow the official ConvMAE checkpoints (``patch_embed1..4``,
``blocks1..3``, the depthwise conv named ``attn``), so published weights load without renaming.
What the official code computes is :mod:`convmae_det.modeling.reference` (same parameter
names); the tests hold this model equal to it, outputs and gradients.
"""
import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from timm.layers import ConvMlp as TimmConvMlp
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models._features import feature_take_indices

from .layers import (
    _cached,
    get_2d_sincos_pos_embed,
    resample_abs_pos,
    resize_rel_pos,
    window_partition,
    window_unpartition,
)
from .runner import BlockRunner

__all__ = [
    "CONVVIT_SIZES",
    "GLOBAL_ATTN_INDEXES",
    "PatchEmbed",
    "ConvMlp",
    "ConvBlock",
    "Attention",
    "TransformerBlock",
    "ConvViTBase",
    "ConvViT",
    "convvit_kwargs",
    "check_stage3_indexes",
    "patch_linear",
    "cells_to_grid",
    "cells_from_grid",
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

# stage-3 blocks with global attention in detection, per size (the others attend in windows).
# base: Official-ConvMAE-Det; small: the same (same depth); large: ViTDet-L's 5/11/17/23 moved
# one block earlier, as Base's are against ViTDet-B's 2/5/8/11 (stage 3 has one block less
# than the ViT; no official ConvMAE-L detection config); tiny: every other block
GLOBAL_ATTN_INDEXES: Dict[str, Tuple[int, ...]] = {
    "tiny": (1, 3),
    "small": (1, 4, 7, 10),
    "base": (1, 4, 7, 10),
    "large": (4, 10, 16, 22),
}


def convvit_kwargs(size: str, **overrides) -> dict:
    """Keyword arguments for :class:`ConvViT` of a named size, with overrides applied."""
    if size not in CONVVIT_SIZES:
        raise ValueError(f"unknown ConvViT size {size!r}; expected one of {sorted(CONVVIT_SIZES)}")
    kwargs = dict(CONVVIT_SIZES[size])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def check_stage3_indexes(indexes: Sequence[int], depth: int, what: str = "window_block_indexes") -> None:
    """Error naming ``what`` unless every index is a stage-3 block of a ``depth``-block stage."""
    bad = [i for i in indexes if not 0 <= i < depth]
    if bad:
        raise ValueError(f"{what} {list(indexes)} has {bad}, outside the {depth} stage-3 blocks (0..{depth - 1})")


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv applied to (..., C) features as a matmul (the weight keeps its conv shape)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _conv_nhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A spatial conv on B H W C: the NCHW view of a channels-last tensor costs no copy, and
    the conv returns channels-last, whose B H W C view is contiguous again."""
    y = conv(x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
    return y.permute(0, 2, 3, 1)


def patch_linear(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A conv whose kernel equals its stride, on (..., H, W, C), as one matmul over gathered
    patches (..., h, w, p*p*C); CPU conv backward is several times slower than the matmul's."""
    *lead, H, W, C = x.shape
    p = conv.kernel_size[0]
    # ... H W C -> N h p w p C -> N h w p p C -> ... h w (p p C), the order of weight.permute(0, 2, 3, 1)
    x = x.reshape(-1, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5).reshape(*lead, H // p, W // p, p * p * C)
    return F.linear(x, conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1), conv.bias)


def cells_to_grid(y: torch.Tensor, ids_keep: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Visible patch cells B Lv S S C -> the B hS wS C grid, zeros at the masked patches."""
    B, Lv, S, _, C = y.shape
    h, w = grid
    batch = torch.arange(B, device=y.device)[:, None]
    full = y.new_zeros(B, h * w, S, S, C).index_put((batch, ids_keep), y)
    # B (h w) S S C -> B h S w S C -> B hS wS C
    return full.reshape(B, h, w, S, S, C).permute(0, 1, 3, 2, 4, 5).reshape(B, h * S, w * S, C)


def cells_from_grid(y: torch.Tensor, ids_keep: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`cells_to_grid` at the visible patches: B hS wS C -> B Lv S S C."""
    B, _, _, C = y.shape
    h, w = grid
    S = y.shape[1] // h
    batch = torch.arange(B, device=y.device)[:, None]
    y = y.reshape(B, h, S, w, S, C).permute(0, 1, 3, 2, 4, 5).reshape(B, h * w, S, S, C)
    return y[batch, ids_keep]


class PatchEmbed(nn.Module):
    """Conv with kernel = stride, then LayerNorm and GELU. (..., H, W, C) in, (..., H/p, W/p, C') out."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm_eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(patch_linear(self.proj, x)))


class ConvMlp(TimmConvMlp):
    """timm's ``ConvMlp`` (1x1 convs ``fc1``, ``fc2``, the official CBlock's MLP; GELU, no norm,
    no dropout) applied to (..., C) features: each 1x1 conv is a matmul over the channels. The
    reference runs timm's own forward on NCHW."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Callable[..., nn.Module] = nn.GELU):
        super().__init__(dim, hidden_dim, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pointwise(self.fc2, self.drop(self.act(self.norm(_pointwise(self.fc1, x)))))


class ConvBlock(nn.Module):
    """Stage 1-2 block (official ``CBlock``) on channels-last features.

    x = x + drop_path(conv2(dwconv5x5(conv1(norm1(x)))))
    x = x + drop_path(mlp(norm2(x)))

    ``forward(x)`` takes a B H W C grid. ``forward(x, ids_keep, grid)`` takes only the visible
    patches of a masked image, as B Lv S S C cells (S x S cells per 16 x 16 patch): every op but
    the depthwise conv is per position and runs on the visible cells; the depthwise conv, the
    only op that mixes positions, runs on the grid with zeros at the masked patches. That is the
    official masked convolution (the mask multiplies the conv's input), computed sparsely.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 act_layer: Callable[..., nn.Module] = nn.GELU):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)  # named attn in the checkpoints
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(
        self, x: torch.Tensor, ids_keep: Optional[torch.Tensor] = None, grid: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        y = _pointwise(self.conv1, self.norm1(x))
        if ids_keep is None:
            y = _conv_nhwc(self.attn, y)
        else:
            y = cells_from_grid(_conv_nhwc(self.attn, cells_to_grid(y, ids_keep, grid)), ids_keep, grid)
        x = x + self.drop_path(_pointwise(self.conv2, y))
        del y  # freed before the MLP, whose hidden features are the block's largest tensors
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Attention(nn.Module):
    """Multi-head self-attention with optional windows and ViTDet decomposed relative position.

    ``forward`` takes a B H W C grid, or B N C tokens (global attention without relative
    position, as on the visible tokens of pretraining). With ``window_size`` > 0 the grid is
    split into windows, the last ones zero-padded, as in ViTDet, in named steps: project the
    real tokens (:meth:`_project`, which adds the bias after padding, so the padding is never
    projected), partition (:meth:`_partition`), attend (:meth:`_attend`), merge and crop
    (:meth:`_merge`), output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        window_size: int = 0,
        use_rel_pos: bool = False,
        rel_pos_size: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if window_size > 0:
                rel_pos_size = (window_size, window_size)
            if rel_pos_size is None:
                raise ValueError("use_rel_pos=True needs rel_pos_size=(H, W) of the attended grid")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # B N C tokens
            if self.window_size > 0 or self.use_rel_pos:
                raise ValueError("window attention and relative position need a B H W C grid, got B N C tokens")
            return self.proj(self._attend(self.qkv(x), None))
        B, H, W, C = x.shape
        ws = self.window_size
        qkv = self._project(x)  # B Hp Wp 3C
        Hp, Wp = qkv.shape[1:3]
        if ws > 0:
            qkv, hw = self._partition(qkv), (ws, ws)  # (B nW) ws ws 3C
        else:
            hw = (H, W)
        out = self._attend(qkv.reshape(-1, hw[0] * hw[1], 3 * C), hw)  # B' N C
        return self.proj(self._merge(out.view(-1, hw[0], hw[1], C), (Hp, Wp), (H, W)))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """qkv of the B H W C grid, zero-padded to whole windows. A zero-padded token's qkv is
        the bias, so the padding is added between the matmul and the bias."""
        B, H, W, C = x.shape
        ws = self.window_size
        pad_h, pad_w = (-H % ws, -W % ws) if ws > 0 else (0, 0)
        if not (pad_h or pad_w):
            return self.qkv(x)
        qkv = F.pad(F.linear(x, self.qkv.weight), (0, 0, 0, pad_w, 0, pad_h))
        return qkv + self.qkv.bias.to(qkv.dtype) if self.qkv.bias is not None else qkv

    def _partition(self, qkv: torch.Tensor) -> torch.Tensor:
        """B Hp Wp 3C (whole windows) -> (B nW) ws ws 3C."""
        return window_partition(qkv, self.window_size)[0]

    def _merge(self, x: torch.Tensor, pad_hw: Tuple[int, int], hw: Tuple[int, int]) -> torch.Tensor:
        """Attended windows (or the whole grid) -> B H W C, the padding cropped."""
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, pad_hw)
        if pad_hw != hw:  # crop as one op (a negative pad): slicing H and W is two in the backward
            x = F.pad(x, (0, 0, 0, hw[1] - pad_hw[1], 0, hw[0] - pad_hw[0]))
        return x

    def _attend(self, qkv: torch.Tensor, hw: Optional[Tuple[int, int]]) -> torch.Tensor:
        """(B, N, 3C) qkv -> (B, N, C) attention output, before ``proj``; ``hw`` is the grid the
        N tokens form (for the relative position)."""
        B, N, C3 = qkv.shape
        C = C3 // 3
        # B N 3C -> B N 3 heads d -> 3 B heads N d
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos:
            x = self._sdpa_rel_pos(q, k, v, hw)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        # B heads N d -> B N heads d -> B N C
        return x.transpose(1, 2).reshape(B, N, C)

    def _sdpa_rel_pos(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Fused attention with the decomposed relative position and no N x N tensor.

        The logit of query i and key j at grid rows/columns (ih, iw), (jh, jw) is
        ``scale * q_i.k_j + q_i.Rh[ih - jh + H - 1] + q_i.Rw[iw - jw + W - 1]``. With
        ``P_i = q_i @ [Rh; Rw]^T``, the terms for all 2H-1 + 2W-1 offsets in one matmul, it is
        ``scale * q'_i.k'_j`` for

            q'_i = [q_i, P_i[ih : ih + H], P_i[2H-1 + iw : 2H-1 + iw + W]]
            k'_j = [k_j, onehot(H - 1 - jh) / scale, onehot(W - 1 - jw) / scale]

        The windows of P that q' takes are strided views of P (the relative shift of
        Transformer-XL), read by the one concatenation that builds q': no gather, no N x N
        bias. q' and k' are padded to a multiple of 8 channels (kernel alignment); k' with
        zeros, so q' may hold any finite values there. CUDA's memory-efficient and cuDNN kernels
        take a value narrower than the key; the CPU kernel needs equal widths, so there the value
        is zero-padded too and the padding cut from the output.
        """
        B, nh, N, d = q.shape
        H, W = hw
        pad = -(d + H + W) % 8
        rh, rw = resize_rel_pos(H, self.rel_pos_h), resize_rel_pos(W, self.rel_pos_w)
        zeros = _cached(_zero_rows)(pad, d, rh.device, rh.dtype)  # keeps the last window of P in bounds
        table = torch.cat([rh, rw, zeros])  # (2H-1 + 2W-1 + pad) x d
        P = torch.matmul(q, table.t().to(q.dtype)).view(B, nh, H, W, -1)
        if torch.jit.is_tracing():  # a trace cannot save the custom autograd function
            q2 = torch.cat([q.reshape(B, nh, H, W, d), *_rel_windows_gathered(P, pad)], dim=-1)
        else:
            q2 = _RelativeShift.apply(q.reshape(B, nh, H, W, d), P, pad)
        q2 = q2.view(B, nh, N, d + H + W + pad)
        onehot = _cached(_grid_onehot)(H, W, pad, 1.0 / self.scale, q.device, q.dtype)
        onehot = onehot.expand(B, nh, N, H + W + pad)
        k2 = torch.cat([k, onehot], dim=-1)
        if q.is_cuda:
            return F.scaled_dot_product_attention(q2, k2, v, scale=self.scale)
        out = F.scaled_dot_product_attention(q2, k2, F.pad(v, (0, H + W + pad)), scale=self.scale)
        return out[..., :d]


def _rel_windows(P: torch.Tensor, pad: int, fresh: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The windows P[..., ih : ih + H] and P[..., 2H-1 + iw : 2H-1 + iw + W + pad] of a contiguous
    B nh H W K tensor, for every grid cell (ih, iw), as strided views (disjoint, no overlap).

    The strides come from the shape, not from ``stride()`` and ``storage_offset()``, which
    torch.compile cannot trace (the graph broke there). The second window is cut from a slice,
    or, for a ``fresh`` tensor (storage offset 0) that is to be written through the views, by an
    explicit offset: compile cannot write through an as_strided view of a slice."""
    B, nh, H, W, K = P.shape
    s = (nh * H * W * K, H * W * K, W * K, K)
    rel_h = P.as_strided((B, nh, H, W, H), (s[0], s[1], s[2] + 1, s[3], 1))
    size_w, stride_w = (B, nh, H, W, W + pad), (s[0], s[1], s[2], s[3] + 1, 1)
    if fresh:
        rel_w = P.as_strided(size_w, stride_w, 2 * H - 1)
    else:
        rel_w = P[..., 2 * H - 1 :].as_strided(size_w, stride_w)
    return rel_h, rel_w


def _rel_windows_gathered(P: torch.Tensor, pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The windows of :func:`_rel_windows` as gathers (copies): what a ``torch.jit.trace``
    records, and what TorchScript and ONNX can save (the strided views' custom backward cannot)."""
    B, nh, H, W, K = P.shape
    ih = torch.arange(H, device=P.device)[:, None, None]
    iw = torch.arange(W, device=P.device)[None, :, None]
    idx_h = ih + torch.arange(H, device=P.device)  # H 1 H: P[..., ih, iw, ih + t]
    idx_w = 2 * H - 1 + iw + torch.arange(W + pad, device=P.device)  # 1 W (W + pad)
    rel_h = P.gather(-1, idx_h.expand(H, W, H).expand(B, nh, H, W, H))
    rel_w = P.gather(-1, idx_w.expand(H, W, W + pad).expand(B, nh, H, W, W + pad))
    return rel_h, rel_w


class _RelativeShift(torch.autograd.Function):
    """q' = [q, rel_h, rel_w] from the strided windows of P (:func:`_rel_windows`). The backward
    writes both windows' gradients into one zero-filled buffer, where autograd's as_strided
    backward would fill one buffer per window and add them (5 ops instead of 3)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, P: torch.Tensor, pad: int) -> torch.Tensor:
        P = P.contiguous()
        ctx.shape, ctx.d, ctx.pad = P.shape, q.shape[-1], pad
        return torch.cat([q, *_rel_windows(P, pad)], dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        d, H = ctx.d, ctx.shape[2]
        grad_p = grad.new_zeros(ctx.shape)
        grad_h, grad_w = _rel_windows(grad_p, ctx.pad, fresh=True)
        grad_h.copy_(grad[..., d : d + H])
        grad_w.copy_(grad[..., d + H :])
        return grad[..., :d], grad_p, None


@functools.lru_cache(maxsize=32)
def _grid_onehot(H: int, W: int, pad: int, value: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H*W, H + W + pad): row n = (i, j) of an H x W grid holds one-hots of H - 1 - i and of
    W - 1 - j times ``value``, then zeros (cached)."""
    rows = torch.arange(H, device=device).repeat_interleave(W)
    cols = torch.arange(W, device=device).repeat(H)
    out = torch.zeros(H * W, H + W + pad, device=device, dtype=dtype)
    out[torch.arange(H * W, device=device), H - 1 - rows] = value
    out[torch.arange(H * W, device=device), H + W - 1 - cols] = value
    return out


@functools.lru_cache(maxsize=32)
def _zero_rows(rows: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(rows, dim, device=device, dtype=dtype)


class TransformerBlock(nn.Module):
    """Stage-3 pre-norm ViT block (ViTDet ``Block``): attention on a B H W C grid (windows and
    relative position available) or on B N C tokens (global attention)."""

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
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, window_size, use_rel_pos, rel_pos_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvViTBase(nn.Module):
    """The ConvMAE encoder's parameters, named and shaped as in the official checkpoints, built
    from the block classes a subclass names (``patch_embed_cls``, ``conv_block_cls``,
    ``vit_block_cls``); subclasses define the computation. :class:`ConvViT` is the product's,
    :class:`~convmae_det.modeling.reference.ReferenceConvViT` the official one.

    Outputs: a dict of NCHW features ``{"s4", "s8", "s16", "s32"}`` restricted to
    ``out_features``; ``s32`` is a 2x2 max pool of ``s16``. timm's feature interface
    (:attr:`feature_info`, :meth:`forward_intermediates`) gives the same four maps as a list.
    """

    patch_embed_cls: type = None
    conv_block_cls: type = None
    vit_block_cls: type = None

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
        check_stage3_indexes(window_block_indexes, depths[2])
        if pretrain_img_size % 16 != 0:
            raise ValueError(f"pretrain_img_size {pretrain_img_size} is not a multiple of 16")
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_heads = num_heads
        self.pretrain_img_size = pretrain_img_size
        self._out_features = tuple(out_features)
        d1, d2, d3 = embed_dims

        self.patch_embed1 = self.patch_embed_cls(in_chans, d1, 4)
        self.patch_embed2 = self.patch_embed_cls(d1, d2, 2)
        self.patch_embed3 = self.patch_embed_cls(d2, d3, 2)
        self.patch_embed4 = nn.Linear(d3, d3)
        grid = pretrain_img_size // 16
        self.pos_embed = nn.Parameter(
            get_2d_sincos_pos_embed(d3, grid).unsqueeze(0), requires_grad=pos_embed_trainable
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: also under a meta device
        self.blocks1 = nn.ModuleList(
            [self.conv_block_cls(d1, mlp_ratio, dpr[i], norm_eps=conv_norm_eps) for i in range(depths[0])]
        )
        self.blocks2 = nn.ModuleList(
            [self.conv_block_cls(d2, mlp_ratio, dpr[depths[0] + i], norm_eps=conv_norm_eps) for i in range(depths[1])]
        )
        rel_pos_grid = tuple(rel_pos_grid) if rel_pos_grid else (grid, grid)
        self.blocks3 = nn.ModuleList(
            [
                self.vit_block_cls(
                    d3,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[depths[0] + depths[1] + i],
                    norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
                    window_size=window_size if i in window_block_indexes else 0,
                    use_rel_pos=use_rel_pos,
                    rel_pos_size=rel_pos_grid,
                )
                for i in range(depths[2])
            ]
        )
        # timm's feature metadata (FeatureInfo): the four maps of forward_intermediates
        self.feature_info = [
            dict(num_chs=d1, reduction=4, module="blocks1"),
            dict(num_chs=d2, reduction=8, module="blocks2"),
            dict(num_chs=d3, reduction=16, module="blocks3"),
            dict(num_chs=d3, reduction=32, module="blocks3"),  # a 2x2 max pool of blocks3's output
        ]
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

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of each output of ``out_features``, as a detectron2 ``Backbone``
        reports them (what :class:`~convmae_det.modeling.pyramid.SimpleFeaturePyramid` reads)."""
        ch, st = self.out_feature_channels, self.out_feature_strides
        return {f: ShapeSpec(channels=ch[f], stride=st[f]) for f in self._out_features}

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        H, W = x.shape[-2:]
        if H % 16 or W % 16:
            raise ValueError(f"ConvViT input {H}x{W}: height and width must be multiples of 16")

    def forward_stages(
        self, x: torch.Tensor, conv_only: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The three stages' NCHW outputs (s4, s8, s16) of B 3 H W images; with ``conv_only``
        stage 3 is skipped and s16 is None. Defined by the subclass."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward_stages")

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The NCHW outputs named by ``out_features``; ``s32`` is a 2x2 max pool of ``s16``."""
        s4, s8, s16 = self.forward_stages(x)
        outs = {"s4": s4, "s8": s8, "s16": s16}
        if "s32" in self._out_features:
            outs["s32"] = F.max_pool2d(s16, kernel_size=2, stride=2)
        return {k: outs[k] for k in self._out_features}

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature interface (``features_only=True`` calls it): the NCHW maps of
        :attr:`feature_info` picked by ``indices`` (0-3 = strides 4, 8, 16, 32; an int n takes
        the last n, None all), whatever ``out_features`` is. Returns the list, or (the stride-16
        map, the list) unless ``intermediates_only``. ``stop_early`` with ``intermediates_only``
        skips stage 3 when only strides 4 and 8 are taken. There is no final norm to apply."""
        if output_fmt != "NCHW":
            raise ValueError(f"ConvViT features are NCHW, got output_fmt {output_fmt!r}")
        if norm:
            raise ValueError("the ConvViT encoder has no final norm: forward_intermediates takes norm=False")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        s4, s8, s16 = self.forward_stages(x, conv_only=stop_early and intermediates_only and max_index < 2)
        maps = [s4, s8, s16, F.max_pool2d(s16, kernel_size=2, stride=2) if 3 in take else None]
        feats = [maps[i] for i in take]
        return feats if intermediates_only else (s16, feats)


class ConvViT(ConvViTBase):
    """ConvMAE encoder, channels-last throughout (see the module docstring).

    ``forward`` takes B 3 H W images with H and W multiples of 16 (a detection backbone further
    needs multiples of 32 for its stride-32 output) and returns NCHW views of B H W C memory.
    How blocks run is set with :meth:`set_grad_checkpointing` and :meth:`set_compile`.
    """

    patch_embed_cls = PatchEmbed
    conv_block_cls = ConvBlock
    vit_block_cls = TransformerBlock

    def __init__(self, *, use_act_checkpoint: bool = False, compile_blocks: bool = False, **kwargs):
        """``kwargs``: see :class:`ConvViTBase`. ``use_act_checkpoint`` and ``compile_blocks``
        set :meth:`set_grad_checkpointing` and :meth:`set_compile`."""
        super().__init__(**kwargs)
        self.runner = BlockRunner(compile=compile_blocks, checkpoint=use_act_checkpoint)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them
        (training only; see :class:`~convmae_det.modeling.runner.BlockRunner`)."""
        self.runner.checkpoint = bool(enable)

    def set_compile(self, enable: bool = True) -> None:
        """Run every block through ``torch.compile``: one compiled graph per class of block and
        input shape, shared by the blocks of that class, rather than one graph of the whole
        encoder. The first step of each shape pays the compilation."""
        self.runner.compile = bool(enable)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, *args) -> torch.Tensor:
        for blk in blocks:
            x = self.runner(blk.forward, x, *args)
        return x

    def forward_conv_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stages 1-2 and the stage-3 patch embedding of B 3 H W images. Returns B H W C grids:
        (s4, s8, tokens), the tokens after ``patch_embed4`` and before the position embedding."""
        self._check_input(x)
        # The loops rebind x in this frame, so that in inference each block's input is freed
        # after the block: a call _run(blocks, f(x)) would hold f(x) until the stage ends.
        x = self.patch_embed1(x.permute(0, 2, 3, 1))
        for blk in self.blocks1:
            x = self.runner(blk.forward, x)
        s4 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = self.runner(blk.forward, x)
        s8 = x
        return s4, s8, self.patch_embed4(self.patch_embed3(x))

    def forward_stages(
        self, x: torch.Tensor, conv_only: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        s4, s8, x = self.forward_conv_stages(x)
        s4, s8 = s4.permute(0, 3, 1, 2), s8.permute(0, 3, 1, 2)  # B H W C -> B C H W views
        if conv_only:
            return s4, s8, None
        x = x + resample_abs_pos(self.pos_embed, x.shape[1:3], separable=True)
        for blk in self.blocks3:
            x = self.runner(blk.forward, x)
        return s4, s8, x.permute(0, 3, 1, 2)
