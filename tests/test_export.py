"""tools/export_model.py: the exported tiny model (TorchScript; ONNX run by onnxruntime) gives
the Python model's boxes, scores, classes and masks on the val images, within 1e-3."""
import os
import subprocess
import sys

import pytest
import torch

from convmae_det.data import ShapesSpec, generate_shapes_dataset
from convmae_det.export import ExportedModel, compare_predictions, match_detections, worst_differences
from conftest import ROOT, TINY, randomize_, tiny_cfg, tool

ATOL = 1e-3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_shapes_dataset(
        str(tmp_path_factory.mktemp("data") / "shapes"), ShapesSpec(num_train=1, num_val=4, image_size=128, seed=5)
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights with non-trivial norms and biases, so that scores spread out."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = randomize_(build_model(tiny_cfg()), std=0.3)
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def val_inputs(cfg, dataset):
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json

    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in load_coco_json(dataset["val"], os.path.join(dataset["root"], "val"))]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_matches_the_python_model(fmt, dataset, weights, tmp_path):
    out = tmp_path / fmt
    cmd = [
        sys.executable, tool("export_model.py"), "--config-file", TINY, "--format", fmt, "--output", str(out),
        "--verify", "0", "--register", "exp_val", dataset["val"], os.path.join(dataset["root"], "val"),
        "MODEL.WEIGHTS", str(weights), "DATASETS.TEST", "('exp_val',)", "MODEL.DEVICE", "cpu",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "OK: every difference within --atol 0.001" in log and "on 4 images" in log

    # the saved files again, in this process: every val image, every detection paired
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = tiny_cfg("MODEL.WEIGHTS", str(weights))
    model = build_model(cfg).eval()  # the fast path, as configured
    DetectionCheckpointer(model).load(str(weights))
    exported = ExportedModel(str(out))
    assert exported.format == fmt and (out / ("model.ts" if fmt == "torchscript" else "model.onnx")).is_file()
    inputs = val_inputs(cfg, dataset)
    rows = [compare_predictions(model, exported, x, ATOL) for x in inputs]
    assert all(r["unpaired"] == 0 for r in rows), rows
    worst = worst_differences(rows)
    assert worst["detections"] >= 4 * 10, "the tiny model should detect something in every image"
    for k in ("boxes", "scores", "mask_probs", "mask_pixels"):
        assert worst[k] <= ATOL, (k, worst)
    # a trace keeps its sample's shapes: another size is a clear error, not a wrong answer
    with pytest.raises(ValueError, match="traced on a uint8 image of shape"):
        exported.raw(inputs[0]["image"][:, :96])


def test_detections_pair_up_regardless_of_order():
    from detectron2.structures import Boxes, Instances

    def inst(boxes, scores, classes):
        return Instances((64, 64), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                         scores=torch.tensor(scores), pred_classes=torch.tensor(classes))

    a = inst([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 9, 9]], [0.5, 0.5, 0.3], [1, 1, 2])
    b = inst([[5, 5, 20, 20.0004], [0, 0, 10, 10], [1, 1, 9, 9]], [0.5000002, 0.5, 0.3], [1, 1, 3])
    assert match_detections(a, b) == [(0, 1), (1, 0)]  # the tie swapped; class 2 vs 3 never pairs
