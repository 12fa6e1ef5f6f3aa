"""ConvMAE masked autoencoder (reference section 2) on the detection backbone's encoder.

:class:`ConvMAE` *is* a :class:`~convmae_det.modeling.ConvViT` (same blocks, same parameter
names) plus the pretraining-only parts, named as in the official checkpoints: ``norm``,
``stage1_output_decode``, ``stage2_output_decode`` and the ``decoder_*`` modules. An official
full pretraining checkpoint therefore loads with ``strict=True``.

Mask convention (as in MAE): ``mask`` is (B, L) over the stage-3 grid with 1 = masked (removed)
and 0 = visible; the conv stages receive the upsampled visibility ``1 - mask``.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modeling.convvit import ConvViT, TransformerBlock, _conv_nhwc, convvit_kwargs, patch_linear
from ..modeling.layers import get_2d_sincos_pos_embed, resample_abs_pos

__all__ = [
    "ConvMAE",
    "random_masking",
    "complementary_masks",
    "upsample_mask",
    "patchify",
    "unpatchify",
    "convmae_pretrain",
]


def random_masking(
    batch: int, grid: Tuple[int, int], mask_ratio: float, device=None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Block-wise random mask on the stage-3 grid: (B, H*W) with exactly round(L * ratio) ones
    (1 = masked) per image, drawn from ``generator`` when given."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    L = grid[0] * grid[1]
    num_masked = int(round(L * mask_ratio))
    noise = torch.rand(batch, L, generator=generator, device=generator.device if generator is not None else device)
    ids = noise.argsort(dim=1)
    mask = torch.zeros(batch, L, device=noise.device)
    mask.scatter_(1, ids[:, :num_masked], 1.0)
    return mask.to(device) if device is not None else mask


def complementary_masks(
    batch: int, grid: Tuple[int, int], num_views: int, device=None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``num_views`` disjoint visible sets per image that together cover the grid (FastConvMAE).

    Returns (num_views, B, L) masks (1 = masked): view k keeps the k-th of ``num_views`` equal
    slices of a random permutation of the positions, so its mask ratio is 1 - 1/num_views and
    every position is visible in exactly one view and a reconstruction target in the others.
    """
    L = grid[0] * grid[1]
    if num_views < 2 or L % num_views:
        raise ValueError(f"complementary masking needs 2 <= num_views dividing the {L} positions, got {num_views}")
    noise = torch.rand(batch, L, generator=generator, device=generator.device if generator is not None else device)
    ids = noise.argsort(dim=1).reshape(batch, num_views, L // num_views)
    masks = torch.ones(num_views, batch, L, device=noise.device)
    for k in range(num_views):
        masks[k].scatter_(1, ids[:, k], 0.0)
    return masks.to(device) if device is not None else masks


def _strided_linear(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A conv with kernel = stride on patch-major cells B Lv S S C -> B Lv S/p S/p C'."""
    B, Lv = x.shape[:2]
    y = patch_linear(conv, x.flatten(0, 1))
    return y.reshape(B, Lv, *y.shape[1:])


def upsample_mask(mask: torch.Tensor, grid: Tuple[int, int], factor: int) -> torch.Tensor:
    """(B, H*W) stage-3 mask -> (B, 1, H*factor, W*factor) by nearest repetition."""
    B = mask.shape[0]
    m = mask.reshape(B, 1, grid[0], grid[1])
    return m.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def patchify(imgs: torch.Tensor, p: int = 16) -> torch.Tensor:
    """B 3 H W -> B L (p*p*3), patches in row-major order, pixels (p, p, 3) as in MAE."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    # B C h p w p -> B h w p p C
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, grid: Tuple[int, int], p: int = 16) -> torch.Tensor:
    """Inverse of :func:`patchify`: B L (p*p*3) -> B 3 H W."""
    B = x.shape[0]
    h, w = grid
    x = x.reshape(B, h, w, p, p, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, h * p, w * p)


class ConvMAE(ConvViT):
    """ConvMAE pretraining model. ``forward(imgs)`` returns (loss, pred, mask)."""

    def __init__(
        self,
        *,
        embed_dims=(256, 384, 768),
        depths=(2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        img_size: int = 224,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        conv_norm_eps: float = 1e-5,
        drop_path_rate: float = 0.0,
        use_act_checkpoint: bool = False,
        impl: str = "fast",
        sparse: bool = True,
    ):
        super().__init__(
            embed_dims=embed_dims,
            depths=depths,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            pretrain_img_size=img_size,
            drop_path_rate=drop_path_rate,
            conv_norm_eps=conv_norm_eps,
            pos_embed_trainable=False,
            use_act_checkpoint=use_act_checkpoint,
            impl=impl,
            out_features=("s16",),
        )
        d1, d2, d3 = self.embed_dims
        self.img_size = img_size
        self.patch_size = 16
        self.norm_pix_loss = norm_pix_loss
        self.sparse = sparse
        self.norm = nn.LayerNorm(d3, eps=1e-6)
        self.stage1_output_decode = nn.Conv2d(d1, d3, 4, stride=4)
        self.stage2_output_decode = nn.Conv2d(d2, d3, 2, stride=2)

        grid = img_size // 16
        self.decoder_embed = nn.Linear(d3, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            get_2d_sincos_pos_embed(decoder_embed_dim, grid).unsqueeze(0), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                TransformerBlock(
                    decoder_embed_dim, decoder_num_heads, mlp_ratio,
                    norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6),
                    attn_impl="sdpa" if impl == "fast" else "eager",
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_norm, self.decoder_pred, self.norm, *self.decoder_blocks]:
            m.apply(self._init_weights)

    def grid_of(self, imgs: torch.Tensor) -> Tuple[int, int]:
        H, W = imgs.shape[-2:]
        if H % 16 or W % 16:
            raise ValueError(f"pretraining input {H}x{W}: height and width must be multiples of 16")
        return H // 16, W // 16

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs: B 3 H W; mask: (B, L) with 1 = masked, the same count per image.

        Returns the normalised visible tokens (B, L_vis, C3), in ascending position order: stage 3
        on the visible tokens only, fused with the stage-1/2 features at the visible positions.
        Stages 1-2 run either on the full grid with masked convolution (``sparse=False``, the
        official computation) or only at the visible positions (``sparse=True``, the default):
        with masked convolution no masked position ever reaches a visible output, so only the
        depthwise conv needs the grid (zeros at masked positions) and every other op runs on
        the visible cells. Both give the same result.
        """
        grid = self.grid_of(imgs)
        B, L = mask.shape
        if L != grid[0] * grid[1]:
            raise ValueError(f"mask has {L} positions, the {imgs.shape[-2]}x{imgs.shape[-1]} input has {grid[0] * grid[1]}")
        num_vis = (mask == 0).sum(1)
        if not torch.all(num_vis == num_vis[0]):
            raise ValueError(f"every image must keep the same number of visible tokens, got {num_vis.tolist()}")
        ids_keep = torch.nonzero(mask == 0)[:, 1].reshape(B, -1)  # ascending visible positions
        if self.sparse:
            s4, s8, x = self._conv_stages_sparse(imgs, ids_keep, grid)
            x = x + resample_abs_pos(self.pos_embed, grid).reshape(1, L, -1)[0][ids_keep]
            for blk in self.blocks3:
                x = self._run(blk, x)
            fused1 = _strided_linear(self.stage1_output_decode, s4).flatten(2)  # B Lv C3
            fused2 = _strided_linear(self.stage2_output_decode, s8).flatten(2)
            return self.norm(x + fused1 + fused2)

        visible = 1.0 - mask.to(imgs.dtype)
        s4, s8, x = self.forward_conv_stages(imgs, (upsample_mask(visible, grid, 4), upsample_mask(visible, grid, 2)))
        x = x + resample_abs_pos(self.pos_embed, grid)  # B h w C

        def gather(t):  # B L C -> B L_vis C
            return torch.gather(t, 1, ids_keep[..., None].expand(-1, -1, t.shape[-1]))

        x = gather(x.flatten(1, 2))
        for blk in self.blocks3:
            x = self._run(blk, x)
        # B C h w -> B L C, then the visible positions
        fused1 = gather(self.stage1_output_decode(s4).flatten(2).transpose(1, 2))
        fused2 = gather(self.stage2_output_decode(s8).flatten(2).transpose(1, 2))
        return self.norm(x + fused1 + fused2)

    def _conv_stages_sparse(self, imgs: torch.Tensor, ids_keep: torch.Tensor, grid: Tuple[int, int]):
        """Stages 1-2 at the visible 16x16 patches only, patch-major: B Lv S S C with S = 4
        cells per patch side in stage 1, 2 in stage 2. Returns (s4, s8, stage-3 tokens B Lv C3)."""
        B, Lv = ids_keep.shape
        h, w = grid
        batch = torch.arange(B, device=imgs.device)[:, None]

        def to_grid(y: torch.Tensor) -> torch.Tensor:  # B Lv S S C -> B hS wS C, zeros where masked
            S, C = y.shape[2], y.shape[-1]
            full = y.new_zeros(B, h * w, S, S, C).index_put((batch, ids_keep), y)
            return full.reshape(B, h, w, S, S, C).permute(0, 1, 3, 2, 4, 5).reshape(B, h * S, w * S, C)

        def from_grid(y: torch.Tensor, S: int) -> torch.Tensor:  # B hS wS C -> B Lv S S C
            C = y.shape[-1]
            y = y.reshape(B, h, S, w, S, C).permute(0, 1, 3, 2, 4, 5).reshape(B, h * w, S, S, C)
            return y[batch, ids_keep]

        def block(blk, x):  # only the depthwise conv needs the grid
            return blk.forward_nhwc(x, depthwise=lambda y: from_grid(_conv_nhwc(blk.attn, to_grid(y)), y.shape[2]))

        def embed(pe, x):
            B, Lv = x.shape[:2]
            y = pe.forward_nhwc(x.flatten(0, 1))
            return y.reshape(B, Lv, *y.shape[1:])

        # B 3 H W -> B h 16 w 16 3 -> B L 16 16 3 -> visible patches
        pixels = imgs.permute(0, 2, 3, 1).reshape(B, h, 16, w, 16, 3).permute(0, 1, 3, 2, 4, 5)
        x = embed(self.patch_embed1, pixels.reshape(B, h * w, 16, 16, 3)[batch, ids_keep])
        for blk in self.blocks1:
            x = self._run(block, blk, x)
        s4 = x
        x = embed(self.patch_embed2, x)
        for blk in self.blocks2:
            x = self._run(block, blk, x)
        s8 = x
        x = embed(self.patch_embed3, x).reshape(B, Lv, -1)
        return s4, s8, self.patch_embed4(x)

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """x: (B, L_vis, C3) visible tokens; returns per-patch pixel predictions (B, L, 16*16*3)."""
        x = self.decoder_embed(x)
        B, L = mask.shape
        full = self.mask_token.to(x.dtype).expand(B, L, -1).clone()
        full[mask == 0] = x.reshape(-1, x.shape[-1])  # visible tokens back at their positions
        pos = resample_abs_pos(self.decoder_pos_embed, grid).reshape(1, L, -1)
        x = full + pos
        for blk in self.decoder_blocks:
            x = self._run(blk, x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on masked patches only; per-patch normalised targets if norm_pix_loss."""
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target).pow(2).mean(dim=-1)  # B L
        return (loss * mask).sum() / mask.sum()

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
        :func:`complementary_masks`) and reconstructs all K views in this step; the batch the
        encoder and decoder see is then K * B, view-major.
        Returns (loss, pred (B', L, 768), mask (B', L)) with B' = B or K * B.
        """
        grid = self.grid_of(imgs)
        if complementary > 1:
            if mask is not None:
                raise ValueError("pass either an explicit mask or complementary=K, not both")
            B = imgs.shape[0]
            mask = complementary_masks(B, grid, complementary, device=imgs.device, generator=generator)
            mask = mask.reshape(complementary * B, -1)
            imgs = imgs.repeat(complementary, 1, 1, 1)
        elif mask is None:
            mask = random_masking(imgs.shape[0], grid, mask_ratio, device=imgs.device, generator=generator)
        mask = mask.to(imgs.device, torch.float32)
        if mask.sum() == 0:
            raise ValueError("the mask hides no patch: the loss is computed on masked patches only")
        latent = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(latent, mask, grid)
        return self.forward_loss(imgs, pred, mask), pred, mask


def convmae_pretrain(size: str = "base", **kwargs) -> ConvMAE:
    """A :class:`ConvMAE` of a named encoder size (tiny, small, base, large)."""
    return ConvMAE(**convvit_kwargs(size), **kwargs)
