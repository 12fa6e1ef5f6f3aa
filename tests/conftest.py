"""Shared test paths, tiny-model factories and the one equivalence helper.

Tests import these names with ``from conftest import ...`` (pytest puts this folder on
``sys.path``); nothing here adds ``tools/`` to it: a test runs a tool as a subprocess or
through the package functions the tool calls.
"""
import os
from typing import Any, Dict, Iterable, Sequence, Tuple, Union

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
TINY = os.path.join(ROOT, "configs", "Shapes", "mask_rcnn_convmae_tiny_shapes.yaml")
BASE = os.path.join(ROOT, "configs", "COCO", "mask_rcnn_convmae_base_25ep.yaml")


def tool(name: str) -> str:
    """Path of a script under tools/, to run as a subprocess."""
    return os.path.join(TOOLS, name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """What the dataset checks remember (convmae_det.data.checks.cache_dir) goes to the session's
    temporary folder, not ~/.cache; tools run as subprocesses inherit it."""
    os.environ["CONVMAE_DET_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def tiny_convvit_kwargs(**over):
    kw = dict(embed_dims=(32, 48, 64), depths=(1, 1, 2), num_heads=2, pretrain_img_size=64)
    kw.update(over)
    return kw


def tiny_mae_kwargs(**over):
    kw = dict(embed_dims=(32, 48, 64), depths=(1, 1, 2), num_heads=2, img_size=64,
              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    kw.update(over)
    return kw


def tiny_cfg(*opts):
    """The tiny Shapes detection config on the CPU, with KEY VALUE overrides."""
    from convmae_det.engine import setup_cfg

    return setup_cfg(TINY, ["MODEL.DEVICE", "cpu", *opts])


def randomize_(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give norms, biases and relative-position tables non-trivial values (their initial ones,
    ones and zeros, would hide a wrong formula), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "rel_pos" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


Inputs = Union[torch.Tensor, Sequence[Any], Dict[str, Any]]


def _call(model: torch.nn.Module, inputs: Inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _leaves(out) -> Iterable[Tuple[str, torch.Tensor]]:
    """Named floating-point tensors of a model output (tensor, tuple, list or dict)."""
    if torch.is_tensor(out):
        if out.is_floating_point():
            yield "out", out
    elif isinstance(out, dict):
        for k, v in out.items():
            yield from ((f"{k}.{n}" if n != "out" else str(k), t) for n, t in _leaves(v))
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            yield from ((f"{i}.{n}" if n != "out" else str(i), t) for n, t in _leaves(v))


def assert_same_function(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    inputs: Inputs,
    atol: float = 1e-4,
    grads: bool = True,
    load: bool = True,
) -> Dict[str, float]:
    """Assert that two models compute the same function: every floating-point output and,
    with ``grads``, the gradient of every parameter (matched by name) and of every input
    tensor that requires grad, for the loss sum_i <out_i, w_i> with fixed random weights w_i.

    ``load`` copies model_a's state into model_b first (strict), so the two must share
    parameter names. Differences are relative to the larger magnitude of the compared tensor
    (at least 1). Returns the largest difference per compared name, for reports.
    """
    if load:
        model_b.load_state_dict(model_a.state_dict(), strict=True)
    results = []
    for model in (model_a, model_b):
        model.zero_grad(set_to_none=True)
        args = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
        tensors = [t for t in args if torch.is_tensor(t)]
        for t in tensors:
            t.grad = None
        out = dict(_leaves(_call(model, inputs)))
        if grads:
            g = torch.Generator().manual_seed(0)
            loss = sum((v.float() * torch.randn(v.shape, generator=g)).sum() for _, v in sorted(out.items()))
            loss.backward()
        pgrads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        igrads = {f"input{i}": t.grad.clone() for i, t in enumerate(tensors) if t.grad is not None}
        results.append(({k: v.detach() for k, v in out.items()}, pgrads, igrads))
    (out_a, pg_a, ig_a), (out_b, pg_b, ig_b) = results
    assert out_a.keys() == out_b.keys(), f"outputs differ in names: {sorted(out_a)} vs {sorted(out_b)}"
    if grads:
        assert pg_a.keys() == pg_b.keys(), f"parameters with gradients differ: {sorted(set(pg_a) ^ set(pg_b))}"
        assert pg_a, "no parameter received a gradient"
    report, bad = {}, []
    for kind, a, b in (("output", out_a, out_b), ("grad", pg_a, pg_b), ("input grad", ig_a, ig_b)):
        for name in a:
            x, y = a[name].float(), b[name].float()
            if x.shape != y.shape:
                bad.append(f"{kind} {name}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
                continue
            diff = ((x - y).abs().max().item() if x.numel() else 0.0) / max(1.0, y.abs().max().item() if y.numel() else 0.0)
            report[f"{kind} {name}"] = diff
            if not diff <= atol:
                bad.append(f"{kind} {name}: differs by {diff:.3g} (atol {atol})")
    assert not bad, "the two models differ:\n  " + "\n  ".join(bad)
    return report


def with_input_grad(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)
