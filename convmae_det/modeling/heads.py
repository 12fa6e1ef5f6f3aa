"""ViTDet-style ROI heads that accept NORM: "LN" on every detectron2 release.

detectron2 0.6's ``get_norm`` has no "LN", but its heads accept a callable norm; these
subclasses turn "LN" into a channel-LayerNorm factory and leave every other value alone.
Parameter names are those of detectron2's heads, so ViTDet checkpoints load.
"""
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

from .layers import LayerNorm2d

__all__ = ["resolve_norm", "ConvMAEConvFCHead", "ConvMAEMaskHead"]


def _layer_norm_2d(channels: int) -> LayerNorm2d:
    return LayerNorm2d(channels, eps=1e-6)


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
