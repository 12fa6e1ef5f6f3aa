"""convmae-det: ConvMAE backbones for detectron2 (importing it fills detectron2's registries and
registers the ConvViT sizes as timm models, ``convvit_base``...)."""
from . import data, modeling, timm_models  # noqa: F401  (registers backbones, heads, datasets, timm models)
from .config import add_convmae_config
from .modeling import ConvViT, MultiScaleSimpleFeaturePyramid, SimpleFeaturePyramid

__version__ = "0.1.0"
__all__ = ["add_convmae_config", "ConvViT", "SimpleFeaturePyramid", "MultiScaleSimpleFeaturePyramid", "__version__"]
