"""COCO evaluation with the fastest exact COCOeval at hand (``TEST.FAST_COCO_EVAL``).

detectron2's fast COCOeval (``COCOeval_opt``) needs its compiled ops (``detectron2._C``), which
a Python-only detectron2 lacks; its COCOEvaluator then evaluates with plain pycocotools.
faster-coco-eval (a maintained reimplementation of pycocotools' COCOeval, the per-image matching
and the accumulation in C++) takes that place here. It gives the same 12 COCO stats as
pycocotools (tests/test_evaluation.py, and ``convmae_det.utils.coco_eval_bench`` on a
COCO-sized case).

``TEST.FAST_COCO_EVAL`` chooses the COCOeval of :class:`COCOEvaluator`:

===================  ==========================================================================
``auto`` (default)   detectron2's compiled COCOeval if this detectron2 has it, else
                     faster-coco-eval if installed, else pycocotools
``true``             the same, but an error at start-up if neither fast one is there
``false``            pycocotools (the official COCO API)
``compiled``         detectron2's compiled COCOeval; an error at start-up if it is missing
``faster_coco_eval`` faster-coco-eval, also where detectron2 has its compiled COCOeval
``pycocotools``      the same as ``false``
===================  ==========================================================================

Only the COCOeval class changes: ground truth and results are loaded by pycocotools as
detectron2 does, and detectron2's results dict, its log lines and its ``copypaste:`` lines
stay what they are.
"""
import contextlib
import importlib
import io
from typing import Tuple

import numpy as np
from detectron2.evaluation import COCOEvaluator as _D2COCOEvaluator

from .utils.compat import MissingCompiledOpError, has_compiled_ops

__all__ = [
    "COCO_EVAL_BACKENDS",
    "COCOEvaluator",
    "cocoeval_class",
    "drop_degenerate_polygons",
    "has_faster_coco_eval",
    "resolve_coco_eval_backend",
]

COCO_EVAL_BACKENDS = ("compiled", "faster_coco_eval", "pycocotools")
_ON = ("true", "1", "yes", "on")
_OFF = ("false", "0", "no", "off", "pycocotools")
FASTER_COCO_EVAL_PIP = "faster-coco-eval==1.8.0"  # the version of requirements.txt


def has_faster_coco_eval() -> bool:
    """True when the faster-coco-eval package (with its compiled core) imports."""
    try:
        importlib.import_module("faster_coco_eval.core.faster_eval_api")
    except ImportError:
        return False
    return True


def resolve_coco_eval_backend(value) -> str:
    """The COCOeval (one of :data:`COCO_EVAL_BACKENDS`) that a ``TEST.FAST_COCO_EVAL`` value
    asks for on this machine. Raises a ValueError for an unknown value, and an error naming
    what is missing when a fast evaluator is asked for explicitly but not installed."""
    v = str(value).strip().lower()  # YAML may hand over a bool
    if v in _OFF:
        return "pycocotools"
    if v in ("auto",) + _ON:
        if has_compiled_ops():
            return "compiled"
        if has_faster_coco_eval():
            return "faster_coco_eval"
        if v == "auto":
            return "pycocotools"
        raise ImportError(
            f"TEST.FAST_COCO_EVAL = {value!r} asks for a fast COCOeval, but detectron2 has no compiled "
            f"ops and faster-coco-eval is not installed: pip install {FASTER_COCO_EVAL_PIP}"
        )
    if v == "compiled":
        if not has_compiled_ops():
            raise MissingCompiledOpError(
                f"TEST.FAST_COCO_EVAL = {value!r} needs detectron2._C.COCOevalEvaluateImages, but this "
                "detectron2 has no compiled ops; use 'auto' (faster-coco-eval) or build detectron2 with its ops"
            )
        return "compiled"
    if v == "faster_coco_eval":
        if not has_faster_coco_eval():
            raise ImportError(
                f"TEST.FAST_COCO_EVAL = {value!r} but faster-coco-eval is not installed: pip install {FASTER_COCO_EVAL_PIP}"
            )
        return "faster_coco_eval"
    raise ValueError(
        f"TEST.FAST_COCO_EVAL = {value!r}: expected auto, true, false, {', '.join(COCO_EVAL_BACKENDS)}"
    )


def cocoeval_class(backend: str):
    """The COCOeval class of a backend, constructed as ``cls(coco_gt, coco_dt, iou_type)`` and
    run with ``evaluate(); accumulate(); summarize()`` like pycocotools' (summarize prints)."""
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        return COCOeval
    if backend == "compiled":
        from detectron2.evaluation.fast_eval_api import COCOeval_opt

        return COCOeval_opt
    if backend == "faster_coco_eval":
        # the drop-in class of faster-coco-eval: COCOeval_faster that prints like pycocotools
        from faster_coco_eval.core.faster_eval_api import COCOeval

        return COCOeval
    raise ValueError(f"unknown COCOeval backend {backend!r}; expected one of {COCO_EVAL_BACKENDS}")


def drop_degenerate_polygons(coco_api) -> Tuple[int, int]:
    """Remove the polygons of fewer than 3 points from a pycocotools ``COCO`` ground truth, and
    the instances left without a polygon: detectron2's ``load_coco_json`` drops the same ones
    for training, and pycocotools cannot rasterise them (``TypeError: Argument 'bb'``). Returns
    (polygons dropped, instances dropped)."""
    polygons, kept = 0, []
    for ann in coco_api.dataset.get("annotations", []):
        segm = ann.get("segmentation")
        if isinstance(segm, list):
            valid = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
            polygons += len(segm) - len(valid)
            if not valid:
                continue
            ann["segmentation"] = valid
        kept.append(ann)
    instances = len(coco_api.dataset.get("annotations", [])) - len(kept)
    if polygons or instances:
        coco_api.dataset["annotations"] = kept
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
            coco_api.createIndex()
    return polygons, instances


@contextlib.contextmanager
def _detectron2_fast_cocoeval(cls):
    """Make ``cls`` detectron2's fast COCOeval for the duration.

    detectron2's COCOEvaluator picks its COCOeval by the module global ``COCOeval_opt`` at
    evaluation time (v0.6 in ``_evaluate_predictions_on_coco``, main in ``_eval_predictions``),
    so replacing that name while one evaluation runs routes both releases through ``cls``.
    """
    from detectron2.evaluation import coco_evaluation

    saved = coco_evaluation.COCOeval_opt
    coco_evaluation.COCOeval_opt = cls
    try:
        yield
    finally:
        coco_evaluation.COCOeval_opt = saved


class COCOEvaluator(_D2COCOEvaluator):
    """detectron2's COCOEvaluator with the COCOeval of ``backend`` (see
    :func:`resolve_coco_eval_backend`); every other argument is detectron2's.

    After :meth:`evaluate`, ``coco_stats[task]`` holds the COCOeval's ``stats`` of each task
    (the 12 numbers its summary prints; detectron2's results keep the first 6) and
    ``cocoeval_used[task]`` the COCOeval class that computed them."""

    def __init__(self, dataset_name, *args, backend: str = "pycocotools", **kwargs):
        if backend not in COCO_EVAL_BACKENDS:
            raise ValueError(f"unknown COCOeval backend {backend!r}; expected one of {COCO_EVAL_BACKENDS}")
        if "use_fast_impl" in kwargs:
            raise TypeError("convmae_det's COCOEvaluator takes backend=..., not use_fast_impl")
        super().__init__(dataset_name, *args, use_fast_impl=backend == "compiled", **kwargs)
        self.backend = backend
        self.coco_stats, self.cocoeval_used = {}, {}
        polygons, instances = drop_degenerate_polygons(self._coco_api)
        if polygons or instances:
            self._logger.warning(
                f"{dataset_name}: dropped {polygons} polygon(s) of fewer than 3 points from the evaluation ground truth, "
                f"and {instances} instance(s) left without one, as detectron2's training loader does"
            )
        if backend == "faster_coco_eval":
            self._cocoeval_cls = cocoeval_class(backend)
            self._use_fast_impl = True

    def _eval_predictions(self, predictions, img_ids=None):
        self.coco_stats, self.cocoeval_used = {}, {}
        if self.backend != "faster_coco_eval":
            return super()._eval_predictions(predictions, img_ids=img_ids)
        self._logger.info("COCOeval: faster-coco-eval (exact reimplementation of pycocotools' COCOeval)")
        with _detectron2_fast_cocoeval(self._cocoeval_cls):
            return super()._eval_predictions(predictions, img_ids=img_ids)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is not None:
            self.coco_stats[iou_type] = np.array(coco_eval.stats, dtype=np.float64)
            self.cocoeval_used[iou_type] = f"{type(coco_eval).__module__}.{type(coco_eval).__qualname__}"
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
