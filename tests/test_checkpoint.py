import argparse
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from convmae_det.checkpoint import (
    CheckpointError,
    convert_state_dict,
    infer_encoder_size,
    load_checkpoint_file,
    unwrap_state_dict,
)
from convmae_det.engine import setup_cfg
from convmae_det.pretrain import convmae_pretrain
from conftest import BASE, ROOT, TINY, tiny_cfg, tool

CONVERT = tool("convert_pretrain.py")


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(tiny_cfg())


@pytest.fixture(scope="module")
def tiny_pretrain_sd():
    torch.manual_seed(0)
    return convmae_pretrain("tiny", decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2).state_dict()


def _encoder_missing(model, sd):
    incompatible = model.load_state_dict(sd, strict=False)
    return [k for k in incompatible.missing_keys if k.startswith("backbone.net.")], incompatible.unexpected_keys


@pytest.mark.parametrize("layout", ["pretrain-full", "pretrain-encoder", "detection"])
def test_official_layouts_convert_with_no_encoder_key_missing(layout, tiny_model, tiny_pretrain_sd):
    sd = dict(tiny_pretrain_sd)
    if layout == "pretrain-encoder":
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder") and k != "mask_token"}
    if layout == "detection":
        sd = {"backbone.net." + k: v for k, v in sd.items()
              if not k.startswith(("decoder", "norm.", "stage1_", "stage2_")) and k != "mask_token"}
        sd.update({k: v + 1 for k, v in tiny_model.state_dict().items() if not k.startswith("backbone.net.")})
    target = tiny_model.state_dict()
    out, report = convert_state_dict(sd, target)
    assert report.layout == layout
    missing, unexpected = _encoder_missing(tiny_model, out)
    assert missing == [] and unexpected == []
    # placed tensors are the checkpoint's, the rel-pos tables the model's own (zero) init
    key = "backbone.net.blocks3.0.attn.qkv.weight"
    src = sd[key] if layout == "detection" else sd["blocks3.0.attn.qkv.weight"]
    assert torch.equal(out[key], src)
    assert all("rel_pos" in k for k in report.initialised)
    if layout != "detection":
        assert any(k == "decoder_pred.weight" for k, _ in report.dropped) == (layout == "pretrain-full")
        assert any(k.startswith("backbone.simfp_") for k in report.missing)


def test_pos_embed_is_resampled_and_shape_mismatch_named(tiny_model, tiny_pretrain_sd):
    sd = dict(tiny_pretrain_sd)
    sd["pos_embed"] = torch.randn(1, 64, sd["pos_embed"].shape[2])  # an 8x8 grid (128 px pretraining)
    out, report = convert_state_dict(sd, tiny_model.state_dict())
    assert out["backbone.net.pos_embed"].shape == tiny_model.backbone.net.pos_embed.shape
    assert report.resampled[0][0] == "backbone.net.pos_embed"
    sd["blocks3.0.attn.qkv.weight"] = torch.randn(12, 4)
    with pytest.raises(CheckpointError, match=r"blocks3.0.attn.qkv.weight.*\(12, 4\).*\(768, 256\)"):
        convert_state_dict(sd, tiny_model.state_dict())


def test_unreadable_and_untrusted_inputs_are_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint_file(str(bad))
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": argparse.ArgumentParser}, evil)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_checkpoint_file(str(evil))
    assert "model" in load_checkpoint_file(str(evil), allow_pickle=True)
    ok = tmp_path / "ok.pth"
    torch.save({"model": {"a": torch.ones(2)}, "epoch": 3, "args": argparse.Namespace(lr=1.0)}, ok)
    assert torch.equal(unwrap_state_dict(load_checkpoint_file(str(ok)))["a"], torch.ones(2))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(str(tmp_path / "nope.pth"))


def test_infer_size_from_shapes(tiny_pretrain_sd):
    size = infer_encoder_size(tiny_pretrain_sd)
    assert size["embed_dims"] == (64, 128, 256) and size["depths"] == (1, 1, 4) and size["mlp_ratio"] == 4.0


def test_our_pretraining_checkpoint_finetunes_with_no_backbone_key_missing(tmp_path, tiny_pretrain_sd):
    src = tmp_path / "checkpoint.pth"
    torch.save({"model": tiny_pretrain_sd, "optimizer": {}, "step": 10, "args": {"size": "tiny"}}, src)
    out = tmp_path / "d2.pth"
    r = subprocess.run([sys.executable, CONVERT, str(src), str(out), "--config", TINY],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "backbone.net.blocks3.0.attn.rel_pos_h" in r.stdout  # listed as initialised
    assert set(torch.load(out, weights_only=True)) == {"model"}
    sd = torch.load(out, weights_only=True)["model"]
    model = build_model(tiny_cfg())
    # detectron2's own loading (the public Checkpointer.load, as MODEL.WEIGHTS is loaded) reads
    # the file and puts every encoder tensor of it into the model
    assert DetectionCheckpointer(model).load(str(out)) == {}
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if k.startswith("backbone.net."))
    missing, unexpected = _encoder_missing(model, sd)
    assert missing == [] and unexpected == []
    # a config of another size is a clear error naming both sides; the output is untouched
    before = out.read_bytes()
    r = subprocess.run([sys.executable, CONVERT, str(src), str(out), "--config", BASE],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "(64, 128, 256)" in r.stderr and "(256, 384, 768)" in r.stderr
    assert out.read_bytes() == before


def test_official_base_checkpoint_converts_for_the_coco_config(tmp_path):
    torch.manual_seed(0)
    sd = convmae_pretrain("base").state_dict()
    src = tmp_path / "convmae_base_full.pth"
    torch.save({"model": sd, "epoch": 1599, "args": argparse.Namespace(model="convmae_base")}, src)
    out = tmp_path / "out.pth"
    r = subprocess.run([sys.executable, CONVERT, str(src), str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = setup_cfg(BASE, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    missing, unexpected = _encoder_missing(model, torch.load(out, weights_only=True)["model"])
    assert missing == [] and unexpected == []
    assert torch.equal(model.backbone.net.blocks3[10].mlp.fc2.weight, sd["blocks3.10.mlp.fc2.weight"])


def test_train_net_refuses_weights_that_do_not_fit_the_backbone(tmp_path, tiny_model):
    from convmae_det.engine.trainer import check_weights_fit

    good = tmp_path / "good.pth"
    torch.save({"model": tiny_model.state_dict()}, good)
    check_weights_fit(tiny_model, str(good))
    bad_sd = dict(tiny_model.state_dict())
    bad_sd["backbone.net.patch_embed1.proj.weight"] = torch.zeros(8, 3, 4, 4)
    bad_sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 256)  # heads may differ
    bad = tmp_path / "bad.pth"
    torch.save({"model": bad_sd}, bad)
    with pytest.raises(CheckpointError, match=r"patch_embed1.proj.weight: checkpoint \(8, 3, 4, 4\), model \(64, 3, 4, 4\)"):
        check_weights_fit(tiny_model, str(bad))
    head_only = dict(tiny_model.state_dict())
    head_only["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 256)
    torch.save({"model": head_only}, bad)
    check_weights_fit(tiny_model, str(bad))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(CheckpointError, match="not a readable"):
        check_weights_fit(tiny_model, str(corrupt))
