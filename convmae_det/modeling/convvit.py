"""ConvViT: the ConvMAE hybrid convolution-transformer encoder.

Stages 1-2 are convolutional and work in NCHW; stage 3 is a plain ViT and works on a
B H W C token grid (detection) or on a B N C token sequence (pretraining, visible tokens only).
Parameter names follow the official ConvMAE checkpoints (``patch_embed1..4``, ``blocks1..3``,
the depthwise 5x5 conv named ``attn``), so published weights load without renaming.

Two implementations compute the same function (tested equal), switched by ``impl``:

- ``"fast"``: conv stages in channels-last (B H W C) with the 1x1 convs as matmuls and the
  depthwise conv on a channels-last view, so the conv and token layouts meet without copies;
  attention by ``F.scaled_dot_product_attention`` with the relative-position term folded into
  the query and key (no N x N bias tensor, fused kernels stay eligible).
- ``"eager"``: what the official code computes: NCHW conv stages with permutes around every
  LayerNorm, explicit attention matrices with the relative-position bias added to them. Kept
  for equivalence tests and as the benchmark's baseline.
"""
import functools
import inspect
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, Mlp, trunc_normal_

from .layers import (
    LayerNorm2d,
    _cached,
    decomposed_rel_pos,
    get_2d_sincos_pos_embed,
    resample_abs_pos,
    resize_rel_pos,
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
    "patch_linear",
    "IMPLS",
]

IMPLS = ("fast", "eager")

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


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _layer_norm_nhwc(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _pointwise_nhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv applied to B H W C as a matmul (the weight keeps its conv shape)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _conv_nhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A spatial conv on B H W C: the NCHW view of a channels-last tensor costs no copy, and
    the conv returns channels-last, whose B H W C view is contiguous again."""
    y = conv(x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
    return y.permute(0, 2, 3, 1)


def patch_linear(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A conv whose kernel equals its stride, on B H W C, as one matmul over gathered patches
    (B h w p*p*C); CPU conv backward is several times slower than the matmul's."""
    B, H, W, C = x.shape
    p = conv.kernel_size[0]
    # B H W C -> B h p w p C -> B h w p p C -> B h w (p p C), the order of weight.permute(0, 2, 3, 1)
    x = x.reshape(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H // p, W // p, p * p * C)
    return F.linear(x, conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1), conv.bias)


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

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """B H W C in, B H/p W/p C' out."""
        return self.act(_layer_norm_nhwc(self.norm, patch_linear(self.proj, x)))


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

    def forward_nhwc(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        depthwise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """The same block on B H W C features; ``mask`` is B H W 1. ``depthwise`` replaces the
        call of the depthwise conv, the only op that mixes positions (sparse pretraining runs
        the block on visible cells and the conv on a zero-filled grid)."""
        y = _pointwise_nhwc(self.conv1, _layer_norm_nhwc(self.norm1, x))
        if mask is not None:
            y = y * mask
        y = depthwise(y) if depthwise is not None else _conv_nhwc(self.attn, y)
        x = x + self.drop_path(_pointwise_nhwc(self.conv2, y))
        y = _pointwise_nhwc(self.mlp.fc1, _layer_norm_nhwc(self.norm2, x))
        x = x + self.drop_path(_pointwise_nhwc(self.mlp.fc2, self.mlp.act(y)))
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
        return self.proj(self.attend_qkv(self.qkv(x), hw))

    def attend_qkv(self, qkv: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The attention between the projections: (B, N, 3C) qkv -> (B, N, C), before ``proj``."""
        B, N, C3 = qkv.shape
        C = C3 // 3
        if self.use_rel_pos and (hw is None or hw[0] * hw[1] != N):
            raise ValueError(f"relative position needs the token grid: got hw={hw} for {N} tokens")
        # B N 3C -> B N 3 heads d -> 3 B heads N d
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_impl == "sdpa":
            if self.use_rel_pos:
                x = self._sdpa_rel_pos(q, k, v, hw)
            else:
                x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if self.use_rel_pos:
                attn = attn + self._rel_pos_bias(q, hw)
            x = attn.softmax(dim=-1) @ v
        # B heads N d -> B N heads d -> B N C
        return x.transpose(1, 2).reshape(B, N, C)

    def _rel_pos_terms(self, q: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """q: B heads N d -> rel_h (B heads N H), rel_w (B heads N W)."""
        B, nh, N, d = q.shape
        rel_h, rel_w = decomposed_rel_pos(q.reshape(B * nh, N, d), self.rel_pos_h, self.rel_pos_w, hw)
        return rel_h.reshape(B, nh, N, hw[0]), rel_w.reshape(B, nh, N, hw[1])

    def _rel_pos_bias(self, q: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """The explicit B heads N N logit bias of the official code."""
        rel_h, rel_w = self._rel_pos_terms(q, hw)
        B, nh, N, _ = q.shape
        H, W = hw
        return (rel_h.view(B, nh, H, W, H)[..., :, None] + rel_w.view(B, nh, H, W, W)[..., None, :]).reshape(
            B, nh, N, N
        )

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
        q2 = _RelativeShift.apply(q.reshape(B, nh, H, W, d), P, pad).view(B, nh, N, d + H + W + pad)
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
        ws = self.window_size
        if ws == 0:
            return self.attn(x.reshape(B, H * W, C), (H, W)).view(B, H, W, C)
        if self.attn.attn_impl == "eager":  # ViTDet: zero-pad the grid, attend in windows, crop
            x, pad_hw = window_partition(x, ws)  # (B nW) ws ws C
            x = self.attn(x.reshape(-1, ws * ws, C), (ws, ws)).view(-1, ws, ws, C)
            return window_unpartition(x, ws, pad_hw, (H, W))
        # Same function, without projecting the padding: a zero-padded token's qkv is the qkv
        # bias, so project the H x W tokens without the bias, zero-pad and partition, then add it.
        bias = self.attn.qkv.bias
        if (H % ws or W % ws) and bias is not None:
            qkv, pad_hw = window_partition(F.linear(x, self.attn.qkv.weight), ws)
            qkv = qkv + bias.to(qkv.dtype)
        else:
            qkv, pad_hw = window_partition(self.attn.qkv(x), ws)
        x = self.attn.attend_qkv(qkv.reshape(-1, ws * ws, 3 * C), (ws, ws)).view(-1, ws, ws, C)
        x = window_unpartition(x, ws, pad_hw, pad_hw)
        if pad_hw != (H, W):  # crop as one op (a negative pad): slicing H and W is two in the backward
            x = F.pad(x, (0, 0, 0, W - pad_hw[1], 0, H - pad_hw[0]))
        return self.attn.proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


# attention kernels whose outputs activation checkpointing keeps rather than recomputes
_ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)


def _is_qkv_projection(op, args) -> bool:
    """addmm(bias, x, weight.t()) of a d -> 3d projection: the qkv of an attention block."""
    if op is not torch.ops.aten.addmm.default or len(args) < 3 or args[2].dim() != 2:
        return False
    return args[2].shape[1] == 3 * args[2].shape[0]


@functools.lru_cache(maxsize=None)
def _compile_function(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)  # one static graph per shape (few shapes: fixed-size inputs)


def _compiled_call(fn: Callable, args: tuple) -> Tuple[Callable, tuple]:
    """The compiled form of a block call: the block's *class* function compiled once, with the
    block passed as an argument, so that every block of a kind shares the compiled code."""
    if isinstance(fn, nn.Module):
        return _compile_function(type(fn).forward), (fn, *args)
    if inspect.ismethod(fn) and isinstance(fn.__self__, nn.Module):
        return _compile_function(fn.__func__), (fn.__self__, *args)
    return fn, args  # a closure: run as it is


def _keep_attention_outputs():
    """Selective checkpointing: recompute everything in the backward pass except the attention
    kernels and the qkv projections, whose outputs are kept. The forward is then re-run without
    a quarter of the stage-3 matmuls and without attention, the costliest op of global blocks."""

    def policy(ctx, op, *args, **kwargs):
        if op in _ATTENTION_OPS or _is_qkv_projection(op, args):
            return cp.CheckpointPolicy.MUST_SAVE
        return cp.CheckpointPolicy.PREFER_RECOMPUTE

    return cp.create_selective_checkpoint_contexts(policy)


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
        impl: str = "fast",
        out_features: Sequence[str] = ("s4", "s8", "s16", "s32"),
        compile_blocks: bool = False,
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
            use_act_checkpoint: recompute each block's activations in the backward pass
                instead of keeping them (training only). On the CPU the outputs of the attention
                kernels and of the qkv projections are kept, so those are not run twice; on a
                GPU, and for compiled blocks, each block is recomputed in full.
            impl: ``"fast"`` or ``"eager"`` (see the module docstring); same parameters.
            compile_blocks: ``torch.compile`` each block (see :meth:`compile_blocks`).
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
        self._compile = compile_blocks
        _check_impl(impl)
        self.impl = impl
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
                    attn_impl="sdpa" if impl == "fast" else "eager",
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

    def set_impl(self, impl: str) -> None:
        """Switch between the ``"fast"`` and ``"eager"`` implementations (same parameters)."""
        _check_impl(impl)
        self.impl = impl
        for blk in self.modules():
            if isinstance(blk, Attention):
                blk.attn_impl = "sdpa" if impl == "fast" else "eager"

    def compile_blocks(self, enable: bool = True) -> None:
        """Run every block through ``torch.compile`` (regional compilation: one compiled graph per
        kind of block and input shape, shared by the blocks of that kind, rather than one graph
        of the whole encoder). Fewer, fused kernels: on a GPU the eager blocks are bound by the
        launch of many small kernels. The first step of each shape pays the compilation."""
        self._compile = enable

    def _run(self, fn: Callable, *args) -> torch.Tensor:
        """Run a block ``fn(*args)``, compiled and/or checkpointed as configured."""
        if self._compile:
            fn, args = _compiled_call(fn, args)
        if self.use_act_checkpoint and self.training and torch.is_grad_enabled():
            x = next(a for a in args if torch.is_tensor(a))
            if x.device.type == "cpu" and not self._compile:
                return cp.checkpoint(fn, *args, use_reentrant=False, context_fn=_keep_attention_outputs)
            # Selective checkpointing runs a Python policy for every op. On an H200 (ConvMAE-B,
            # 1024, bf16, launch-bound) that made the step 2.8x slower in a profile, while
            # recomputing whole blocks cost +26% in tools/benchmark.py and keeps less. Compiled
            # blocks are opaque to the policy as well.
            return cp.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

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
        if self.impl == "eager":
            x = self.patch_embed1(x)
            for blk in self.blocks1:
                x = self._run(blk, x, m1)
            s4 = x
            x = self.patch_embed2(x)
            for blk in self.blocks2:
                x = self._run(blk, x, m2)
            s8 = x
            x = self.patch_embed3(x).permute(0, 2, 3, 1)  # B C H W -> B H W C
        else:
            # channels-last throughout: B H W C tensors, their NCHW views are channels_last
            m1, m2 = (m.permute(0, 2, 3, 1) if m is not None else None for m in (m1, m2))
            x = self.patch_embed1.forward_nhwc(x.permute(0, 2, 3, 1))
            for blk in self.blocks1:
                x = self._run(blk.forward_nhwc, x, m1)
            s4 = x.permute(0, 3, 1, 2)
            x = self.patch_embed2.forward_nhwc(x)
            for blk in self.blocks2:
                x = self._run(blk.forward_nhwc, x, m2)
            s8 = x.permute(0, 3, 1, 2)
            x = self.patch_embed3.forward_nhwc(x)
        return s4, s8, self.patch_embed4(x)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        s4, s8, x = self.forward_conv_stages(x)
        x = x + resample_abs_pos(self.pos_embed, x.shape[1:3], separable=self.impl == "fast")
        for blk in self.blocks3:
            x = self._run(blk, x)
        s16 = x.permute(0, 3, 1, 2)  # B H W C -> B C H W
        outs = {"s4": s4, "s8": s8, "s16": s16}
        if "s32" in self._out_features:
            outs["s32"] = F.max_pool2d(s16, kernel_size=2, stride=2)
        return {k: outs[k] for k in self._out_features}
