"""The package as pip installs it (not editable), used from another folder: packaged configs by
name, models built from them, the console scripts; and config names in a clone."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from convmae_det.engine import setup_cfg
from convmae_det.model_zoo import get_config_file, list_configs

BUILD = r"""
import json, sys
import convmae_det
from detectron2.modeling import build_model
from convmae_det.engine import setup_cfg
from convmae_det.model_zoo import get_config_file

out = {"package": convmae_det.__file__, "models": {}}
for name, opts in (("COCO/mask_rcnn_convmae_base_25ep.yaml", []),
                   ("COCO/mask_rcnn_convmae_base_25ep.yaml", ["MODEL.CONVMAE.SIZE", "tiny"]),
                   ("Shapes/mask_rcnn_convmae_tiny_shapes.yaml", [])):
    path = get_config_file(name)
    model = build_model(setup_cfg(path, ["MODEL.DEVICE", "cpu", *opts]))
    windowed = [b.attn.window_size > 0 for b in model.backbone.net.blocks3]
    out["models"][" ".join([name, *opts])] = dict(config=path, params=sum(p.numel() for p in model.parameters()),
                                                 global_blocks=[i for i, w in enumerate(windowed) if not w])
json.dump(out, sys.stdout)
"""


def _configs_under(root):
    return sorted(os.path.relpath(p, root).replace(os.sep, "/") for pat in ("*.yaml", "*.py")
                  for p in glob.glob(os.path.join(root, "**", pat), recursive=True))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip install --target of a copy of the checkout (no network, no build isolation)."""
    tmp = tmp_path_factory.mktemp("install")
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "datasets", "output", "build", "*.egg-info", "__pycache__", ".venv", ".pytest_cache"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--target", str(target), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return target, elsewhere, dict(env, PYTHONPATH=str(target))


def test_installed_package_ships_every_config_and_builds_models_from_them(installed):
    target, elsewhere, env = installed
    packaged = os.path.join(target, "convmae_det", "model_zoo", "configs")
    assert _configs_under(packaged) == _configs_under(os.path.join(ROOT, "configs"))
    r = subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["package"].startswith(str(target))  # the installed copy, not this checkout
    models = out["models"]
    assert all(m["config"].startswith(packaged) for m in models.values())
    base = models["COCO/mask_rcnn_convmae_base_25ep.yaml"]
    assert base["global_blocks"] == [1, 4, 7, 10] and base["params"] > 100e6
    # the Base config with SIZE tiny: the global blocks follow the size
    assert models["COCO/mask_rcnn_convmae_base_25ep.yaml MODEL.CONVMAE.SIZE tiny"]["global_blocks"] == [1, 3]
    assert models["Shapes/mask_rcnn_convmae_tiny_shapes.yaml"]["global_blocks"] == [1, 3]


def test_installed_console_scripts_run(installed):
    target, elsewhere, env = installed
    scripts = {os.path.basename(p) for p in glob.glob(os.path.join(target, "bin", "convmae-*"))}
    assert {"convmae-train", "convmae-pretrain", "convmae-convert", "convmae-predict", "convmae-benchmark"} <= scripts
    r = subprocess.run([os.path.join(target, "bin", "convmae-train"), "--help"], capture_output=True, text=True,
                       cwd=elsewhere, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage: convmae-train" in r.stdout and "--config-file" in r.stdout and "--register" in r.stdout


def test_config_names_resolve_from_any_folder_and_unknown_ones_list_the_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "COCO/mask_rcnn_convmae_base_25ep.yaml" in list_configs()
    assert get_config_file("configs/COCO/mask_rcnn_convmae_base_25ep.yaml") == get_config_file(
        "COCO/mask_rcnn_convmae_base_25ep.yaml")
    # a path that is not there from this folder: the config of that name
    cfg = setup_cfg("configs/Shapes/mask_rcnn_convmae_tiny_shapes.yaml", ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.CONVMAE.SIZE == "tiny"
    with pytest.raises(FileNotFoundError, match="available: .*COCO/mask_rcnn_convmae_base_25ep.yaml"):
        get_config_file("COCO/nope.yaml")
    with pytest.raises(FileNotFoundError, match="'nope.yaml' does not exist.*Shapes/mask_rcnn_convmae_tiny_shapes.yaml"):
        setup_cfg("nope.yaml")
