"""FLOP counting with fvcore (multiply-accumulates, fvcore's unit, reported as GMACs)."""
from math import prod
from typing import Tuple

import torch
import torch.nn as nn

__all__ = ["gmacs", "pretrain_step_gmacs", "sdpa_macs"]


def sdpa_macs(inputs, outputs) -> int:
    """fvcore handle of ``aten::scaled_dot_product_attention`` (q, k, v, ...): the MACs of
    q @ k^T and attn @ v, as fvcore counts the two matmuls of explicit attention. Softmax,
    scaling and an additive mask are elementwise, which fvcore counts nowhere."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def gmacs(module: nn.Module, inputs: Tuple) -> float:
    """GMACs of ``module(*inputs)`` as fvcore counts them: convolutions, matmuls, linears, norms
    and (with :func:`sdpa_macs`) F.scaled_dot_product_attention. Kernels fvcore cannot see into
    (custom autograd functions) count nothing: count the reference model where the fast one has
    them (the detection backbone's relative-position attention)."""
    from fvcore.nn import FlopCountAnalysis

    count = FlopCountAnalysis(module, inputs)
    count.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
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
    """GMACs of a pretraining forward pass (encoder + decoder) on ``imgs`` with ``mask`` (an
    all-zero mask is the unmasked step). The product model ``ConvMAE`` runs stages 1-2 only at
    the visible patches (the sparse step); ``ReferenceConvMAE`` runs them densely with masked
    convolution (the official computation). Both are counted alike: attention through
    F.scaled_dot_product_attention counts as its explicit matmuls would."""
    from convmae_det.modeling.masking import grid_of

    return gmacs(_PretrainStep(model, grid_of(imgs)), (imgs, mask))
