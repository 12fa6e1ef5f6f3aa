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
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

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
    "check_state_dict_fit",
    "SafeCheckpointer",
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
    ``argparse.Namespace`` that official training scripts store under ``args``). Anything else,
    and any ``.pkl`` file, is refused unless ``allow_pickle`` is set, which unpickles with full
    trust. The :class:`CheckpointError` says which of the two it is: "unsafe content" (the file
    would import and call code: named when it can be read) or "corrupt file" (empty, truncated
    or not a checkpoint).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"corrupt file: {path} is empty (0 bytes; an interrupted write?)")
    if path.endswith(".pkl"):
        if not allow_pickle:
            raise CheckpointError(
                f"unsafe content: {path} is a pickle file, and reading one can run code from it: "
                "pass --allow-pickle if you trust it"
            )
        return _unpickle(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, type and EOF errors of damaged or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        code = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if not code and "Unsupported global" in str(e):
            code = ["an object's class"]
        if not code and not zipfile.is_zipfile(path):
            code = _pickle_code_refs(path)  # a pickle that torch's restricted reader stopped at before its globals
        if not code:
            raise CheckpointError(f"corrupt file: {path} is not a readable torch checkpoint (truncated or damaged?): {type(e).__name__}: {first[:200]}") from None
        if not allow_pickle:
            what = f"would import and call {', '.join(code[:5])}"
            raise CheckpointError(
                f"unsafe content: {path} {what}, and loading it could run code from the file: "
                "refused; pass --allow-pickle if you trust it"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a plain pickle rather than torch's format
        return _unpickle(path)


def _unpickle(path: str):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise CheckpointError(f"corrupt file: {path} is not a readable pickle (truncated or damaged?): {e}") from None


def _pickle_code_refs(path: str) -> List[str]:
    """The ``module.name`` references of the first pickle in ``path``, read with ``pickletools``,
    which runs nothing; [] if the file is no pickle or refers to nothing."""
    refs, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    refs.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    refs.append(".".join(strings[-2:]) if len(strings) >= 2 else "(a global)")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle, or a truncated one: what was read so far counts
        pass
    return refs


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


def check_state_dict_fit(model, sd: Dict[str, torch.Tensor], source: str, complete: bool = False) -> None:
    """Fail clearly if the state dict ``sd`` (read from ``source``, named in the message) does not
    fit ``model``, where detectron2 would only log it and leave those tensors at their random
    initialisation.

    Backbone tensors must have the model's shapes, and the two must share parameter names. With
    ``complete`` (evaluation, prediction, resuming), every tensor of the model must be in ``sd``
    with its shape; otherwise mismatched *head* tensors stay a warning of detectron2, since
    finetuning a detector on a new dataset (another class count) is legitimate.
    """
    own = getattr(model, "module", model).state_dict()
    bad = [
        f"  {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if (complete or k.startswith("backbone.")) and k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    if bad:
        hint = ("convert it for this config with tools/convert_pretrain.py, or fix MODEL.CONVMAE"
                if not complete else "it was trained with another config (MODEL.CONVMAE, MODEL.ROI_HEADS.NUM_CLASSES?)")
        raise CheckpointError(
            f"{source} does not fit {'the backbone of ' if not complete else ''}this config ({len(bad)} tensors):\n"
            + "\n".join(bad[:10]) + f"\n{hint}"
        )
    if own and not any(k in own for k in sd):
        raise CheckpointError(
            f"{source} shares no parameter name with the model (e.g. {sorted(sd)[:3]}): "
            "a pretraining checkpoint must be converted first (tools/convert_pretrain.py)"
        )
    if complete:
        missing = [k for k in own if k not in sd and k not in ("pixel_mean", "pixel_std")]
        if missing:
            groups = sorted({".".join(k.split(".")[:2]) for k in missing})
            raise CheckpointError(
                f"{source} lacks {len(missing)} of the model's {len(own)} tensors ({', '.join(groups[:6])}"
                f"{', ...' if len(groups) > 6 else ''}): they would keep their random initialisation. "
                "Give the weights of a trained model (model_final.pth of tools/train_net.py)"
            )


class SafeCheckpointer(DetectionCheckpointer):
    """detectron2's DetectionCheckpointer, with

    - files read only through :func:`load_checkpoint_file` (no code runs from them unless
      ``allow_pickle``; ``.pkl`` files need it);
    - weights checked by :func:`check_state_dict_fit` before they are loaded (``complete``:
      every model tensor must be there, as for evaluation; always so when resuming);
    - every checkpoint and ``last_checkpoint`` written atomically
      (:func:`~convmae_det.utils.fileio.atomic_write`): a kill leaves the previous file;
    - a ``last_checkpoint`` that names an empty, missing or unreadable file explained, with the
      newest other checkpoint to resume from.

    ``source`` names what is loaded in messages (``MODEL.WEIGHTS``, ``--weights``).
    """

    def __init__(self, model, save_dir: str = "", *, allow_pickle: bool = False, complete: bool = False,
                 source: str = "MODEL.WEIGHTS", **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_pickle, self.complete, self.source = allow_pickle, complete, source
        self._loading, self._resuming = "", False

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        with atomic_write(path, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint")) as f:
            f.write(last_filename_basename)

    def load(self, path: str, checkpointables=None):
        self._loading = path
        return super().load(path, checkpointables)

    def resume_or_load(self, path: str, *, resume: bool = True):
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        last = os.path.join(self.save_dir, "last_checkpoint")
        with open(last) as f:
            name = f.read().strip()
        target = os.path.join(self.save_dir, name)
        if not name or not os.path.isfile(target):
            what = "is empty" if not name else f"names {name}, which does not exist"
            raise CheckpointError(f"--resume: {last} {what}.{self._previous_checkpoint(target)}")
        self._resuming = True
        try:
            return self.load(target)
        finally:
            self._resuming = False

    def _previous_checkpoint(self, bad: str) -> str:
        """A sentence naming the newest checkpoint of ``save_dir`` other than ``bad``."""
        found = []
        for f in os.listdir(self.save_dir):
            m = re.fullmatch(r"model_(\d+|final)\.pth", f)
            if m and f != os.path.basename(bad) and os.path.getsize(os.path.join(self.save_dir, f)) > 0:
                found.append((m.group(1) == "final", int(m.group(1)) if m.group(1).isdigit() else 0, f))
        last = os.path.join(self.save_dir, "last_checkpoint")
        if not found:
            return f" {self.save_dir} holds no other checkpoint: start a new run (--overwrite)."
        name = max(found)[2]
        return (f" The newest other checkpoint is {os.path.join(self.save_dir, name)}: to resume from it, "
                f"write its name into {last} (echo {name} > {last}) and run again.")

    def _load_file(self, filename: str):
        try:
            if filename.endswith(".pkl") and self.allow_pickle:
                return super()._load_file(filename)  # detectron2's and Caffe2's model zoo formats
            loaded = load_checkpoint_file(filename, self.allow_pickle)
        except CheckpointError as e:
            if self._resuming:
                raise CheckpointError(f"--resume: {e}.{self._previous_checkpoint(filename)}") from None
            raise
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{self.source} {filename} holds a {type(loaded).__name__}, not a checkpoint dict")
        if filename.endswith(".pyth"):  # pycls, as detectron2 reads it
            state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return loaded if "model" in loaded else {"model": loaded}

    def _load_model(self, checkpoint):
        if not checkpoint.get("matching_heuristics", False):  # names that detectron2 maps by heuristics are not compared
            sd = checkpoint["model"]
            if sd and all(k.startswith("module.") for k in sd):
                sd = {k[len("module."):]: v for k, v in sd.items()}
            source = f"the checkpoint {self._loading}" if self._resuming else f"{self.source} {self._loading}"
            check_state_dict_fit(self.model, sd, source, complete=self.complete or self._resuming)
        return super()._load_model(checkpoint)
