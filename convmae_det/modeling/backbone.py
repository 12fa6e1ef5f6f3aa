"""Thin detectron2 builders: read the config, build the pure modules with keyword arguments.

``MODEL.CONVMAE.IMPL`` is read here and nowhere else: "fast" builds the product modules,
"eager" the reference (:mod:`convmae_det.modeling.reference`, what the official code computes:
NCHW conv stages, explicit attention, a plain NCHW pyramid), with the same parameter names.
"""
import math

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from .convvit import GLOBAL_ATTN_INDEXES, ConvViT, ConvViTBase, check_stage3_indexes, convvit_kwargs
from .pyramid import MultiScaleSimpleFeaturePyramid, SimpleFeaturePyramid, last_level_max_pool
from .reference import ReferenceConvViT

IMPLS = ("fast", "eager")

__all__ = ["build_convvit_from_cfg", "build_convmae_sfp_backbone", "build_convmae_msfp_backbone", "global_attn_indexes"]


def _uses_reference(cfg) -> bool:
    impl = cfg.MODEL.CONVMAE.IMPL
    if impl not in IMPLS:
        raise ValueError(f"MODEL.CONVMAE.IMPL must be one of {IMPLS}, got {impl!r}")
    return impl == "eager"


def global_attn_indexes(c, depth: int) -> list:
    """The global-attention blocks of ``c`` = cfg.MODEL.CONVMAE for a stage 3 of ``depth``
    blocks: GLOBAL_ATTN_INDEXES, or where it is empty the size's own
    (:data:`~convmae_det.modeling.convvit.GLOBAL_ATTN_INDEXES`). ValueError naming the key if
    they are not blocks of the stage."""
    if c.GLOBAL_ATTN_INDEXES:
        indexes = list(c.GLOBAL_ATTN_INDEXES)
        check_stage3_indexes(indexes, depth, f"MODEL.CONVMAE.GLOBAL_ATTN_INDEXES (size {c.SIZE!r})")
        return indexes
    if c.SIZE not in GLOBAL_ATTN_INDEXES:
        raise ValueError(f"unknown MODEL.CONVMAE.SIZE {c.SIZE!r}; expected one of {sorted(GLOBAL_ATTN_INDEXES)}")
    indexes = list(GLOBAL_ATTN_INDEXES[c.SIZE])
    try:
        check_stage3_indexes(indexes, depth, f"MODEL.CONVMAE.GLOBAL_ATTN_INDEXES is empty, and the {c.SIZE!r} size's own")
    except ValueError as e:  # MODEL.CONVMAE.DEPTHS changed the size's depth
        raise ValueError(f"{e}: set MODEL.CONVMAE.GLOBAL_ATTN_INDEXES for this depth") from None
    return indexes


def build_convvit_from_cfg(cfg, out_features) -> ConvViTBase:
    """The encoder of MODEL.CONVMAE: :class:`ConvViT`, or the reference for IMPL eager."""
    c = cfg.MODEL.CONVMAE
    kwargs = convvit_kwargs(
        c.SIZE,
        embed_dims=tuple(c.EMBED_DIMS) or None,
        depths=tuple(c.DEPTHS) or None,
        num_heads=c.NUM_HEADS or None,
    )
    depth = kwargs["depths"][2]
    global_blocks = global_attn_indexes(c, depth)
    if c.REL_POS_IMG_SIZE % 16:
        raise ValueError(f"MODEL.CONVMAE.REL_POS_IMG_SIZE {c.REL_POS_IMG_SIZE} is not a multiple of 16")
    grid = c.REL_POS_IMG_SIZE // 16
    if _uses_reference(cfg):
        cls, extra = ReferenceConvViT, {}
    else:
        cls, extra = ConvViT, {"compile_blocks": c.COMPILE}
    return cls(
        **kwargs,
        **extra,
        mlp_ratio=c.MLP_RATIO,
        pretrain_img_size=c.PRETRAIN_IMG_SIZE,
        drop_path_rate=c.DROP_PATH_RATE,
        conv_norm_eps=c.CONV_NORM_EPS,
        window_size=c.WINDOW_SIZE,
        window_block_indexes=[i for i in range(depth) if i not in global_blocks],
        use_rel_pos=c.USE_REL_POS,
        rel_pos_grid=(grid, grid),
        use_act_checkpoint=c.USE_ACT_CHECKPOINT,
        out_features=out_features,
    )


def _check_input(cfg, input_shape: ShapeSpec):
    if input_shape.channels != 3:
        raise ValueError(f"ConvMAE backbones take 3-channel images, got {input_shape.channels} (INPUT.FORMAT?)")


def _check_head_features(cfg, backbone):
    """The R-CNN heads' IN_FEATURES must be pyramid levels: a clear error here rather than
    detectron2's KeyError (e.g. 'res4', a ResNet config's) when the heads are built."""
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        return backbone
    have = list(backbone.output_shape())
    keys = [("MODEL.ROI_HEADS.IN_FEATURES", cfg.MODEL.ROI_HEADS.IN_FEATURES)]
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN":
        keys.insert(0, ("MODEL.RPN.IN_FEATURES", cfg.MODEL.RPN.IN_FEATURES))
    for key, names in keys:
        missing = [f for f in names if f not in have]
        if missing:
            raise ValueError(f"{key} {list(names)} names {missing}, which the ConvMAE pyramid does not output ({have})")
    return backbone


@BACKBONE_REGISTRY.register()
def build_convmae_sfp_backbone(cfg, input_shape: ShapeSpec):
    """ConvViT + ViTDet simple feature pyramid from the stride-16 output (p2-p6)."""
    _check_input(cfg, input_shape)
    c = cfg.MODEL.CONVMAE
    scale_factors = tuple(c.PYRAMID.SCALE_FACTORS)
    last_level = f"p{int(math.log2(16 / min(scale_factors)))}" if scale_factors else "p5"
    return _check_head_features(cfg, SimpleFeaturePyramid(
        build_convvit_from_cfg(cfg, out_features=("s16",)),
        in_feature="s16",
        out_channels=c.PYRAMID.OUT_CHANNELS,
        scale_factors=scale_factors,
        top_block=last_level_max_pool(last_level),  # p6 (a max pool of the last level)
        norm="LN",
        square_pad=c.SQUARE_PAD,
        channels_last=not _uses_reference(cfg),
        feature_norm=c.PYRAMID.FEATURE_NORM,
    ))


@BACKBONE_REGISTRY.register()
def build_convmae_msfp_backbone(cfg, input_shape: ShapeSpec):
    """ConvViT + multi-scale simple pyramid from the stride 4/8/16/32 features (p2-p6, or the
    levels of MODEL.CONVMAE.PYRAMID.MSFP_IN_FEATURES)."""
    _check_input(cfg, input_shape)
    c = cfg.MODEL.CONVMAE
    in_features = tuple(c.PYRAMID.MSFP_IN_FEATURES)
    return _check_head_features(cfg, MultiScaleSimpleFeaturePyramid(
        build_convvit_from_cfg(cfg, out_features=in_features),
        out_channels=c.PYRAMID.OUT_CHANNELS,
        square_pad=c.SQUARE_PAD,
        in_features=in_features,
        channels_last=not _uses_reference(cfg),
        feature_norm=c.PYRAMID.FEATURE_NORM,
    ))
