"""ViTDet-style ROI heads that accept NORM: "LN" on every detectron2 release.

detectron2 0.6's ``get_norm`` has no "LN", but its heads accept a callable norm; these
subclasses turn "LN" into a channel-LayerNorm factory and leave every other value alone.
Parameter names are those of detectron2's heads, so ViTDet checkpoints load.
"""
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_HEADS_REGISTRY, ROI_MASK_HEAD_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

from .layers import D2LayerNorm

__all__ = ["resolve_norm", "ConvMAEConvFCHead", "ConvMAEMaskHead", "ConvMAEROIHeads"]


def _layer_norm_2d(channels: int) -> D2LayerNorm:
    return D2LayerNorm(channels, eps=1e-6)


def resolve_norm(norm):
    """"LN" -> a channel-LayerNorm factory (eps 1e-6, as ViTDet); anything else unchanged."""
    return _layer_norm_2d if norm == "LN" else norm


@ROI_BOX_HEAD_REGISTRY.register()
class ConvMAEConvFCHead(FastRCNNConvFCHead):
    """FastRCNNConvFCHead whose ROI_BOX_HEAD.NORM may be "LN" (ViTDet: 4 conv + 1 fc, LN)."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["conv_norm"] = resolve_norm(ret["conv_norm"])
        return ret


@ROI_MASK_HEAD_REGISTRY.register()
class ConvMAEMaskHead(MaskRCNNConvUpsampleHead):
    """MaskRCNNConvUpsampleHead whose ROI_MASK_HEAD.NORM may be "LN"."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["conv_norm"] = resolve_norm(ret["conv_norm"])
        return ret


@ROI_HEADS_REGISTRY.register()
class ConvMAEROIHeads(StandardROIHeads):
    """StandardROIHeads whose poolers assign boxes to pyramid levels around a configurable
    canonical box size (MODEL.ROI_HEADS.CANONICAL_BOX_SIZE, detectron2's fixed default 224
    suits COCO-sized images; small images want a proportionally smaller one)."""

    @configurable
    def __init__(self, *, canonical_box_size: int = 224, **kwargs):
        super().__init__(**kwargs)
        if canonical_box_size <= 0:
            raise ValueError(f"MODEL.ROI_HEADS.CANONICAL_BOX_SIZE must be positive, got {canonical_box_size}")
        for name in ("box_pooler", "mask_pooler", "keypoint_pooler"):
            pooler = getattr(self, name, None)
            if pooler is not None:
                pooler.canonical_box_size = canonical_box_size

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["canonical_box_size"] = cfg.MODEL.ROI_HEADS.CANONICAL_BOX_SIZE
        return ret
