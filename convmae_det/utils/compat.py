"""What this detectron2 can do: compiled ops present or not, and config checks against them."""
import importlib

__all__ = ["has_compiled_ops", "check_compiled_ops", "MissingCompiledOpError"]


class MissingCompiledOpError(AttributeError, RuntimeError):
    """A compiled op of detectron2 (``detectron2._C``) is asked for but this detectron2 has none.

    Raised by :func:`check_compiled_ops` when a config needs such an op, and by the stand-in
    ``detectron2/_C.py`` that ``tools/install_detectron2.py`` writes when ``_C.<op>`` is looked up
    (the stand-in imports this class). An AttributeError because a module's ``__getattr__``
    must raise one for ``hasattr``/``getattr(_C, name, default)`` and ``from detectron2._C
    import name`` to keep their meaning; a RuntimeError because that is what it is for code
    that catches errors of a run.
    """


def has_compiled_ops() -> bool:
    """True when detectron2._C is a real compiled extension (not convmae-det's stand-in)."""
    try:
        C = importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return not getattr(C, "CONVMAE_DET_STUB", False)


def _requested_ops(cfg):
    """(config key, value, compiled op) for every setting that needs detectron2._C."""
    m = cfg.MODEL
    found = []
    if any(m.RESNETS.DEFORM_ON_PER_STAGE):
        found.append(("MODEL.RESNETS.DEFORM_ON_PER_STAGE", list(m.RESNETS.DEFORM_ON_PER_STAGE), "deform_conv_forward"))
    if m.PROPOSAL_GENERATOR.NAME == "RRPN":
        found.append(("MODEL.PROPOSAL_GENERATOR.NAME", "RRPN", "nms_rotated / box_iou_rotated"))
    if m.ANCHOR_GENERATOR.NAME == "RotatedAnchorGenerator":
        found.append(("MODEL.ANCHOR_GENERATOR.NAME", "RotatedAnchorGenerator", "box_iou_rotated"))
    if m.ROI_HEADS.NAME == "RROIHeads":
        found.append(("MODEL.ROI_HEADS.NAME", "RROIHeads", "box_iou_rotated / nms_rotated"))
    for key in ("ROI_BOX_HEAD", "ROI_MASK_HEAD", "ROI_KEYPOINT_HEAD"):
        if getattr(m, key).POOLER_TYPE == "ROIAlignRotated":
            found.append((f"MODEL.{key}.POOLER_TYPE", "ROIAlignRotated", "roi_align_rotated_forward"))
    # "true"/"auto" are served by faster-coco-eval too (convmae_det.evaluation)
    if str(cfg.TEST.FAST_COCO_EVAL).strip().lower() == "compiled":
        found.append(("TEST.FAST_COCO_EVAL", cfg.TEST.FAST_COCO_EVAL, "COCOevalEvaluateImages"))
    return found


def check_compiled_ops(cfg) -> None:
    """Raise a clear error at start-up if the config asks for an op this detectron2 lacks."""
    if has_compiled_ops():
        return
    found = _requested_ops(cfg)
    if found:
        lines = [f"  {k} = {v!r} needs detectron2._C.{op}" for k, v, op in found]
        raise MissingCompiledOpError(
            "this detectron2 has no compiled ops (detectron2._C), but the config asks for them:\n"
            + "\n".join(lines)
            + "\nbuild detectron2 from source with its C++/CUDA ops, or change these keys"
        )
