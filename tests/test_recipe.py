"""The COCO configs compute the official ConvMAE-Det recipe: every parameter's (lr, weight decay)
and the LSJ training pipeline."""
import copy
import re

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from convmae_det.data import build_train_mapper
from convmae_det.engine import setup_cfg
from convmae_det.modeling import D2LayerNorm
from convmae_det.solver import build_optimizer
from conftest import BASE, tiny_cfg


# Written from the official rule (reference section 4, Official-ConvMAE-Det), not from the code:
# - lr: 1e-4 * 0.8 ** (num_layers + 1 - layer_id), num_layers = 11; get_vit_lr_decay_rate puts the
#   patch embeddings and stages 1-2 at layer 0, blocks3.i at i + 1, all else (pos_embed, pyramid,
#   heads) at num_layers + 1;
# - weight decay 0.1, except the parameters of torch.nn norm modules (in the official model the
#   encoder's LayerNorms; the pyramid and heads use detectron2's LayerNorm, which
#   get_default_optimizer_params does not count as a norm) and pos_embed, at 0.
OFFICIAL_LR, OFFICIAL_WD, DECAY, NUM_LAYERS = 1e-4, 0.1, 0.8, 11
TORCH_NORMS = re.compile(r"backbone\.net\.(patch_embed\d\.norm|blocks\d\.\d+\.norm[12])\.(weight|bias)")


def official_lr(name: str) -> float:
    layer_id = NUM_LAYERS + 1
    if name.startswith("backbone"):
        if ".patch_embed" in name or ".blocks1." in name or ".blocks2." in name:
            layer_id = 0
        elif ".blocks3." in name:
            layer_id = int(name[name.find(".blocks3."):].split(".")[2]) + 1
    return OFFICIAL_LR * DECAY ** (NUM_LAYERS + 1 - layer_id)


def official_wd(name: str) -> float:
    return 0.0 if TORCH_NORMS.fullmatch(name) or name.endswith("pos_embed") else OFFICIAL_WD


@pytest.fixture(scope="module")
def base_optimizer():
    """The Base COCO config's model and optimizer: (cfg, named parameters, group of each)."""
    cfg = setup_cfg(BASE, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    return cfg, dict(model.named_parameters()), model, {id(p): g for g in opt.param_groups for p in g["params"]}


# The lr multipliers of the official get_vit_lr_decay_rate for ConvMAE-B (reference section 4:
# decay 0.8 over its 11 stage-3 blocks; patch embeddings and stages 1-2 at layer 0, blocks3.i at
# i + 1, everything else, pos_embed included, at 12 = undecayed): 0.8 ** (12 - layer).
OFFICIAL_LR_SCALE = {
    "backbone.net.pos_embed": 1.0,
    "backbone.net.patch_embed1.proj.weight": 0.8**12,
    "backbone.net.patch_embed3.norm.bias": 0.8**12,
    "backbone.net.patch_embed4.weight": 0.8**12,
    "backbone.net.blocks1.0.conv1.weight": 0.8**12,
    "backbone.net.blocks2.1.mlp.fc2.weight": 0.8**12,
    "backbone.net.blocks3.0.attn.qkv.weight": 0.8**11,
    "backbone.net.blocks3.1.attn.rel_pos_h": 0.8**10,
    "backbone.net.blocks3.5.norm1.weight": 0.8**6,
    "backbone.net.blocks3.10.mlp.fc2.bias": 0.8**1,
    "backbone.simfp_2.0.weight": 1.0,
    "backbone.simfp_5.2.norm.weight": 1.0,
    "proposal_generator.rpn_head.objectness_logits.weight": 1.0,
    "roi_heads.box_predictor.cls_score.weight": 1.0,
    "roi_heads.mask_head.predictor.weight": 1.0,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_LR_SCALE))
def test_base_layer_decay_table(base_optimizer, name):
    cfg, named, _, by_param = base_optimizer
    assert cfg.SOLVER.LAYER_DECAY == 0.8 and cfg.SOLVER.BASE_LR == 1e-4
    assert by_param[id(named[name])]["lr"] == pytest.approx(1e-4 * OFFICIAL_LR_SCALE[name], rel=1e-9)


def test_base_coco_optimizer_matches_official_rule_per_parameter(base_optimizer):
    cfg, named, model, by_param = base_optimizer
    assert len(by_param) == len(named), "every parameter must be in exactly one optimizer group"
    mismatches = []
    for name, p in named.items():
        g = by_param[id(p)]
        want = (official_lr(name), official_wd(name))
        if not (np.isclose(g["lr"], want[0], rtol=1e-9, atol=0) and g["weight_decay"] == want[1]):
            mismatches.append(f"{name}: lr {g['lr']:.4g}, wd {g['weight_decay']} (official lr {want[0]:.4g}, wd {want[1]})")
    assert not mismatches, f"{len(mismatches)} parameters differ from the official recipe:\n" + "\n".join(mismatches)
    # the cases the rule is about, spelled out
    assert by_param[id(named["backbone.net.pos_embed"])]["lr"] == pytest.approx(1e-4)
    channel_ln = [p for m in model.modules() if isinstance(m, D2LayerNorm) for p in m.parameters(recurse=False)]
    assert len(channel_ln) == 34 and all(by_param[id(p)]["weight_decay"] == 0.1 for p in channel_ln)
    # the deliberate alternative is a named option, off in the official config
    assert cfg.SOLVER.WEIGHT_DECAY_NORM_ALL_LN is False


def test_lsj_mapper_leaves_small_images_unpadded_and_model_pads_them():
    # the Base COCO pipeline: an image that LSJ shrinks below 1024 stays small
    cfg = setup_cfg(BASE, ["MODEL.DEVICE", "cpu", "INPUT.LSJ.MIN_SCALE", "0.25", "INPUT.LSJ.MAX_SCALE", "0.25"])
    assert cfg.INPUT.LSJ.ENABLED and not cfg.INPUT.LSJ.PAD
    mapper = build_train_mapper(cfg)
    h, w = 480, 640
    record = {
        "file_name": "unused.jpg", "height": h, "width": w, "image_id": 1,
        "image": None,
        "annotations": [{"bbox": [10.0, 20.0, 100.0, 80.0], "bbox_mode": 1, "category_id": 0,
                         "segmentation": [[10.0, 20.0, 110.0, 20.0, 110.0, 100.0, 10.0, 100.0]], "iscrowd": 0}],
    }

    def read_image(file_name, format=None):
        return np.random.RandomState(0).randint(0, 255, (h, w, 3)).astype(np.uint8)

    import detectron2.data.dataset_mapper as dm
    orig = dm.utils.read_image
    dm.utils.read_image = read_image
    try:
        out = mapper(copy.deepcopy(record))
    finally:
        dm.utils.read_image = orig
    # ResizeScale to 0.25 of 1024 keeps the aspect ratio: 640x480 -> 256x192; no pad to 1024
    assert tuple(out["image"].shape) == (3, 192, 256)
    assert out["instances"].image_size == (192, 256)
    # the old behaviour, kept as an option: the mapper pads with PAD_VALUE
    padded = build_train_mapper(setup_cfg(BASE, ["MODEL.DEVICE", "cpu", "INPUT.LSJ.MIN_SCALE", "0.25",
                                                 "INPUT.LSJ.MAX_SCALE", "0.25", "INPUT.LSJ.PAD", "True"]))
    dm.utils.read_image = read_image
    try:
        assert tuple(padded(copy.deepcopy(record))["image"].shape) == (3, 1024, 1024)
    finally:
        dm.utils.read_image = orig

    # the model pads the small images to the square and keeps their real sizes
    tiny = tiny_cfg("MODEL.CONVMAE.SQUARE_PAD", "256")
    model = build_model(tiny).eval()
    seen = {}
    model.backbone.net.register_forward_pre_hook(lambda m, args: seen.update(shape=tuple(args[0].shape)))
    batch = [{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)},
             {"image": torch.randint(0, 255, (3, 128, 80), dtype=torch.uint8)}]
    images = model.preprocess_image(batch)
    assert images.image_sizes == [(96, 128), (128, 80)]
    with torch.no_grad():
        model.backbone(images.tensor)
    assert seen["shape"] == (2, 3, 256, 256)
