"""ConvMAE modules and their detectron2 registrations (importing this fills the registries)."""
from .backbone import build_convmae_msfp_backbone, build_convmae_sfp_backbone, build_convvit_from_cfg
from .convvit import (
    CONVVIT_SIZES,
    Attention,
    ConvBlock,
    ConvViT,
    ConvViTBase,
    PatchEmbed,
    TransformerBlock,
    convvit_kwargs,
)
from .heads import ConvMAEConvFCHead, ConvMAEMaskHead, ConvMAEROIHeads, resolve_norm
from .layers import D2LayerNorm, LayerNorm2d
from .pyramid import MultiScaleSimpleFeaturePyramid, SimpleFeaturePyramid
from .reference import ReferenceConvMAE, ReferenceConvViT
from .runner import BlockRunner

__all__ = [
    "CONVVIT_SIZES",
    "Attention",
    "BlockRunner",
    "ConvBlock",
    "ConvViT",
    "ConvViTBase",
    "PatchEmbed",
    "TransformerBlock",
    "convvit_kwargs",
    "LayerNorm2d",
    "D2LayerNorm",
    "SimpleFeaturePyramid",
    "MultiScaleSimpleFeaturePyramid",
    "ReferenceConvViT",
    "ReferenceConvMAE",
    "ConvMAEConvFCHead",
    "ConvMAEMaskHead",
    "ConvMAEROIHeads",
    "resolve_norm",
    "build_convmae_sfp_backbone",
    "build_convmae_msfp_backbone",
    "build_convvit_from_cfg",
]
