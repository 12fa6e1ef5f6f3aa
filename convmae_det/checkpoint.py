"""Checkpoint conversion: official ConvMAE and convmae-det checkpoints -> detectron2 weights.

One pure function, :func:`convert_state_dict`, maps a foreign state dict onto the state dict of
a target model and reports everything it did: what it placed, resampled, dropped (and why), and
which model parameters the input did not provide. ``tools/convert_pretrain.py`` is a thin CLI.

Layouts recognised (reference sections 3 and 4):

* ``pretrain-full``: the official (or this project's) pretraining checkpoint, encoder keys at
  the top level (``patch_embed1.proj.weight``...) plus decoder keys;
* ``pretrain-encoder``: the same without the decoder (the released ``convmae_base.pth``);
* ``detection``: a detectron2 checkpoint with ``backbone.net.*`` and ``backbone.simfp_*`` keys
  (Official-ConvMAE-Det or this project).
"""
import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from .modeling.layers import resample_abs_pos
from .utils.fileio import atomic_write

__all__ = [
    "CheckpointError",
    "ConversionReport",
    "load_checkpoint_file",
    "unwrap_state_dict",
    "detect_layout",
    "infer_encoder_size",
    "convert_state_dict",
    "save_weights",
]

ENCODER_PREFIX = "backbone.net."
# pretraining-only modules of the official layout; detection has no use for them
PRETRAIN_ONLY = re.compile(r"^(norm\.|stage[12]_output_decode\.|decoder_|mask_token$)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


@dataclass
class ConversionReport:
    layout: str = ""
    placed: List[str] = field(default_factory=list)
    resampled: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # (input key, reason)
    initialised: List[str] = field(default_factory=list)  # encoder params the input lacks, written from the model's init
    missing: List[str] = field(default_factory=list)  # other model params the input lacks (left to the model's init)

    def summary(self) -> str:
        lines = [f"layout: {self.layout}", f"placed: {len(self.placed)} tensors"]
        for k, a, b in self.resampled:
            lines.append(f"resampled: {k} {tuple(a)} -> {tuple(b)}")
        if self.dropped:
            lines.append(f"not placed ({len(self.dropped)}):")
            grouped: Dict[Tuple[str, str], int] = {}
            for k, why in self.dropped:  # decoder_blocks.3.attn.qkv.weight -> decoder_blocks.*
                g = re.sub(r"\.\d+\..*$", ".*", k) if why.startswith("pretraining only") else k
                grouped[(g, why)] = grouped.get((g, why), 0) + 1
            lines += [f"  {g}{f' ({n})' if n > 1 else ''}: {why}" for (g, why), n in grouped.items()]
        if self.initialised:
            lines.append(f"encoder parameters not in the input, written with the model's initialisation ({len(self.initialised)}):")
            lines += [f"  {k}" for k in self.initialised]
        if self.missing:
            groups: Dict[str, int] = {}
            for k in self.missing:
                g = ".".join(k.split(".")[:2])
                groups[g] = groups.get(g, 0) + 1
            lines.append(f"model parameters not in the input, left to the model's initialisation ({len(self.missing)}):")
            lines += [f"  {g}.* ({n})" for g, n in sorted(groups.items())]
        return "\n".join(lines)


def load_checkpoint_file(path: str, allow_pickle: bool = False) -> dict:
    """Read a checkpoint without running code from it.

    ``torch.load(weights_only=True)`` accepts tensors and plain containers (plus the
    ``argparse.Namespace`` that official training scripts store under ``args``). Anything else
    is refused unless ``allow_pickle`` is set, which unpickles with full trust.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if path.endswith(".pkl"):
        if not allow_pickle:
            raise CheckpointError(f"{path} is a pickle file; reading it can run code from it: pass --allow-pickle if you trust it")
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch zip or legacy pickle
        raise CheckpointError(f"{path} is not a readable torch checkpoint (it starts with {head!r})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "Unsupported operand" not in str(e):
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {str(e).splitlines()[0]}") from None
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, and unpickling them can run "
                f"code from the file: pass --allow-pickle if you trust it ({str(e).splitlines()[0]})"
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {e}") from None


def unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint: unwrap ``model``/``state_dict``/``module`` and a
    ``module.`` (DDP) prefix; numpy arrays (detectron2 .pkl) become tensors."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict checkpoint, got {type(obj).__name__}")
    for key in ("model", "state_dict", "module"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if not isinstance(v, torch.Tensor):
            try:
                import numpy as np

                if isinstance(v, np.ndarray):
                    v = torch.from_numpy(v)
            except ImportError:
                pass
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v
    if not out:
        raise CheckpointError("the checkpoint holds no tensors")
    return out


def detect_layout(sd: Dict[str, torch.Tensor]) -> str:
    if any(k.startswith(ENCODER_PREFIX) for k in sd):
        return "detection"
    if "patch_embed1.proj.weight" in sd:
        return "pretrain-full" if any(k.startswith("decoder_") for k in sd) else "pretrain-encoder"
    raise CheckpointError(
        "unrecognised checkpoint layout: expected ConvMAE keys such as 'patch_embed1.proj.weight' "
        f"or '{ENCODER_PREFIX}patch_embed1.proj.weight', found e.g. {sorted(sd)[:5]}"
    )


def infer_encoder_size(sd: Dict[str, torch.Tensor], prefix: str = "") -> dict:
    """Embed dims, depths and mlp ratio of a ConvViT from its tensor shapes."""
    try:
        dims = tuple(int(sd[f"{prefix}patch_embed{i}.proj.weight"].shape[0]) for i in (1, 2, 3))
    except KeyError as e:
        raise CheckpointError(f"cannot read the encoder size: {e.args[0]} is missing") from None
    depths = []
    for s in (1, 2, 3):
        pat = re.compile(rf"^{re.escape(prefix)}blocks{s}\.(\d+)\.")
        ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
        depths.append(max(ids) + 1 if ids else 0)
    fc1 = sd.get(f"{prefix}blocks3.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / dims[2] if fc1 is not None else 4.0
    return {"embed_dims": dims, "depths": tuple(depths), "mlp_ratio": mlp_ratio}


def _resample_pos_embed(v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n_new = shape[1]
    side = int(round(n_new**0.5))
    if side * side != n_new:
        raise CheckpointError(f"target position embedding has {n_new} positions, not a square grid")
    return resample_abs_pos(v.float(), (side, side)).reshape(1, n_new, -1).to(v.dtype)


def convert_state_dict(
    sd: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Map ``sd`` (any recognised layout) onto the keys and shapes of ``target`` (a detectron2
    model's state dict). Position embeddings of another grid are resampled; any other shape
    mismatch raises a :class:`CheckpointError` naming both shapes. Encoder parameters that
    the input lacks (ViTDet's relative-position tables, zero at initialisation) are written
    from ``target``, so the result loads with no encoder key missing."""
    report = ConversionReport(layout=detect_layout(sd))
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if report.layout == "detection":
            new = k
        elif PRETRAIN_ONLY.match(k):
            report.dropped.append((k, "pretraining only (not part of the detection backbone)"))
            continue
        else:
            new = ENCODER_PREFIX + k
        if new not in target:
            report.dropped.append((k, f"no parameter {new!r} in the model"))
            continue
        want = target[new].shape
        if v.shape != want:
            if new.endswith("pos_embed") and v.dim() == 3 and v.shape[2] == want[2]:
                v = _resample_pos_embed(v, want)
                report.resampled.append((new, tuple(sd[k].shape), tuple(want)))
            else:
                raise CheckpointError(
                    f"shape mismatch for {k!r}: the checkpoint has {tuple(v.shape)}, the model's {new!r} "
                    f"is {tuple(want)} (wrong model size or config?)"
                )
        out[new] = v.to(target[new].dtype).contiguous()
        report.placed.append(new)
    for k, v in target.items():
        if k in out:
            continue
        if k.startswith(ENCODER_PREFIX):
            out[k] = v.detach().clone()
            report.initialised.append(k)
        else:
            report.missing.append(k)
    enc_placed = [k for k in report.placed if k.startswith(ENCODER_PREFIX)]
    if not enc_placed:
        raise CheckpointError("no encoder parameter of the checkpoint fits the model")
    return out, report


def save_weights(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Write ``{"model": state_dict}`` (tensors only) atomically (:func:`~convmae_det.utils.fileio.atomic_write`)."""
    with atomic_write(path, "wb") as f:
        torch.save({"model": state_dict}, f)
