"""Thin detectron2 builders: read the config, build the pure modules with keyword arguments."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from .convvit import ConvViT, convvit_kwargs
from .pyramid import MultiScaleSimpleFeaturePyramid, SimpleFeaturePyramid

__all__ = ["build_convvit_from_cfg", "build_convmae_sfp_backbone", "build_convmae_msfp_backbone"]


def build_convvit_from_cfg(cfg, out_features) -> ConvViT:
    c = cfg.MODEL.CONVMAE
    kwargs = convvit_kwargs(
        c.SIZE,
        embed_dims=tuple(c.EMBED_DIMS) or None,
        depths=tuple(c.DEPTHS) or None,
        num_heads=c.NUM_HEADS or None,
    )
    depth = kwargs["depths"][2]
    bad = [i for i in c.GLOBAL_ATTN_INDEXES if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"MODEL.CONVMAE.GLOBAL_ATTN_INDEXES {list(c.GLOBAL_ATTN_INDEXES)} has {bad}, outside the "
            f"{depth} stage-3 blocks of size {c.SIZE!r}"
        )
    if c.REL_POS_IMG_SIZE % 16:
        raise ValueError(f"MODEL.CONVMAE.REL_POS_IMG_SIZE {c.REL_POS_IMG_SIZE} is not a multiple of 16")
    grid = c.REL_POS_IMG_SIZE // 16
    return ConvViT(
        **kwargs,
        mlp_ratio=c.MLP_RATIO,
        pretrain_img_size=c.PRETRAIN_IMG_SIZE,
        drop_path_rate=c.DROP_PATH_RATE,
        conv_norm_eps=c.CONV_NORM_EPS,
        window_size=c.WINDOW_SIZE,
        window_block_indexes=[i for i in range(depth) if i not in c.GLOBAL_ATTN_INDEXES],
        use_rel_pos=c.USE_REL_POS,
        rel_pos_grid=(grid, grid),
        use_act_checkpoint=c.USE_ACT_CHECKPOINT,
        impl=c.IMPL,
        out_features=out_features,
        compile_blocks=c.COMPILE,
    )


def _check_input(cfg, input_shape: ShapeSpec):
    if input_shape.channels != 3:
        raise ValueError(f"ConvMAE backbones take 3-channel images, got {input_shape.channels} (INPUT.FORMAT?)")


@BACKBONE_REGISTRY.register()
def build_convmae_sfp_backbone(cfg, input_shape: ShapeSpec):
    """ConvViT + ViTDet simple feature pyramid from the stride-16 output (p2-p6)."""
    _check_input(cfg, input_shape)
    c = cfg.MODEL.CONVMAE
    return SimpleFeaturePyramid(
        build_convvit_from_cfg(cfg, out_features=("s16",)),
        out_channels=c.PYRAMID.OUT_CHANNELS,
        scale_factors=tuple(c.PYRAMID.SCALE_FACTORS),
        square_pad=c.SQUARE_PAD,
    )


@BACKBONE_REGISTRY.register()
def build_convmae_msfp_backbone(cfg, input_shape: ShapeSpec):
    """ConvViT + multi-scale simple pyramid from the stride 4/8/16/32 features (p2-p6, or the
    levels of MODEL.CONVMAE.PYRAMID.MSFP_IN_FEATURES)."""
    _check_input(cfg, input_shape)
    c = cfg.MODEL.CONVMAE
    in_features = tuple(c.PYRAMID.MSFP_IN_FEATURES)
    return MultiScaleSimpleFeaturePyramid(
        build_convvit_from_cfg(cfg, out_features=in_features),
        out_channels=c.PYRAMID.OUT_CHANNELS,
        square_pad=c.SQUARE_PAD,
        in_features=in_features,
    )
