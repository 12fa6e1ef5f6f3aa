"""TorchScript and ONNX export of a detectron2 Mask R-CNN of this project, through detectron2's
``TracingAdapter``, and the exported file run and compared with the Python model.

What is traced: ``GeneralizedRCNN.inference(inputs, do_postprocess=False)`` for one image, a
C x H x W tensor as the test-time mapper gives it (resized, ``INPUT.FORMAT`` channel order;
normalisation is inside the model). The exported graph returns, in this order,
``pred_boxes`` (N x 4, in the input tensor's coordinates), ``scores`` (N), ``pred_classes`` (N)
and, with a mask head, ``pred_masks`` (N x 1 x M x M mask probabilities). What detectron2 does
after the network (box rescaling to the original image size, pasting the masks) stays in
Python: :class:`ExportedModel` runs it with ``detector_postprocess``, as the model itself does.

The encoder is traced in its reference implementation (``MODEL.CONVMAE.IMPL eager``, the same
parameters and the same function as the default fast path, see ``modeling/reference.py``). The
fast path traces too (under ``torch.jit.trace`` its relative shift is a gather rather than the
custom autograd function, which ``torch.jit.save`` and the ONNX exporter refuse), but the
exported files are checked on the reference. The comparison is always against the Python
model as configured.

A trace records the shapes of its sample input as constants: the exported model takes images
of the sample's size (H x W after the test-time resize), which :class:`ExportedModel` checks.
Every image of a config whose test resize and ``MODEL.CONVMAE.SQUARE_PAD`` give one size (the
built-in dataset's 128 x 128) shares it.
"""
import json
import os
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from .checkpoint import SafeCheckpointer
from .utils.fileio import atomic_write

__all__ = [
    "FORMATS",
    "ONNX_OPSET",
    "build_traceable_model",
    "export_model",
    "ExportedModel",
    "match_detections",
    "compare_predictions",
    "worst_differences",
]

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
ONNX_OPSET = 17  # RoiAlign with aligned (half-pixel) boxes needs >= 16
MANIFEST = "export.json"
FIELDS = ("pred_boxes", "scores", "pred_classes", "pred_masks")


def _tracing_adapter():
    try:
        from detectron2.export import TracingAdapter
    except ImportError as e:  # upstream v0.6 imports caffe2 there; later releases made it optional
        raise ImportError(
            f"detectron2.export does not import ({e}): install detectron2 with tools/install_detectron2.py "
            "(make setup), which makes caffe2 optional there as upstream did after v0.6"
        ) from e
    return TracingAdapter


def build_traceable_model(cfg) -> torch.nn.Module:
    """The model of ``cfg`` with the weights of ``MODEL.WEIGHTS``, in eval mode, with the encoder
    in its traceable reference implementation (same parameters, same function)."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: give the weights of the model to export")
    if "://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} does not exist")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.CONVMAE.IMPL = "eager"
    cfg.freeze()
    model = build_model(cfg)
    # read without running code from the file, and every tensor must fit (detectron2 would skip misfits)
    SafeCheckpointer(model, complete=True).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def _raw_fields(instances: Instances) -> Tuple[torch.Tensor, ...]:
    out = (instances.pred_boxes.tensor, instances.scores, instances.pred_classes)
    return out + ((instances.pred_masks,) if instances.has("pred_masks") else ())


def _inference(model, inputs):
    """(boxes, scores, classes[, mask probabilities]) of one image, before post-processing."""
    return _raw_fields(model.inference(inputs, do_postprocess=False)[0])


def export_model(model: torch.nn.Module, sample: Dict, fmt: str, output_dir: str) -> str:
    """Trace ``model`` (eval mode) on ``sample`` (a test-mapper dict with ``image``) and write
    ``output_dir/model.ts`` or ``model.onnx`` plus ``export.json`` (the format, the output
    names and the input's shape, dtype and channel order). Returns the model file's path."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if model.training:
        raise ValueError("export a model in eval mode (model.eval())")
    image = sample["image"]
    adapter = _tracing_adapter()(model, [{"image": image}], _inference)
    names = list(FIELDS if getattr(model.roi_heads, "mask_on", False) else FIELDS[:3])
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FORMATS[fmt])
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
            with atomic_write(path, "wb") as f:
                torch.jit.save(traced, f)
        else:
            with atomic_write(path, "wb") as f:
                torch.onnx.export(
                    adapter, adapter.flattened_inputs, f, dynamo=False, opset_version=ONNX_OPSET,
                    input_names=["image"], output_names=names,
                    dynamic_axes={n: {0: "detections"} for n in names},
                )
    manifest = {
        "format": fmt,
        "file": FORMATS[fmt],
        "outputs": names,
        "input": {"shape": list(image.shape), "dtype": str(image.dtype).replace("torch.", ""),
                  "channels": getattr(model, "input_format", "BGR")},
    }
    with atomic_write(os.path.join(output_dir, MANIFEST)) as f:
        json.dump(manifest, f, indent=1)
    return path


class ExportedModel:
    """An exported folder (``export.json`` beside ``model.ts`` or ``model.onnx``) run like the
    Python model: ``exported(inputs)`` takes one test-mapper dict (``image``, ``height``,
    ``width``) and returns ``{"instances": Instances}`` at the original image size."""

    def __init__(self, folder: str):
        manifest = os.path.join(folder, MANIFEST)
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"{manifest} does not exist: not a folder written by export_model")
        with open(manifest) as f:
            self.manifest = json.load(f)
        self.format, self.outputs = self.manifest["format"], self.manifest["outputs"]
        path = os.path.join(folder, self.manifest["file"])
        if self.format == "torchscript":
            self._model = torch.jit.load(path, map_location="cpu")
        else:
            import onnxruntime

            self._model = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def raw(self, image: torch.Tensor) -> Instances:
        """The network's outputs for a C x H x W image tensor, before post-processing."""
        want = self.manifest["input"]
        if list(image.shape) != want["shape"] or str(image.dtype).replace("torch.", "") != want["dtype"]:
            raise ValueError(
                f"the exported model was traced on a {want['dtype']} image of shape {want['shape']} and takes "
                f"only that; got {str(image.dtype).replace('torch.', '')} {list(image.shape)}"
            )
        if self.format == "torchscript":
            with torch.no_grad():
                values = self._model(image.cpu())
        else:
            values = [torch.from_numpy(v) for v in self._model.run(None, {"image": image.cpu().numpy()})]
        fields = dict(zip(self.outputs, values))
        fields["pred_boxes"] = Boxes(fields["pred_boxes"])
        return Instances(tuple(image.shape[-2:]), **fields)

    def __call__(self, inputs: Dict) -> Dict[str, Instances]:
        raw = self.raw(inputs["image"])
        h, w = inputs.get("height", raw.image_size[0]), inputs.get("width", raw.image_size[1])
        return {"instances": detector_postprocess(raw, h, w)}


def _postprocessed(raw: Instances, inputs: Dict) -> Instances:
    """detector_postprocess at the original size, keeping the mask probabilities as ``mask_probs``."""
    if raw.has("pred_masks"):
        raw.mask_probs = raw.pred_masks
    h, w = inputs.get("height", raw.image_size[0]), inputs.get("width", raw.image_size[1])
    return detector_postprocess(raw, h, w)


def match_detections(a: Instances, b: Instances, tol: float = 1.0) -> List[Tuple[int, int]]:
    """Pairs (i, j) of detections of ``a`` and ``b`` with the same class, closest first by
    max(box L-inf distance, score difference), each detection in one pair at most; pairs
    farther apart than ``tol`` are not made. Order-free, so that two detections whose scores
    tie within rounding may come out in either order."""
    if not len(a) or not len(b):
        return []
    d = torch.maximum(
        torch.cdist(a.pred_boxes.tensor.double(), b.pred_boxes.tensor.double(), p=float("inf")),
        (a.scores.double()[:, None] - b.scores.double()[None, :]).abs(),
    )
    d[a.pred_classes[:, None] != b.pred_classes[None, :].to(a.pred_classes.dtype)] = float("inf")
    pairs, used_a, used_b = [], set(), set()
    for flat in torch.argsort(d.flatten()).tolist():
        i, j = divmod(flat, len(b))
        if d[i, j] > tol:
            break
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return sorted(pairs)


def compare_predictions(model: torch.nn.Module, exported: ExportedModel, inputs: Dict,
                        atol: float = 1e-3) -> Dict[str, float]:
    """Largest absolute differences between the Python ``model`` and the ``exported`` one on one
    test-mapper dict, over their detections paired by :func:`match_detections`: ``boxes``
    (pixels of the original image), ``scores``, ``mask_probs`` (the M x M mask probabilities
    before pasting) and ``mask_pixels`` (the fraction of pixels of the pasted binary masks that
    differ). ``detections``: the model's count; ``unpaired``: detections of either side without
    a partner. Those are accepted only at the cut-off, as ties that rounding decided the other
    way: a score within ``atol`` of the score threshold, or of the other side's lowest score
    when that side holds ``TEST.DETECTIONS_PER_IMAGE``. Any other one sets every difference to
    ``inf`` and is described under ``mismatch``."""
    with torch.no_grad():
        py = _postprocessed(model.inference([inputs], do_postprocess=False)[0].to("cpu"), inputs)
    ex = _postprocessed(exported.raw(inputs["image"]), inputs)
    pairs = match_detections(py, ex)
    out = {"detections": float(len(py)), "unpaired": float(len(py) + len(ex) - 2 * len(pairs))}
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    thresh, topk = getattr(predictor, "test_score_thresh", 0.0), getattr(predictor, "test_topk_per_image", -1)
    bad = []
    for side, inst, other, paired in (("Python", py, ex, {i for i, _ in pairs}), ("exported", ex, py, {j for _, j in pairs})):
        # the lowest score the other side would have kept: the threshold, or its last one when full
        floor = max(thresh, other.scores.min().item() if len(other) and len(other) >= topk > 0 else thresh)
        for k in sorted(set(range(len(inst))) - paired):
            score = inst.scores[k].item()
            if score > floor + atol:
                bad.append(f"{side} detection {k} (class {inst.pred_classes[k].item()}, score {score:.4f}, box "
                           f"{[round(v, 1) for v in inst.pred_boxes.tensor[k].tolist()]}) has no partner")
    keys = ("boxes", "scores", "mask_probs", "mask_pixels")
    if bad:
        out.update({k: float("inf") for k in keys})
        out["mismatch"] = "; ".join(bad)
        return out
    i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    j = torch.tensor([p[1] for p in pairs], dtype=torch.long)

    def maxdiff(x, y):
        return (x[i].float() - y[j].float()).abs().max().item() if len(pairs) else 0.0

    out["boxes"] = maxdiff(py.pred_boxes.tensor, ex.pred_boxes.tensor)
    out["scores"] = maxdiff(py.scores, ex.scores)
    if py.has("pred_masks"):
        out["mask_probs"] = maxdiff(py.mask_probs, ex.mask_probs)
        out["mask_pixels"] = (py.pred_masks[i] != ex.pred_masks[j]).float().mean().item() if len(pairs) else 0.0
    return out


def worst_differences(rows: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """The largest value of each difference over :func:`compare_predictions` rows, the total
    ``detections`` and ``unpaired``, and ``images``; ``mismatch`` joins the rows' descriptions."""
    worst: Dict = {"images": float(len(rows)), "detections": 0.0, "unpaired": 0.0}
    mismatches: List[str] = []
    for n, r in enumerate(rows):
        for k, v in r.items():
            if k == "mismatch":
                mismatches.append(f"image {n}: {v}")
            elif k in ("detections", "unpaired"):
                worst[k] += v
            else:
                worst[k] = max(worst.get(k, 0.0), v)
    if mismatches:
        worst["mismatch"] = "; ".join(mismatches)
    return worst
