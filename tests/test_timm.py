"""The ConvViT sizes as timm models: registration, features_only, and official files loaded
through the registered checkpoint filter (no download)."""
import pytest
import timm
import torch

import convmae_det  # noqa: F401  (registers the timm models)
from conftest import randomize_
from convmae_det.modeling import CONVVIT_SIZES, ConvViT, ReferenceConvViT
from reference_keys import convmae_encoder_shapes

TINY = CONVVIT_SIZES["tiny"]


def _official_tiny(layout: str, seed: int = 0):
    """Random tensors under the official names of a tiny-size encoder, in a file layout:
    "pretrain-full" (encoder, final norm, a decoder and fusion convs) or "detection"."""
    g = torch.Generator().manual_seed(seed)
    shapes = convmae_encoder_shapes(TINY["embed_dims"], TINY["depths"], include_final_norm=True)
    shapes.update({"mask_token": (1, 1, 32), "decoder_embed.weight": (32, TINY["embed_dims"][2]),
                   "stage1_output_decode.weight": (TINY["embed_dims"][2], TINY["embed_dims"][0], 4, 4)})
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    if layout == "detection":
        sd = {f"backbone.net.{k}": v for k, v in sd.items() if not k.startswith(("norm.", "mask_", "decoder_", "stage"))}
        sd["backbone.simfp_2.0.weight"] = torch.randn(8, 8, 2, 2, generator=g)
    return sd


def _encoder_part(sd):
    """The tensors of ``sd`` that belong to the encoder, by their model names."""
    drop = ("norm.", "mask_", "decoder_", "stage", "backbone.simfp")
    return {k.replace("backbone.net.", ""): v for k, v in sd.items() if not k.startswith(drop)}


def test_registered_on_import():
    assert {"convvit_tiny", "convvit_small", "convvit_base", "convvit_large"} <= set(timm.list_models("convvit_*"))
    cfg = timm.models.get_pretrained_cfg("convvit_base")
    assert cfg.num_classes == 0 and cfg.first_conv == "patch_embed1.proj" and not cfg.has_weights


def test_base_features_only_gives_four_maps_at_strides_4_to_32():
    model = timm.create_model("convvit_base", features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [256, 384, 768, 768]
    feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 256, 16, 16), (1, 384, 8, 8), (1, 768, 4, 4), (1, 768, 2, 2)]
    # the encoder's own names: published weights need no renaming
    names = {k for k in model.state_dict()}
    assert names == {f"model.{k}" for k in convmae_encoder_shapes((256, 384, 768), (2, 2, 11))}


def test_forward_intermediates_are_the_encoder_outputs():
    """forward_intermediates (what features_only calls) gives the maps of the encoder's dict
    output, for the product and the reference alike; out_indices picks among them."""
    model = randomize_(timm.create_model("convvit_tiny")).eval()
    ref = ReferenceConvViT(**TINY).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = list(model(x).values())
        assert list(model(x)) == ["s4", "s8", "s16", "s32"]
        final, feats = model.forward_intermediates(x)
        assert torch.equal(final, want[2]) and all(torch.equal(a, b) for a, b in zip(feats, want))
        ref_feats = ref.forward_intermediates(x, indices=[0, 3], intermediates_only=True)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ref_feats, [want[0], want[3]]))
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(early, want[:2]))
        picked = timm.create_model("convvit_tiny", features_only=True, out_indices=(1, 3))
        picked.model.load_state_dict(model.state_dict())
        assert picked.feature_info.reduction() == [8, 32]
        assert all(torch.equal(a, b) for a, b in zip(picked(x), [want[1], want[3]]))
    with pytest.raises(ValueError, match="no final norm"):
        model.forward_intermediates(x, norm=True)


@pytest.mark.parametrize("layout", ["pretrain-full", "detection"])
@pytest.mark.parametrize("features_only", [False, True])
def test_checkpoint_path_loads_official_files(layout, features_only, tmp_path):
    sd = _official_tiny(layout)
    path = str(tmp_path / "official.pth")
    torch.save({"model": sd}, path)
    model = timm.create_model("convvit_tiny", checkpoint_path=path, features_only=features_only)
    net = model.model if features_only else model
    assert isinstance(net, ConvViT)
    got = net.state_dict()
    for k, v in _encoder_part(sd).items():
        assert torch.equal(got[k], v), k


def test_pretrained_file_overlay_goes_through_the_filter(tmp_path):
    """timm's local-file route (pretrained=True with a file: nothing is downloaded) applies the
    registered checkpoint_filter_fn: the decoder is dropped, the encoder placed."""
    sd = _official_tiny("pretrain-full", seed=1)
    path = str(tmp_path / "convmae_tiny.pth")
    torch.save({"model": sd}, path)
    model = timm.create_model("convvit_tiny", pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=path))
    got = model.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in _encoder_part(sd).items())


def test_checkpoint_with_pickled_training_arguments_loads(tmp_path):
    """An MAE-style training checkpoint: the model under "model" beside an argparse.Namespace
    of the arguments and the epoch (timm's weights-only read allows the Namespace)."""
    import argparse

    sd = _official_tiny("pretrain-full", seed=2)
    path = str(tmp_path / "checkpoint-1599.pth")
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4), "epoch": 1599}, path)
    got = timm.create_model("convvit_tiny", checkpoint_path=path).state_dict()
    assert all(torch.equal(got[k], v) for k, v in _encoder_part(sd).items())


def test_foreign_files_and_classifiers_are_clear_errors(tmp_path):
    path = str(tmp_path / "foreign.pth")
    torch.save({"model": {"stem.weight": torch.zeros(3)}}, path)
    with pytest.raises(RuntimeError, match="Unexpected key.*stem.weight"):
        timm.create_model("convvit_tiny", checkpoint_path=path)
    with pytest.raises(ValueError, match="num_classes must be 0"):
        timm.create_model("convvit_tiny", num_classes=10)
