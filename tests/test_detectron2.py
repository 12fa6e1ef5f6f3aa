
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage

import convmae_det
from convmae_det import add_convmae_config
from convmae_det.engine import setup_cfg
from convmae_det.modeling import LayerNorm2d, MultiScaleSimpleFeaturePyramid, SimpleFeaturePyramid
from convmae_det.solver import get_param_groups
from convmae_det.utils.compat import MissingCompiledOpError, check_compiled_ops, has_compiled_ops
from conftest import BASE, TINY, assert_same_function, randomize_, tiny_cfg
from convmae_det.modeling import ReferenceConvViT
from convmae_det.modeling.convvit import CONVVIT_SIZES, GLOBAL_ATTN_INDEXES
from reference_keys import convmae_base_encoder_shapes


@pytest.mark.parametrize("name,cls", [
    ("build_convmae_sfp_backbone", SimpleFeaturePyramid),
    ("build_convmae_msfp_backbone", MultiScaleSimpleFeaturePyramid),
])
def test_pyramid_outputs_p2_to_p6(name, cls):
    cfg = tiny_cfg("MODEL.BACKBONE.NAME", name, "MODEL.CONVMAE.SQUARE_PAD", "0",
                   "MODEL.CONVMAE.PYRAMID.MSFP_IN_FEATURES", '["s4", "s8", "s16", "s32"]')
    backbone = build_backbone(cfg)
    assert isinstance(backbone, cls)
    out = backbone(torch.randn(1, 3, 96, 64))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for k, spec in backbone.output_shape().items():
        assert out[k].shape == (1, spec.channels, -(-96 // spec.stride), -(-64 // spec.stride)), k


@pytest.mark.parametrize("name", ["build_convmae_sfp_backbone", "build_convmae_msfp_backbone"])
@pytest.mark.parametrize("hw", [(64, 96), (96, 32)])
def test_backbone_equals_reference_forward_and_gradients(name, hw):
    """The whole detection backbone, encoder and pyramid, against MODEL.CONVMAE.IMPL eager (the
    reference: NCHW conv stages, explicit attention, plain NCHW pyramid stages)."""
    opts = ["MODEL.BACKBONE.NAME", name, "MODEL.CONVMAE.SQUARE_PAD", "0",
            "MODEL.CONVMAE.PYRAMID.MSFP_IN_FEATURES", '["s4", "s8", "s16", "s32"]',
            "MODEL.CONVMAE.EMBED_DIMS", "[32, 48, 64]", "MODEL.CONVMAE.DEPTHS", "[1, 1, 2]",
            "MODEL.CONVMAE.NUM_HEADS", "2", "MODEL.CONVMAE.GLOBAL_ATTN_INDEXES", "[1]",
            "MODEL.CONVMAE.WINDOW_SIZE", "3", "MODEL.CONVMAE.PYRAMID.OUT_CHANNELS", "16"]
    fast = randomize_(build_backbone(tiny_cfg(*opts)))
    ref = build_backbone(tiny_cfg(*opts, "MODEL.CONVMAE.IMPL", "eager"))
    assert isinstance(ref.net, ReferenceConvViT) and not ref.channels_last
    assert fast.channels_last and not isinstance(fast.net, ReferenceConvViT)
    assert_same_function(fast, ref, torch.randn(2, 3, *hw, requires_grad=True), atol=1e-4)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="MODEL.CONVMAE.IMPL must be one of"):
        build_backbone(tiny_cfg("MODEL.CONVMAE.IMPL", "flash"))


def test_fast_deconv_keeps_the_autocast_dtype():
    """The channels-last deconvolution adds its fp32 bias to a bf16 matmul: it must stay bf16
    under autocast, as nn.ConvTranspose2d does, rather than be promoted to fp32."""
    from convmae_det.modeling.pyramid import Deconv2x2

    deconv = Deconv2x2(16, 8)
    x = torch.randn(1, 4, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = deconv(x)
        eager = torch.nn.ConvTranspose2d.forward(deconv, x.permute(0, 3, 1, 2))
    assert fast.dtype == eager.dtype == torch.bfloat16
    assert (fast.float() - eager.permute(0, 2, 3, 1).float()).abs().max() < 0.05


def test_square_padding_and_its_errors():
    backbone = build_backbone(tiny_cfg())  # SQUARE_PAD 128
    out = backbone(torch.randn(1, 3, 96, 64))
    assert out["p3"].shape[-2:] == (16, 16)
    with pytest.raises(ValueError, match="larger than the square padding size 128"):
        backbone(torch.randn(1, 3, 160, 64))
    unpadded = build_backbone(tiny_cfg("MODEL.CONVMAE.SQUARE_PAD", "0"))
    with pytest.raises(ValueError, match="multiples of 32"):
        unpadded(torch.randn(1, 3, 48, 64))


def test_sfp_parameter_names_follow_official_detection_checkpoints():
    cfg = tiny_cfg("MODEL.BACKBONE.NAME", "build_convmae_sfp_backbone")
    keys = set(build_backbone(cfg).state_dict())
    for k in ["simfp_2.0.weight", "simfp_2.1.weight", "simfp_2.3.weight", "simfp_2.4.weight",
              "simfp_2.4.norm.weight", "simfp_2.5.norm.bias", "simfp_3.0.weight", "simfp_3.1.norm.weight",
              "simfp_4.0.weight", "simfp_4.1.norm.weight", "simfp_5.1.weight", "simfp_5.2.norm.weight",
              "net.patch_embed1.proj.weight", "net.blocks3.0.attn.rel_pos_h"]:
        assert k in keys, k


def test_base_coco_config_builds_with_official_encoder_names():
    cfg = get_cfg()
    add_convmae_config(cfg)
    cfg.merge_from_file(BASE)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    prefix = "backbone.net."
    enc = {k[len(prefix):]: tuple(v.shape) for k, v in model.state_dict().items()
           if k.startswith(prefix) and "rel_pos" not in k}
    assert enc == convmae_base_encoder_shapes()
    assert isinstance(model.roi_heads.box_head.conv1.norm, LayerNorm2d)
    assert isinstance(model.roi_heads.mask_head.mask_fcn1.norm, LayerNorm2d)
    assert len(model.proposal_generator.rpn_head.conv) == 2  # ViTDet RPN: two convs


@pytest.mark.parametrize("size", sorted(GLOBAL_ATTN_INDEXES))
def test_default_config_builds_a_convmae_mask_rcnn_of_every_size(size):
    """add_convmae_config(get_cfg()) alone: the heads read pyramid levels (detectron2's defaults
    would read 'res4'), and the global blocks are the size's own. Built on the meta device:
    the structure without the cost of initialising the large model."""
    cfg = add_convmae_config(get_cfg())
    cfg.MODEL.CONVMAE.SIZE = size
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model.backbone, SimpleFeaturePyramid) and model.roi_heads.mask_on
    blocks = model.backbone.net.blocks3
    assert len(blocks) == CONVVIT_SIZES[size]["depths"][2]
    assert [i for i, b in enumerate(blocks) if b.attn.window_size == 0] == list(GLOBAL_ATTN_INDEXES[size])


def test_global_blocks_and_head_features_that_do_not_fit_are_clear_errors():
    with pytest.raises(ValueError, match=r"GLOBAL_ATTN_INDEXES is empty, and the 'base' size's own .* set MODEL.CONVMAE"):
        build_backbone(tiny_cfg("MODEL.CONVMAE.SIZE", "base", "MODEL.CONVMAE.GLOBAL_ATTN_INDEXES", "[]",
                                "MODEL.CONVMAE.EMBED_DIMS", "[32, 48, 64]", "MODEL.CONVMAE.DEPTHS", "[1, 1, 2]"))
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.IN_FEATURES \['res4'\] names \['res4'\]"):
        build_backbone(tiny_cfg("MODEL.ROI_HEADS.IN_FEATURES", "['res4']"))


def test_unknown_config_key_is_a_clear_error():
    with pytest.raises(ValueError, match="Non-existent key: MODEL.CONVMAE.NOT_A_KEY"):
        setup_cfg(TINY, ["MODEL.CONVMAE.NOT_A_KEY", "1"])
    with pytest.raises(ValueError, match="GLOBAL_ATTN_INDEXES"):
        build_backbone(tiny_cfg("MODEL.CONVMAE.GLOBAL_ATTN_INDEXES", "[7]"))


@pytest.mark.skipif(has_compiled_ops(), reason="this detectron2 has its compiled ops")
def test_config_asking_for_a_missing_compiled_op_fails_at_start():
    cfg = tiny_cfg()
    cfg.defrost()
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignRotated"
    with pytest.raises(MissingCompiledOpError, match="roi_align_rotated"):
        check_compiled_ops(cfg)


def _fake_batch(n=2, size=128):
    from detectron2.structures import BitMasks, Boxes, Instances

    batch = []
    for i in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 40.0, 100.0, 110.0]]))
        inst.gt_classes = torch.tensor([1, 3])
        m = torch.zeros(2, size, size, dtype=torch.bool)
        m[0, 12:70, 10:60] = True
        m[1, 40:110, 50:100] = True
        inst.gt_masks = BitMasks(m)
        batch.append({"image": torch.randint(0, 255, (3, size, size), dtype=torch.uint8).float(),
                      "instances": inst, "height": size, "width": size})
    return batch


def test_mask_rcnn_training_step_updates_the_backbone():
    cfg = tiny_cfg()
    model = build_model(cfg)
    model.train()
    before = model.backbone.net.patch_embed1.proj.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with EventStorage():
        losses = model(_fake_batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    opt.step()
    assert not torch.equal(before, model.backbone.net.patch_embed1.proj.weight)
    model.eval()
    with torch.no_grad():
        out = model([{"image": _fake_batch(1)[0]["image"], "height": 256, "width": 256}])
    assert out[0]["instances"].image_size == (256, 256)


def test_layer_decay_and_weight_decay_groups():
    cfg = tiny_cfg()
    model = build_model(cfg)
    groups = get_param_groups(model, base_lr=1.0, weight_decay=0.1, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = model.backbone.net.depths[2]
    assert by_param[id(named["backbone.net.patch_embed1.proj.weight"])]["lr"] == 0.5 ** (depth + 1)
    assert by_param[id(named["backbone.net.blocks1.0.conv1.weight"])]["lr"] == 0.5 ** (depth + 1)
    assert by_param[id(named["backbone.net.blocks3.0.attn.qkv.weight"])]["lr"] == 0.5 ** depth
    assert by_param[id(named[f"backbone.net.blocks3.{depth - 1}.mlp.fc1.weight"])]["lr"] == 0.5
    assert by_param[id(named["roi_heads.box_predictor.cls_score.weight"])]["lr"] == 1.0
    assert by_param[id(named["backbone.net.blocks3.0.norm1.weight"])]["weight_decay"] == 0.0
    # the pyramid's channel LayerNorm is detectron2's LayerNorm officially: decayed like a weight
    assert by_param[id(named["backbone.simfp_3.0.norm.weight"])]["weight_decay"] == 0.1
    assert by_param[id(named["backbone.net.pos_embed"])]["weight_decay"] == 0.0
    assert by_param[id(named["backbone.net.blocks3.0.attn.qkv.weight"])]["weight_decay"] == 0.1
    assert by_param[id(named["backbone.net.pos_embed"])]["lr"] == 1.0  # ConvMAE-Det: pos_embed undecayed
    groups = get_param_groups(model, base_lr=1.0, weight_decay=0.1, norm_includes_d2_layernorm=True)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(named["backbone.simfp_3.0.norm.weight"])]["weight_decay"] == 0.0


def test_canonical_box_size_moves_small_boxes_to_deeper_levels():
    from detectron2.modeling.poolers import assign_boxes_to_levels
    from detectron2.structures import Boxes

    cfg = tiny_cfg("MODEL.ROI_HEADS.NAME", "ConvMAEROIHeads", "MODEL.ROI_HEADS.CANONICAL_BOX_SIZE", "40")
    heads = build_model(cfg).roi_heads
    pooler = heads.box_pooler
    assert pooler.canonical_box_size == 40 and heads.mask_pooler.canonical_box_size == 40
    boxes = [Boxes(torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 20.0, 20.0]]))]
    levels = assign_boxes_to_levels(boxes, pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level)
    # the tiny config pools from p3-p5: 40 px -> p4 (index 1), 20 px -> p3 (index 0);
    # with detectron2's 224 both would be clamped to p3
    assert levels.tolist() == [1, 0]
    default = assign_boxes_to_levels(boxes, pooler.min_level, pooler.max_level, 224, pooler.canonical_level)
    assert default.tolist() == [0, 0]
    with pytest.raises(ValueError, match="CANONICAL_BOX_SIZE"):
        build_model(tiny_cfg("MODEL.ROI_HEADS.NAME", "ConvMAEROIHeads", "MODEL.ROI_HEADS.CANONICAL_BOX_SIZE", "0"))


def test_msfp_can_start_at_p3():
    cfg = tiny_cfg("MODEL.CONVMAE.PYRAMID.MSFP_IN_FEATURES", '["s8", "s16", "s32"]')
    backbone = build_backbone(cfg)
    out = backbone(torch.randn(1, 3, 128, 128))
    assert {k: v.shape[-1] for k, v in out.items()} == {"p3": 16, "p4": 8, "p5": 4, "p6": 2}
    with pytest.raises(ValueError, match="contiguous"):
        build_backbone(tiny_cfg("MODEL.CONVMAE.PYRAMID.MSFP_IN_FEATURES", '["s4", "s16"]'))


@pytest.mark.parametrize("impl", ["fast", "eager"])
def test_trace_at_one_size_runs_at_another(impl):
    """With SQUARE_PAD the padding is the only size-dependent step: a torch.jit.trace of the
    backbone taken at the square size serves smaller and non-square inputs (the pad is
    recorded even when the sample needs none), equal to the eager module, and saves."""
    import io
    import warnings

    opts = ["MODEL.BACKBONE.NAME", "build_convmae_sfp_backbone", "MODEL.CONVMAE.IMPL", impl,
            "MODEL.CONVMAE.SQUARE_PAD", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
            "MODEL.CONVMAE.EMBED_DIMS", "[32, 48, 64]", "MODEL.CONVMAE.DEPTHS", "[1, 1, 2]",
            "MODEL.CONVMAE.NUM_HEADS", "2", "MODEL.CONVMAE.GLOBAL_ATTN_INDEXES", "[1]",
            "MODEL.CONVMAE.WINDOW_SIZE", "3", "MODEL.CONVMAE.PYRAMID.OUT_CHANNELS", "16"]
    backbone = randomize_(build_backbone(tiny_cfg(*opts))).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the input checks
        traced = torch.jit.trace(backbone, torch.randn(1, 3, 64, 64), strict=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)  # nothing in the graph calls back into Python
        buf.seek(0)
        loaded = torch.jit.load(buf)
        for hw in [(48, 64), (64, 48), (32, 32)]:
            x = torch.randn(1, 3, *hw)
            want = backbone(x)
            for got in (traced(x), loaded(x)):
                assert list(got) == list(want)
                for k in want:
                    assert torch.allclose(got[k], want[k], atol=1e-5), (hw, k, (got[k] - want[k]).abs().max())


def _tiny_resnet():
    """A detectron2 ResNet-18 (FrozenBN) with a stride-16 output "res4": a Backbone that is no ConvViT."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_sfp_takes_vitdet_arguments_on_any_backbone():
    """ViTDet's signature on a detectron2 ResNet: levels and strides from the scale factors and
    the in_feature's stride, p6 from the top block, the same function in both layouts."""
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    net = _tiny_resnet()
    assert net.output_shape()["res4"].stride == 16
    fpn = SimpleFeaturePyramid(net, "res4", 32, (4.0, 2.0, 1.0, 0.5), LastLevelMaxPool(), "LN", 0)
    assert fpn.channels_last
    out = fpn(torch.randn(2, 3, 64, 96))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for k, spec in fpn.output_shape().items():
        assert out[k].shape == (2, 32, -(-64 // spec.stride), -(-96 // spec.stride)), k
    nchw = SimpleFeaturePyramid(_tiny_resnet(), "res4", 32, (4.0, 2.0, 1.0, 0.5), LastLevelMaxPool(), channels_last=False)
    assert_same_function(randomize_(fpn), nchw, torch.randn(2, 3, 64, 96, requires_grad=True), atol=1e-4)
    # without a top block there is no p6, and the last scale sets the size divisibility
    plain = SimpleFeaturePyramid(_tiny_resnet(), "res4", 16, (2.0, 1.0))
    assert list(plain.output_shape()) == ["p3", "p4"] and plain.size_divisibility == 16


def test_sfp_norms_and_argument_errors():
    net = _tiny_resnet()
    # "": no norm, biased convs (ViTDet); the deconv's norm slot stays, as an Identity
    bare = SimpleFeaturePyramid(net, "res4", 16, (4.0,), norm="")
    assert isinstance(bare.simfp_2[1], torch.nn.Identity) and bare.simfp_2[4].bias is not None
    assert bare.simfp_2[4].norm is None and bare.channels_last
    # another detectron2 norm builds NCHW stages; asking for B H W C with it is an error
    bn = SimpleFeaturePyramid(net, "res4", 16, (1.0,), norm="BN")
    assert not bn.channels_last and isinstance(bn.simfp_4[0].norm, torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="takes norm 'LN' or ''"):
        SimpleFeaturePyramid(net, "res4", 16, (1.0,), norm="BN", channels_last=True)
    with pytest.raises(ValueError, match="'res5' is not an output of the net: it has \\['res4'\\]"):
        SimpleFeaturePyramid(net, "res5", 16, (1.0,))
    with pytest.raises(ValueError, match="twice the one before"):
        SimpleFeaturePyramid(net, "res4", 16, (4.0, 1.0))
    with pytest.raises(TypeError, match="output_shape"):
        SimpleFeaturePyramid(torch.nn.Conv2d(3, 8, 16, 16), "x", 16, (1.0,))
