"""How the encoder's blocks run: compiled and/or activation-checkpointed, decided in one place.

A :class:`BlockRunner` belongs to one model and is set through that model's timm-style setters
(``set_grad_checkpointing``, ``set_compile``); the model calls ``self.runner(block.forward, x)``
for each block. It accepts bound methods of modules only, so that a compiled graph can be
shared by every block of a class (the class function is compiled once, the block passed as its
first argument) and nothing is silently left uncompiled.
"""
import functools
import inspect
from typing import Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

__all__ = ["BlockRunner"]

# attention kernels whose outputs activation checkpointing keeps rather than recomputes
_ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)


def _is_qkv_projection(op, args) -> bool:
    """mm/addmm with a d -> 3d weight: the qkv projection of an attention block."""
    if op is torch.ops.aten.addmm.default and len(args) >= 3 and args[2].dim() == 2:
        return args[2].shape[1] == 3 * args[2].shape[0]
    if op is torch.ops.aten.mm.default and len(args) >= 2 and args[1].dim() == 2:
        return args[1].shape[1] == 3 * args[1].shape[0]
    return False


def _keep_attention_outputs():
    """Selective checkpointing: recompute everything in the backward pass except the attention
    kernels and the qkv projections, whose outputs are kept. The forward is then re-run without
    a quarter of the stage-3 matmuls and without attention, the costliest op of global blocks."""

    def policy(ctx, op, *args, **kwargs):
        if op in _ATTENTION_OPS or _is_qkv_projection(op, args):
            return cp.CheckpointPolicy.MUST_SAVE
        return cp.CheckpointPolicy.PREFER_RECOMPUTE

    return cp.create_selective_checkpoint_contexts(policy)


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)  # one static graph per shape (few shapes: fixed-size inputs)


class BlockRunner:
    """Runs ``method(*args)`` for a bound method of an ``nn.Module``:

    A block's ``forward`` runs as ``block(*args)`` (its hooks fire) unless compiled.

    - ``compile``: the method's class function through ``torch.compile`` (regional compilation:
      one graph per class of block and input shape, shared by all blocks of that class). Fewer,
      fused kernels; on a GPU the eager blocks are bound by launching many small ones. The
      first call of each shape pays the compilation.
    - ``checkpoint``: in training with grad enabled, the block's activations are recomputed in
      the backward pass. On the CPU, uncompiled, the outputs of the attention kernels and the
      qkv projections are kept (selective checkpointing); on a GPU and for compiled blocks each
      block is recomputed whole: the selective policy runs Python for every op, which on an
      H200 (ConvMAE-B, 1024, bf16, launch-bound) made the step 2.8x slower, while whole-block
      recomputation cost +26% in tools/benchmark.py; compiled blocks are opaque to it.
    """

    def __init__(self, compile: bool = False, checkpoint: bool = False):
        self.compile = bool(compile)
        self.checkpoint = bool(checkpoint)

    def __call__(self, method: Callable, *args) -> torch.Tensor:
        if not (inspect.ismethod(method) and isinstance(method.__self__, nn.Module)):
            raise TypeError(f"BlockRunner runs bound methods of nn.Module blocks, got {method!r}")
        module = method.__self__
        # a block's forward runs through the module's __call__, so that its hooks fire
        fn, call_args = (module if method.__func__ is type(module).forward else method), args
        if self.compile:
            fn, call_args = _compiled(method.__func__), (method.__self__, *args)
        if self.checkpoint and module.training and torch.is_grad_enabled():
            x = next(a for a in args if torch.is_tensor(a))
            if x.device.type == "cpu" and not self.compile:
                return cp.checkpoint(fn, *call_args, use_reentrant=False, context_fn=_keep_attention_outputs)
            return cp.checkpoint(fn, *call_args, use_reentrant=False)
        return fn(*call_args)

    def __repr__(self) -> str:
        return f"BlockRunner(compile={self.compile}, checkpoint={self.checkpoint})"
