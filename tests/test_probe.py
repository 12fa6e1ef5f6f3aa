"""The frozen-encoder probe (convmae_det.pretrain.probe), its tool (tools/probe.py) and
pretraining's --probe-every; the pyramid's feature norm (MODEL.CONVMAE.PYRAMID.FEATURE_NORM)."""
import json
import os
import runpy

import pytest
import torch
from torchvision.ops import roi_align

from conftest import tiny_cfg, tiny_convvit_kwargs, tiny_mae_kwargs, tool
from convmae_det.data import ShapesSpec, generate_shapes_dataset
from convmae_det.modeling.convvit import ConvViT
from convmae_det.modeling.pyramid import MultiScaleSimpleFeaturePyramid, SimpleFeaturePyramid
from convmae_det.pretrain import ConvMAE
from convmae_det.pretrain.probe import box_features, knn_probe, linear_probe, load_shapes_probe, run_probe


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    spec = ShapesSpec(num_train=24, num_val=12, image_size=64, min_size=12, max_size=40)
    return generate_shapes_dataset(str(tmp_path_factory.mktemp("probe") / "shapes"), spec)["root"]


def test_probe_data_are_the_json_boxes_and_classes(shapes):
    train, test = load_shapes_probe(shapes, 10)
    coco = json.load(open(os.path.join(shapes, "annotations", "instances_train.json")))
    first = min(im["id"] for im in coco["images"])
    anns = [a for a in coco["annotations"] if a["image_id"] == first]
    x, y, w, h = anns[0]["bbox"]
    assert train.boxes[0][0].tolist() == pytest.approx([x, y, x + w, y + h])
    assert train.labels[0].tolist() == [a["category_id"] - 1 for a in anns]  # ids 1-5 -> 0-4
    assert train.images.shape == (10, 3, 64, 64) and len(test.boxes) == 10 and train.num_classes == 5


def test_box_features_are_roi_aligned_stage_maps(shapes):
    train, _ = load_shapes_probe(shapes, 4)
    enc = ConvViT(**tiny_convvit_kwargs())
    feats = box_features(enc, train, pool=2)
    assert feats.shape == (train.num_boxes, (32 + 48 + 64) * 4)
    with torch.no_grad():
        s4, s8, s16 = enc.eval().forward_stages(train.images[:1])
    box = [train.boxes[0][:1]]
    want = torch.cat([roi_align(m, box, 2, spatial_scale=1 / s, sampling_ratio=2, aligned=True).flatten(1)
                      for m, s in ((s4, 4), (s8, 8), (s16, 16))], 1)
    assert torch.allclose(feats[:1], want, atol=1e-6)


def test_classifiers_separate_informative_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 16, generator=g)
    informative = x + 6.0 * torch.nn.functional.one_hot(y, 16).float()
    for probe in (linear_probe, knn_probe):
        assert probe(informative[:100], y[:100], informative[100:], y[100:], 4) > 95
        assert probe(x[:100], y[:100], x[100:], y[100:], 4) < 50  # noise: near chance (25)


def test_probe_is_deterministic_and_tells_encoders_apart(shapes):
    train, test = load_shapes_probe(shapes, 12)
    torch.manual_seed(0)
    a = ConvMAE(**tiny_mae_kwargs())
    first, again = run_probe(a, train, test), run_probe(a, train, test)
    assert first == again and set(first) == {"linear", "knn"} and a.training  # mode restored
    torch.manual_seed(1)
    assert run_probe(ConvMAE(**tiny_mae_kwargs()), train, test) != first


def test_pretraining_probes_every_n_steps_and_the_tool_repeats_it(shapes, tmp_path, capsys):
    pretrain = runpy.run_path(tool("pretrain.py"))["main"]
    out = tmp_path / "run"
    args = ["--data", os.path.join(shapes, "train"), "--output", str(out), "--size", "tiny", "--img-size", "64",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--num-workers", "0", "--device", "cpu",
            "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1", "--steps", "4", "--checkpoint-every", "2",
            "--keep-last", "0", "--probe-every", "2", "--probe-data", shapes, "--probe-images", "8"]
    pretrain(args + ["--stop-at", "2"])
    pretrain(args + ["--resume"])  # the resumed run continues probe.jsonl
    rows = [json.loads(line) for line in open(out / "probe.jsonl")]
    assert [r["step"] for r in rows] == [0, 2, 4] and (out / "probe.png").stat().st_size > 0
    probe = runpy.run_path(tool("probe.py"))["main"]
    again = probe([str(out / "checkpoint-2.pth"), str(out / "checkpoint-4.pth"), "--data", shapes, "--images", "8",
                   "--out", str(tmp_path / "offline")])
    assert [(r["step"], r["linear"], r["knn"]) for r in again] == [(r["step"], r["linear"], r["knn"]) for r in rows]
    assert (tmp_path / "offline" / "probe.png").is_file()
    with pytest.raises(SystemExit):
        pretrain(args[:-4] + ["--overwrite"])
    assert "--probe-every needs --probe-data" in capsys.readouterr().err


class _Offset(torch.nn.Module):
    """A ConvViT whose outputs get a per-channel constant: the offset pretraining builds."""

    def __init__(self, net, offset):
        super().__init__()
        self.net, self.offset = net, offset

    def output_shape(self):
        return self.net.output_shape()

    def forward(self, x):
        return {k: v + self.offset[: v.shape[1], None, None] * 10 for k, v in self.net(x).items()}


@pytest.mark.parametrize("channels_last", [True, False])
def test_feature_norm_removes_per_channel_offsets(channels_last):
    x = torch.randn(2, 3, 64, 64)
    offset = torch.randn(64)
    outs = {}
    for norm in ("", "BN"):
        torch.manual_seed(0)
        net = ConvViT(**tiny_convvit_kwargs(), out_features=("s8", "s16", "s32"))
        pyr = MultiScaleSimpleFeaturePyramid(net, out_channels=16, in_features=("s8", "s16", "s32"),
                                             channels_last=channels_last, feature_norm=norm)
        plain = pyr(x)
        pyr.net = _Offset(net, offset)
        outs[norm] = max((plain[k] - v).abs().max().item() for k, v in pyr(x).items())
    assert outs["BN"] < 1e-4 < outs[""], outs
    sfp = SimpleFeaturePyramid(ConvViT(**tiny_convvit_kwargs(), out_features=("s16",)), "s16", 16, (2.0, 1.0),
                               feature_norm="BN")
    assert list(sfp.feature_norm) == ["s16"] and not list(sfp.feature_norm.parameters())  # no affine


def test_feature_norm_config_key_builds_and_names_a_bad_value():
    from detectron2.modeling import build_model

    model = build_model(tiny_cfg("MODEL.CONVMAE.PYRAMID.FEATURE_NORM", "BN"))
    assert sorted(model.backbone.feature_norm) == ["s16", "s32", "s8"]
    with pytest.raises(ValueError, match="feature norm 'GN' is not one of"):
        build_model(tiny_cfg("MODEL.CONVMAE.PYRAMID.FEATURE_NORM", "GN"))
