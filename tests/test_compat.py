"""The compiled-ops stand-in that tools/install_detectron2.py writes as detectron2/_C.py."""
import importlib

import pytest

from convmae_det.utils.compat import MissingCompiledOpError, has_compiled_ops


@pytest.mark.skipif(has_compiled_ops(), reason="this detectron2 has its compiled ops")
def test_stand_in_raises_the_config_checks_error_and_keeps_attribute_probing():
    C = importlib.import_module("detectron2._C")
    with pytest.raises(MissingCompiledOpError, match="deform_conv_forward"):
        C.deform_conv_forward
    # an AttributeError (what module attribute look-ups must raise) and a RuntimeError
    assert issubclass(MissingCompiledOpError, AttributeError) and issubclass(MissingCompiledOpError, RuntimeError)
    assert not hasattr(C, "nms_rotated") and getattr(C, "box_iou_rotated", None) is None
    with pytest.raises(ImportError):
        from detectron2._C import roi_align_rotated_forward  # noqa: F401
