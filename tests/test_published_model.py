"""The published ConvMAE-Det model (a detectron2-main ViTDet checkpoint with a ConvMAE backbone)
evaluates with tools/train_net.py --eval-only and the COCO config, every tensor used.

The stand-in is tiny, with the official names (tests/reference_keys.py), saved as detectron2
main's DetectionCheckpointer saves ``model_final.pth`` after training: ``torch.save`` of
``{"model": state dict, "trainer": ..., "iteration": ...}``.
"""
import logging
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from convmae_det.data import ShapesSpec, generate_shapes_dataset
from conftest import BASE, ROOT, tool
from reference_keys import convmae_det_official_shapes

DIMS, DEPTHS, HEADS, WINDOW, GLOBAL, IMG = (32, 48, 64), (2, 2, 3), 2, 4, (1,), 128
# the COCO config (the official model's structure) at the stand-in's sizes, on 128 px images
SIZE_OPTS = [
    "MODEL.CONVMAE.EMBED_DIMS", str(list(DIMS)), "MODEL.CONVMAE.DEPTHS", str(list(DEPTHS)),
    "MODEL.CONVMAE.NUM_HEADS", str(HEADS), "MODEL.CONVMAE.WINDOW_SIZE", str(WINDOW),
    "MODEL.CONVMAE.GLOBAL_ATTN_INDEXES", str(list(GLOBAL)), "MODEL.CONVMAE.REL_POS_IMG_SIZE", str(IMG),
    "MODEL.CONVMAE.SQUARE_PAD", str(IMG), "INPUT.LSJ.IMAGE_SIZE", str(IMG),
    "INPUT.MIN_SIZE_TEST", str(IMG), "INPUT.MAX_SIZE_TEST", str(IMG),
    "MODEL.CONVMAE.PYRAMID.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_HEADS.NUM_CLASSES", "5",
]
# what fvcore's Checkpointer logs for a tensor it did not place, a parameter it did not fill,
# or a shape that does not fit
NOT_USED, NOT_FOUND, SKIPPED = "not used by the model", "not found in the checkpoint", "Skip loading parameter"


def official_state_dict():
    shapes = convmae_det_official_shapes(
        DIMS, DEPTHS, HEADS, WINDOW, GLOBAL, IMG // 16, out_channels=32, box_conv=32, box_fc=64, mask_conv=32, num_classes=5,
    )
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        (k, 1.0 + 0.1 * torch.randn(s, generator=g) if "norm" in k and k.endswith("weight") else 0.05 * torch.randn(s, generator=g))
        for k, s in shapes.items()
    )


def save_like_detectron2_main(sd, path):
    """model_final.pth as detectron2 main's lazyconfig_train_net.py (AMPTrainer) leaves it."""
    torch.save({
        "model": sd,
        "trainer": {
            "iteration": 184374,
            "hooks": {"LRScheduler": {"base_lrs": [1e-4], "last_epoch": 184375}},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "weight_decay": 0.1, "params": [0]}]},
            "grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 17},
        },
        "iteration": 184374,
    }, path)


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "model_final.pth"
    save_like_detectron2_main(official_state_dict(), str(path))
    return path


def build_coco_model(*opts):
    from detectron2.modeling import build_model

    from convmae_det.engine import setup_cfg

    return build_model(setup_cfg(BASE, ["MODEL.DEVICE", "cpu", *SIZE_OPTS, *opts]))


def test_the_coco_config_builds_exactly_the_official_tensors():
    official = {k: tuple(v.shape) for k, v in official_state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in build_coco_model().state_dict().items()}
    assert sorted(set(ours) ^ set(official)) == []
    assert {k: s for k, s in ours.items() if official[k] != s} == {}


def test_the_checkpointer_reports_keys_it_cannot_place(official_checkpoint, tmp_path, caplog):
    """The control for the log checks below: an extra and a missing tensor are reported."""
    from detectron2.checkpoint import DetectionCheckpointer

    sd = official_state_dict()
    sd["roi_heads.box_head.fc2.weight"] = sd.pop("roi_heads.box_head.fc1.weight")
    save_like_detectron2_main(sd, str(tmp_path / "renamed.pth"))
    with caplog.at_level(logging.INFO):
        DetectionCheckpointer(build_coco_model()).load(str(tmp_path / "renamed.pth"))
    assert NOT_USED in caplog.text and NOT_FOUND in caplog.text and "fc2.weight" in caplog.text


def test_official_checkpoint_evaluates_with_eval_only(official_checkpoint, tmp_path):
    data = generate_shapes_dataset(str(tmp_path / "shapes"), ShapesSpec(num_train=1, num_val=3, image_size=IMG, seed=5))
    cmd = [
        sys.executable, tool("train_net.py"), "--config-file", BASE, "--eval-only",
        "--register", "pub_val", data["val"], os.path.join(data["root"], "val"),
        *SIZE_OPTS, "MODEL.WEIGHTS", str(official_checkpoint), "DATASETS.TEST", "('pub_val',)",
        "OUTPUT_DIR", str(tmp_path / "eval"), "TEST.VIS_NUM_IMAGES", "0", "DATALOADER.NUM_WORKERS", "0",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert f"Loading from {official_checkpoint}" in log or str(official_checkpoint) in log
    for message in (NOT_USED, NOT_FOUND, SKIPPED):
        assert message not in log, log[log.index(message) - 200:][:2000]
    assert "copypaste: Task: bbox" in log and "copypaste: Task: segm" in log


def test_the_conversion_tool_places_every_tensor_too():
    """tools/convert_pretrain.py (optional for this layout) keeps the file whole."""
    from convmae_det.checkpoint import convert_state_dict

    out, report = convert_state_dict(official_state_dict(), build_coco_model().state_dict())
    assert report.layout == "detection"
    assert (report.dropped, report.missing, report.initialised, report.resampled) == ([], [], [], [])
    assert len(out) == len(report.placed) == len(official_state_dict())
