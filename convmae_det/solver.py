"""Optimizer with ConvMAE layer-wise lr decay and weight-decay exemptions (ViTDet recipe), and
the lr schedules (detectron2's, plus the poly schedule of semantic segmentation)."""
from typing import Dict, List

import torch
import torch.nn as nn
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as _d2_build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from .modeling.convvit import ConvViTBase
from .modeling.layers import D2LayerNorm

__all__ = ["convmae_layer_id", "get_param_groups", "build_optimizer", "use_fused_optimizer", "build_lr_scheduler"]

# The norm types of detectron2's get_default_optimizer_params, which the official recipe uses:
# their parameters get WEIGHT_DECAY_NORM. detectron2's own channel LayerNorm (D2LayerNorm here)
# is not among them.
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def convmae_layer_id(name: str, num_layers: int, prefix: str) -> int:
    """Layer of a parameter for lr decay, the official ConvMAE-Det ``get_vit_lr_decay_rate``:
    patch embeddings and stages 1-2 are layer 0, stage-3 block i is i + 1, and everything else
    is num_layers + 1 (undecayed): the pyramid, the heads and also the encoder's ``pos_embed``
    (ViTDet's ViT rule puts pos_embed at layer 0; ConvMAE-Det's does not)."""
    if not name.startswith(prefix):
        return num_layers + 1
    rest = name[len(prefix):]
    if rest.startswith("blocks3."):
        return int(rest.split(".")[1]) + 1
    if rest.startswith(("patch_embed", "blocks1.", "blocks2.")):
        return 0
    return num_layers + 1


def _find_encoder(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, ConvViTBase):
            return (name + ".") if name else "", module
    return None, None


def get_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_bias: float = None,
    weight_decay_pos_embed: float = 0.0,
    layer_decay: float = 1.0,
    norm_includes_d2_layernorm: bool = False,
) -> List[Dict]:
    """Parameter groups: lr = base_lr * layer_decay ** (num_layers + 1 - layer_id); weight decay
    ``weight_decay_norm`` for norm layers, ``weight_decay_pos_embed`` for position embeddings,
    ``weight_decay_bias`` (default: weight_decay) for biases.

    Norm layers are those of :data:`NORM_TYPES`, as in detectron2's
    ``get_default_optimizer_params`` (the official recipe): the pyramid's and heads' channel
    LayerNorms (:class:`D2LayerNorm`) are decayed like weights unless
    ``norm_includes_d2_layernorm``."""
    prefix, encoder = _find_encoder(model)
    num_layers = encoder.depths[2] if encoder is not None else 0
    norm_params = set()
    for module in model.modules():
        if isinstance(module, NORM_TYPES) and (norm_includes_d2_layernorm or not isinstance(module, D2LayerNorm)):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    wd_bias = weight_decay if weight_decay_bias is None else weight_decay_bias
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_params:
            wd = weight_decay_norm
        elif name.endswith("pos_embed"):
            wd = weight_decay_pos_embed
        elif name.endswith(".bias"):
            wd = wd_bias
        else:
            wd = weight_decay
        scale = 1.0
        if encoder is not None and layer_decay != 1.0:
            scale = layer_decay ** (num_layers + 1 - convmae_layer_id(name, num_layers, prefix))
        key = (scale, wd)
        if key not in groups:
            groups[key] = {"params": [], "lr": base_lr * scale, "weight_decay": wd, "lr_scale": scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    groups = get_param_groups(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        weight_decay_bias=s.WEIGHT_DECAY_BIAS,
        weight_decay_pos_embed=s.WEIGHT_DECAY_POS_EMBED,
        layer_decay=s.LAYER_DECAY,
        norm_includes_d2_layernorm=s.WEIGHT_DECAY_NORM_ALL_LN,
    )
    name = s.OPTIMIZER.upper()
    extra = {"fused": True} if use_fused_optimizer(cfg, model) else {}
    if name == "ADAMW":
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(groups, lr=s.BASE_LR, betas=tuple(s.BETAS), **extra)
    if name == "SGD":
        return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
            groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV, **extra
        )
    raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {s.OPTIMIZER!r}")


def use_fused_optimizer(cfg, model: nn.Module) -> bool:
    """SOLVER.FUSED and every parameter on CUDA and no gradient clipping: one fused kernel per
    parameter group instead of several per tensor. With clipping, detectron2's wrapper clips
    inside ``step``, where a fused optimizer under AMP would still see the scaled gradients,
    so clipping keeps the unfused step."""
    return bool(
        cfg.SOLVER.FUSED
        and not cfg.SOLVER.CLIP_GRADIENTS.ENABLED
        and all(p.is_cuda for p in model.parameters())
    )


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """detectron2's schedulers, plus ``SOLVER.LR_SCHEDULER_NAME: "WarmupPolyLR"``: the lr factor
    (1 - iter / MAX_ITER) ** SOLVER.POLY_LR_POWER, reaching 0 at MAX_ITER (mmsegmentation's
    ``poly`` with ``min_lr=0``), under detectron2's warm-up (SOLVER.WARMUP_*). The factor of
    each group multiplies its own lr, so layer decay is kept."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return _d2_build_lr_scheduler(cfg, optimizer)
    power, max_iter = cfg.SOLVER.POLY_LR_POWER, cfg.SOLVER.MAX_ITER
    if power <= 0 or max_iter <= 0:
        raise ValueError(f"WarmupPolyLR needs SOLVER.POLY_LR_POWER > 0 and SOLVER.MAX_ITER > 0, got {power}, {max_iter}")
    sched = WarmupParamScheduler(
        PolynomialDecayParamScheduler(1.0, power),
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / max_iter, 1.0),
        cfg.SOLVER.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=max_iter)
