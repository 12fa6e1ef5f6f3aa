"""FLOP counting with fvcore (multiply-accumulates, fvcore's unit, reported as GMACs)."""
from typing import Tuple

import torch
import torch.nn as nn

__all__ = ["gmacs", "pretrain_step_gmacs"]


def gmacs(module: nn.Module, inputs: Tuple) -> float:
    """GMACs of ``module(*inputs)`` as fvcore counts them. fvcore sees explicit matmuls but not
    fused attention kernels: count a model with ``impl="eager"``."""
    from fvcore.nn import FlopCountAnalysis

    count = FlopCountAnalysis(module, inputs)
    count.unsupported_ops_warnings(False)
    count.uncalled_modules_warnings(False)
    return count.total() / 1e9


class _PretrainStep(nn.Module):
    """Encoder + decoder of a ConvMAE for a given mask (the loss itself is negligible)."""

    def __init__(self, model: nn.Module, grid: Tuple[int, int]):
        super().__init__()
        self.model = model
        self.grid = grid

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.forward_decoder(self.model.forward_encoder(imgs, mask), mask, self.grid)


def pretrain_step_gmacs(model: nn.Module, imgs: torch.Tensor, mask: torch.Tensor) -> float:
    """GMACs of a ConvMAE pretraining forward pass on ``imgs`` with ``mask`` (an all-zero mask
    is the unmasked step), with the model's current ``sparse`` setting."""
    return gmacs(_PretrainStep(model, model.grid_of(imgs)), (imgs, mask))
