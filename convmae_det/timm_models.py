"""The ConvViT sizes as timm models: ``timm.create_model("convvit_base", features_only=True)``.

Importing :mod:`convmae_det` registers ``convvit_tiny``, ``convvit_small``, ``convvit_base`` and
``convvit_large`` (the sizes of :data:`~convmae_det.modeling.convvit.CONVVIT_SIZES`; tiny is this
project's test size). Each builds the product :class:`~convmae_det.modeling.ConvViT` with the
encoder of the pretraining checkpoints (global attention, absolute position embedding of a
224 grid, no relative position); keyword arguments of ``ConvViT`` override that
(``window_size``, ``use_rel_pos``, ``conv_norm_eps``...). The model's forward returns the dict
of NCHW maps ``s4, s8, s16, s32``; with ``features_only=True`` timm wraps
:meth:`~convmae_det.modeling.ConvViT.forward_intermediates` and returns the list of the maps of
``out_indices`` (default all four: strides 4, 8, 16 and 32, the last a 2x2 max pool of stage 3,
as the MIMDet-style ConvMAE detector takes it). There is no classifier: ``num_classes`` is 0.

Official files load without a download, through :func:`checkpoint_filter_fn`
(:func:`convmae_det.checkpoint.convert_state_dict`: pretraining checkpoints with or without the
decoder, detection checkpoints' ``backbone.net.*``; a position embedding of another grid is
resampled, tables the file lacks keep their initialisation):

- ``timm.create_model("convvit_base", pretrained=True, pretrained_cfg_overlay=dict(file=path))``,
  timm's route for a local file through the model's filter;
- ``timm.create_model("convvit_base", checkpoint_path=path)``: timm loads the file with
  ``load_state_dict``, which these models accept in the official layouts too (a pre-hook
  converts them), with or without ``features_only``.
"""
import functools
import logging
from typing import Dict

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .checkpoint import ENCODER_PREFIX, CheckpointError, convert_state_dict, detect_layout, unwrap_state_dict
from .modeling.convvit import CONVVIT_SIZES, ConvViT

__all__ = ["checkpoint_filter_fn", "create_convvit"]

logger = logging.getLogger(__name__)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """An official ConvMAE state dict (any layout of :mod:`convmae_det.checkpoint`) -> the keys
    and shapes of ``model``, a ConvViT. What could not be placed is logged."""
    target = {ENCODER_PREFIX + k: v for k, v in model.state_dict().items()}
    out, report = convert_state_dict(unwrap_state_dict(state_dict), target)
    logger.info("ConvViT weights:\n" + report.summary())
    return {k[len(ENCODER_PREFIX):]: v for k, v in out.items()}


def _load_official_layout(module, state_dict, prefix, *_, inner: str = ""):
    """``load_state_dict`` pre-hook of a timm-built ConvViT (``inner`` "") or of its features
    wrapper (``inner`` "model."): a state dict under ``prefix`` with keys that are not the
    model's but form an official layout is replaced, in place, by its conversion."""
    model = module.get_submodule(inner[:-1]) if inner else module
    own = {prefix + inner + k for k in model.state_dict()}
    keys = [k for k in state_dict if k.startswith(prefix)]
    if all(k in own for k in keys):
        return
    sd = {k[len(prefix):]: state_dict[k] for k in keys}
    try:
        detect_layout(sd)
    except CheckpointError:
        return  # not an official layout: load_state_dict reports the keys itself
    converted = checkpoint_filter_fn(sd, model)
    for k in keys:
        del state_dict[k]
    state_dict.update({prefix + inner + k: v for k, v in converted.items()})


def create_convvit(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """A ConvViT of the size in ``variant`` (``convvit_<size>``) through timm's builder;
    ``kwargs`` as for :func:`timm.create_model` and :class:`ConvViT`."""
    if kwargs.get("num_classes"):
        raise ValueError(f"{variant} is an encoder without a classifier: num_classes must be 0, got {kwargs['num_classes']}")
    features = kwargs.get("features_only", False)
    out_indices = kwargs.pop("out_indices", 4)
    size = variant.split("_", 1)[1]
    model = build_model_with_cfg(
        ConvViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        kwargs_filter=("num_classes",),
        **{**CONVVIT_SIZES[size], **kwargs},
    )
    model.register_load_state_dict_pre_hook(functools.partial(_load_official_layout, inner="model." if features else ""))
    return model


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.proj",
        "classifier": None,
        "paper_ids": "arXiv:2205.03892",
        "paper_name": "ConvMAE: Masked Convolution Meets Masked Autoencoders",
        "origin_url": "https://github.com/Alpha-VL/ConvMAE",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f"convvit_{size}": _cfg() for size in CONVVIT_SIZES})


@register_model
def convvit_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    """This project's test size (dims 64/128/256, depths 1/1/4); no published weights."""
    return create_convvit("convvit_tiny", pretrained, **kwargs)


@register_model
def convvit_small(pretrained: bool = False, **kwargs) -> nn.Module:
    """ConvMAE-S (dims 128/256/384, depths 2/2/11), the ConvMAE-v2 release's shapes."""
    return create_convvit("convvit_small", pretrained, **kwargs)


@register_model
def convvit_base(pretrained: bool = False, **kwargs) -> nn.Module:
    """ConvMAE-B (dims 256/384/768, depths 2/2/11), the published encoder."""
    return create_convvit("convvit_base", pretrained, **kwargs)


@register_model
def convvit_large(pretrained: bool = False, **kwargs) -> nn.Module:
    """ConvMAE-L (dims 384/768/1024, depths 2/2/23), the ConvMAE-v2 release's shapes."""
    return create_convvit("convvit_large", pretrained, **kwargs)
