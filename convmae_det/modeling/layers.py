"""Stateless helpers and small layers shared by the encoder, the pyramid and the heads.

Everything here is a pure function or a parameter-light ``nn.Module`` with no config inside.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LayerNorm2d",
    "D2LayerNorm",
    "window_partition",
    "window_unpartition",
    "get_rel_pos",
    "resize_rel_pos",
    "decomposed_rel_pos",
    "resample_abs_pos",
    "get_2d_sincos_pos_embed",
]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor, or, with ``channels_last``, of a
    B H W C tensor (no permute).

    Subclasses ``nn.LayerNorm`` so that its parameters are named ``weight``/``bias`` like the
    official checkpoints and so that optimizers that exempt norms from weight decay see it.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, channels_last: bool = False):
        super().__init__(num_channels, eps=eps)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # B C H W -> B H W C -> normalise over C -> B C H W
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class D2LayerNorm(LayerNorm2d):
    """The channel LayerNorm of the pyramid and the heads: ``detectron2.layers.LayerNorm``
    (ViTDet's "LN") in the official model.

    Same computation as :class:`LayerNorm2d`; a class of its own because the official recipe
    treats it differently: detectron2's ``LayerNorm`` is no ``torch.nn`` norm type, so
    ``get_default_optimizer_params(weight_decay_norm=0)`` decays its parameters like weights,
    while the encoder's conv-stage norms (``torch.nn.LayerNorm`` officially) get no decay.
    """


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Split a B H W C grid into non-overlapping windows, zero-padding bottom and right.

    Returns windows of shape (B * num_windows, window_size, window_size, C) and the padded
    grid size (Hp, Wp).
    """
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    # B Hp Wp C -> B nH ws nW ws C -> B nH nW ws ws C -> (B nH nW) ws ws C
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows -> B H W C, dropping the padding."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    # (B nH nW) ws ws C -> B nH nW ws ws C -> B nH ws nW ws C -> B Hp Wp C
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


def resize_rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """A relative-position table (L, C) for an axis of ``size`` positions: 2 * size - 1 entries,
    entry ``size - 1 + d`` for the offset d = query - key. A table of another length is resized
    by 1-D linear interpolation (ViTDet)."""
    length = 2 * size - 1
    if rel_pos.shape[0] == length:
        return rel_pos
    # (L, C) -> (1, C, L) -> interpolate -> (length, C)
    return F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()


def get_rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather a relative-position table for a query/key axis of length ``size``.

    ``rel_pos`` is (L, C), resized by :func:`resize_rel_pos` if needed. Returns (size, size, C)
    indexed by (query, key) with entry ``rel_pos[q - k + size - 1]``.
    """
    rel_pos = resize_rel_pos(size, rel_pos)
    return rel_pos[_cached(_rel_index)(size, rel_pos.device)]


def _cached(fn):
    """The lru-cached ``fn``, or the plain function while torch.compile traces (it inlines it)."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


@functools.lru_cache(maxsize=64)
def _rel_index(size: int, device: torch.device) -> torch.Tensor:
    """(size, size) index of query q and key k into a relative-position table: q - k + size - 1."""
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + (size - 1)


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """(size_out, size_in) matrix of 1-D bicubic resampling (align_corners=False), obtained by
    resampling the identity with F.interpolate: 2-D bicubic resampling is the product of two."""
    eye = torch.eye(size_in, device=device).reshape(1, size_in, size_in, 1)  # channels = basis vectors
    return F.interpolate(eye, size=(size_out, 1), mode="bicubic", align_corners=False)[0, :, :, 0].t().contiguous()


def decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ViTDet's decomposed relative-position terms, computed with the *unscaled* query.

    q: (B, H*W, C). Returns rel_h (B, H, W, H) and rel_w (B, H, W, W); the logit of query
    (i, j) and key (k, l) receives ``rel_h[:, i, j, k] + rel_w[:, i, j, l]``.
    """
    H, W = hw
    Rh = get_rel_pos(H, rel_pos_h)  # H H C
    Rw = get_rel_pos(W, rel_pos_w)  # W W C
    B, _, C = q.shape
    r_q = q.reshape(B, H, W, C)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    return rel_h, rel_w


def resample_abs_pos(pos_embed: torch.Tensor, hw: Tuple[int, int], separable: bool = False) -> torch.Tensor:
    """Resample a square absolute position embedding (1, N, C) to a (1, H, W, C) grid.

    Bicubic, align_corners=False, as in ViTDet and the official ConvMAE detection code. The
    embedding is returned unchanged (reshaped) when the grid already matches.
    ``separable=True`` computes the same resampling as two small matmuls with 1-D bicubic
    matrices (in fp32): F.interpolate's bicubic kernels loop over channels in each thread, and
    on an H200 its forward and backward took 5.8 ms of a 66 ms ConvMAE-B step at 1024.
    """
    n = pos_embed.shape[1]
    size = int(round(math.sqrt(n)))
    if size * size != n:
        raise ValueError(f"position embedding has {n} positions, expected a square number")
    H, W = hw
    grid = pos_embed.reshape(1, size, size, -1)
    if (size, size) == (H, W):
        return grid
    if separable:
        mh = _cached(_bicubic_matrix)(size, H, pos_embed.device)
        mw = _cached(_bicubic_matrix)(size, W, pos_embed.device)
        with torch.autocast(pos_embed.device.type, enabled=False):
            # out[i, j] = sum_h,w mh[i, h] mw[j, w] grid[h, w]
            return torch.einsum("ih,hwc,jw->ijc", mh, grid[0].float(), mw).unsqueeze(0)
    # 1 S S C -> 1 C S S -> 1 C H W -> 1 H W C
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(H, W), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of shape (grid_size**2, embed_dim), as in MAE.

    The first half of the channels encodes the column (w), the second half the row (h).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor, dim: int) -> torch.Tensor:
        omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([encode(grid_w, embed_dim // 2), encode(grid_h, embed_dim // 2)], dim=1)
    return emb.to(dtype or torch.get_default_dtype())
