"""tools/predict.py end to end: a tiny Mask R-CNN's (and a tiny SemanticSegmentor's) predictions drawn
on image files."""
import os
import re
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from conftest import ROOT, TINY, tiny_cfg, tool


def test_predict_draws_each_input(tmp_path):
    from detectron2.modeling import build_model

    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(tiny_cfg()).state_dict()}, weights)  # random init is enough
    rng = np.random.default_rng(0)
    inputs = []
    for name in ("a.jpg", "b.png"):
        inputs.append(tmp_path / name)
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(inputs[-1])
    out = tmp_path / "drawn"
    # threshold 0: an untrained model's detections are all drawn, so there is something to see
    cmd = [sys.executable, tool("predict.py"), "--config-file", TINY, "--weights", str(weights),
           "--input", *map(str, inputs), "--output", str(out), "--score-thresh", "0", "MODEL.DEVICE", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = [int(n) for n in re.findall(r": (\d+) instances -> ", r.stdout)]
    assert len(counts) == 2 and all(n > 0 for n in counts), r.stdout
    for src in inputs:
        drawn = np.asarray(Image.open(out / (src.stem + ".png")))
        assert drawn.shape == (96, 128, 3)
        assert (drawn != np.asarray(Image.open(src).convert("RGB"))).any()


def test_predict_draws_semantic_segmentation(tmp_path):
    from detectron2.modeling import build_model

    from convmae_det.engine import setup_cfg

    config = os.path.join(ROOT, "configs", "Shapes", "sem_seg_convmae_tiny_shapes.yaml")
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(setup_cfg(config, ["MODEL.DEVICE", "cpu"])).state_dict()}, weights)
    src = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(src)
    cmd = [sys.executable, tool("predict.py"), "--config-file", config, "--weights", str(weights),
           "--input", str(src), "--output", str(tmp_path / "drawn"), "MODEL.DEVICE", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    found = re.findall(r"a.png: classes (.*) -> ", r.stdout)
    names = {"background", "circle", "triangle", "square", "star", "cross"}
    assert len(found) == 1 and found[0] and set(found[0].split(", ")) <= names, r.stdout
    drawn = np.asarray(Image.open(tmp_path / "drawn" / "a.png"))
    assert drawn.shape == (128, 128, 3) and (drawn != np.asarray(Image.open(src))).any()
