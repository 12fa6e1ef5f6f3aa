"""The LazyConfig (.py) configs build what their yacs (.yaml) twins build: the same parameters,
module settings, outputs and losses, data pipeline, optimizer groups and LR schedule; and bad
overrides fail clearly on both paths."""
import os

import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from omegaconf import DictConfig, ListConfig

from convmae_det.data import build_train_mapper
from convmae_det.engine import setup_cfg
from convmae_det.engine.lazy import build_lazy_optimizer, load_lazy_config
from convmae_det.evaluation import resolve_coco_eval_backend
from convmae_det.solver import build_optimizer
from conftest import ROOT, randomize_

TWINS = [
    "Shapes/mask_rcnn_convmae_tiny_shapes",
    "Shapes/mask_rcnn_convmae_tiny_shapes_labeled",
    "Shapes/mask_rcnn_convmae_tiny_shapes_labeled_pretrained",
    "Shapes/mask_rcnn_convmae_tiny_shapes_pretrained",
    "COCO/mask_rcnn_convmae_base_25ep",
    "COCO/mask_rcnn_convmae_small_25ep",
    "COCO/mask_rcnn_convmae_base_msfp_25ep",
]


def twin_configs(name):
    path = os.path.join(ROOT, "configs", name)
    return setup_cfg(path + ".yaml", ["MODEL.DEVICE", "cpu"]), load_lazy_config(path + ".py", ["train.device=cpu"])


_MODULE_INTERNALS = set(vars(torch.nn.Module())) - {"training"}


def _flatten(key, v, out, seen):
    """Every setting reachable from ``v`` (not submodules, compared on their own), by path.
    Sequences compare by content whatever their type (tuple, list, the ListConfig that
    LazyCall arguments arrive as); plain objects (Matcher, Box2BoxTransform) by attributes."""
    if isinstance(v, torch.nn.Module):
        return
    if torch.is_tensor(v):
        out[key] = v.detach()
    elif isinstance(v, (list, tuple, ListConfig)):
        out[key] = f"sequence of {len(v)}"
        for i, x in enumerate(v):
            _flatten(f"{key}[{i}]", x, out, seen)
    elif isinstance(v, (dict, DictConfig)):
        out[key] = f"mapping of {sorted(v)}"
        for k, x in v.items():
            _flatten(f"{key}[{k!r}]", x, out, seen)
    elif isinstance(v, (bool, int, float, str, type(None))):
        out[key] = v
    elif callable(v) and hasattr(v, "__qualname__"):
        out[key] = f"{v.__module__}.{v.__qualname__}"
    elif hasattr(v, "__dict__") and id(v) not in seen:
        seen.add(id(v))
        out[key] = type(v).__qualname__
        for k, x in vars(v).items():
            _flatten(f"{key}.{k}", x, out, seen)
    else:
        out[key] = repr(v)


def settings(obj):
    """Non-parameter state of a module tree (or of a plain object such as a DatasetMapper)."""
    out, seen = {}, set()
    modules = obj.named_modules() if isinstance(obj, torch.nn.Module) else [("", obj)]
    for name, m in modules:
        for k, v in vars(m).items():
            if k not in _MODULE_INTERNALS:
                _flatten(f"{name}:{k}", v, out, seen)
    return out


def assert_same_settings(a, b, what):
    sa, sb = settings(a), settings(b)
    bad = []
    for k in sorted(set(sa) | set(sb)):
        x, y = sa.get(k, "<absent>"), sb.get(k, "<absent>")
        same = torch.equal(x, y) if torch.is_tensor(x) and torch.is_tensor(y) else x == y
        if not same:
            bad.append(f"{k}: yacs {x!r}, lazy {y!r}")
    assert not bad, f"{what}: {len(bad)} settings differ:\n  " + "\n  ".join(bad[:20])


def test_settings_comparison_sees_a_changed_value():
    yacs, lazy = twin_configs(TWINS[0])
    lazy.model.proposal_generator.nms_thresh = 0.6
    with pytest.raises(AssertionError, match="nms_thresh: yacs 0.7, lazy 0.6"):
        assert_same_settings(build_model(yacs), instantiate(lazy.model), "model")


@pytest.mark.parametrize("name", TWINS)
def test_twin_configs_build_the_same_model_data_and_recipe(name):
    yacs, lazy = twin_configs(name)
    a, b = build_model(yacs), instantiate(lazy.model)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert [k for k in sa if sa[k].shape != sb[k].shape] == []
    assert_same_settings(a, b, "model")

    # data: mappers field by field, loader arguments, evaluator
    assert_same_settings(build_train_mapper(yacs), instantiate(lazy.dataloader.train.mapper), "train mapper")
    assert_same_settings(DatasetMapper(yacs, is_train=False), instantiate(lazy.dataloader.test.mapper), "test mapper")
    dl = lazy.dataloader
    assert [dl.train.dataset.names] == list(yacs.DATASETS.TRAIN) and [dl.test.dataset.names] == list(yacs.DATASETS.TEST)
    assert dl.train.dataset.filter_empty == yacs.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert dl.train.total_batch_size == yacs.SOLVER.IMS_PER_BATCH
    assert dl.train.num_workers == dl.test.num_workers == yacs.DATALOADER.NUM_WORKERS
    assert instantiate(dl.evaluator.backend) == resolve_coco_eval_backend(yacs.TEST.FAST_COCO_EVAL)

    # training loop
    t, s = lazy.train, yacs.SOLVER
    assert t.max_iter == s.MAX_ITER and t.checkpointer.period == s.CHECKPOINT_PERIOD
    assert t.checkpointer.max_to_keep == (s.CHECKPOINT_MAX_TO_KEEP or None)  # yacs 0 = fvcore None = all
    assert t.eval_period == yacs.TEST.EVAL_PERIOD and t.seed == yacs.SEED and t.output_dir == yacs.OUTPUT_DIR
    assert t.init_checkpoint == yacs.MODEL.WEIGHTS and t.amp.enabled == s.AMP.ENABLED
    assert t.fused_optimizer == s.FUSED
    clip = s.CLIP_GRADIENTS
    assert dict(t.clip_gradients) == dict(enabled=clip.ENABLED, clip_type=clip.CLIP_TYPE, clip_value=clip.CLIP_VALUE,
                                          norm_type=clip.NORM_TYPE)
    assert (t.vis.num_images, t.vis.score_thresh) == (yacs.TEST.VIS_NUM_IMAGES, yacs.TEST.VIS_SCORE_THRESH)

    # optimizer: the same class and defaults, and every parameter's lr and weight decay
    opt_a, opt_b = build_optimizer(yacs, a), build_lazy_optimizer(lazy, b)
    assert type(opt_a).__mro__[1:] == type(opt_b).__mro__[1:]
    # the optimizer-wide weight decay is unused (every group has its own, compared below): torch's
    # default on the yacs path, the config's value on the lazy one (ViTDet's convention)
    assert {**opt_a.defaults, "weight_decay": None} == {**opt_b.defaults, "weight_decay": None}
    groups_a = {n: g for g in opt_a.param_groups for p in g["params"] for n, q in a.named_parameters() if p is q}
    groups_b = {n: g for g in opt_b.param_groups for p in g["params"] for n, q in b.named_parameters() if p is q}
    assert groups_a.keys() == groups_b.keys() == dict(a.named_parameters()).keys()
    differ = [n for n in groups_a if (groups_a[n]["lr"], groups_a[n]["weight_decay"]) != (groups_b[n]["lr"], groups_b[n]["weight_decay"])]
    assert differ == []

    # LR schedule: the multiplier at the iterations around warm-up, the steps and the end
    sched = build_lr_scheduler(yacs, opt_a)
    multiplier = instantiate(lazy.lr_multiplier)
    n = s.MAX_ITER
    iters = set(range(0, min(n, s.WARMUP_ITERS + 5))) | set(range(0, n, max(1, n // 500))) | {n - 1}
    iters |= {i for step in s.STEPS for i in (step - 1, step, step + 1) if 0 <= i < n}
    for i in sorted(iters):
        assert multiplier(i / t.max_iter) == pytest.approx(sched._multiplier(i / sched._max_iter), rel=1e-12), i


def tiny_batch():
    """Two images of other sizes with two box-and-mask instances each."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in ((128, 128), (96, 128)):
        inst = Instances((h, w))
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 100.0, 90.0]])
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = True
        inst.gt_boxes, inst.gt_classes, inst.gt_masks = Boxes(boxes), torch.tensor([1, 3]), BitMasks(masks)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def test_tiny_twins_compute_the_same_losses_detections_and_update():
    yacs, lazy = twin_configs(TWINS[0])
    a, b = randomize_(build_model(yacs)), instantiate(lazy.model)
    b.load_state_dict(a.state_dict())
    batch = tiny_batch()
    losses = []
    for m in (a, b):
        torch.manual_seed(0)  # proposal and RoI sampling
        with EventStorage():
            losses.append({k: v.item() for k, v in m(batch).items()})
    assert losses[0] == losses[1] and set(losses[0]) >= {"loss_rpn_cls", "loss_cls", "loss_mask"}

    outs = []
    for m in (a, b):
        m.eval()
        m.roi_heads.box_predictor.test_score_thresh = 0.0  # keep every box: something to compare
        with torch.no_grad():
            outs.append([o["instances"] for o in m(batch)])
    for ia, ib in zip(*outs):
        assert len(ia) > 0 and len(ia) == len(ib)
        for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
            x, y = ia.get(field), ib.get(field)
            x, y = (x.tensor, y.tensor) if field == "pred_boxes" else (x, y)
            assert torch.equal(x, y), field

    # one optimizer step with large gradients: the same update, each gradient clipped to norm 1.0
    a.train(), b.train()
    opt_a, opt_b = build_optimizer(yacs, a), build_lazy_optimizer(lazy, b)
    g = torch.Generator().manual_seed(1)
    for p, q in zip(a.parameters(), b.parameters()):
        p.grad = 100 * torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    before = [p.detach().clone() for p in b.parameters()]
    opt_a.step(), opt_b.step()
    for (n, p), q, q0 in zip(a.named_parameters(), b.parameters(), before):
        assert torch.equal(p, q) and not torch.equal(q, q0), n
        assert q.grad.norm() <= 1.0 + 1e-5, n


def test_overrides_in_the_other_path_s_form_fail_clearly():
    tiny = os.path.join(ROOT, "configs", "Shapes", "mask_rcnn_convmae_tiny_shapes")
    with pytest.raises(ValueError, match="LazyConfig .* takes key=value overrides"):
        load_lazy_config(tiny + ".py", ["SOLVER.MAX_ITER", "20"])
    with pytest.raises(ValueError, match=r"yacs keys .* MODEL.WEIGHTS is train.init_checkpoint"):
        load_lazy_config(tiny + ".py", ["MODEL.WEIGHTS=x.pth"])
    with pytest.raises(ValueError, match=r"yacs \(.yaml\) config takes KEY VALUE pairs"):
        setup_cfg(tiny + ".yaml", ["train.max_iter=20"])


def test_lazy_overrides_are_checked_against_the_config():
    tiny = os.path.join(ROOT, "configs", "Shapes", "mask_rcnn_convmae_tiny_shapes.py")
    with pytest.raises(ValueError, match="'train.max_itr': no such key; train has .*max_iter"):
        load_lazy_config(tiny, ["train.max_itr=20"])
    with pytest.raises(ValueError, match="RPN takes no argument 'nms_treshold'"):
        load_lazy_config(tiny, ["model.proposal_generator.nms_treshold=0.5"])
    cfg = load_lazy_config(tiny, [
        "train.max_iter=20",
        "model.proposal_generator.anchor_generator.sizes=[[16],[32],[64],[128]]",
        "model.roi_heads.box_predictor.cls_agnostic_bbox_reg=true",  # an argument the config leaves at its default
        "+train.note=hello",  # hydra's explicit addition
        "train.device=cpu",
    ])
    assert cfg.train.max_iter == 20 and cfg.train.note == "hello"
    assert cfg.model.roi_heads.box_predictor.cls_agnostic_bbox_reg is True
    assert list(cfg.model.proposal_generator.anchor_generator.sizes[0]) == [16]
    assert cfg.model.backbone.net.compile_blocks is False and cfg.train.amp.enabled is False
    with pytest.raises(ValueError, match="max_to_keep must be None"):
        load_lazy_config(tiny, ["train.checkpointer.max_to_keep=0"])
    with pytest.raises(ValueError, match=r"test images may reach 160 px \(dataloader.test.mapper.augmentations.0\)"):
        load_lazy_config(tiny, ["dataloader.test.mapper.augmentations.0.max_size=160"])
    base = os.path.join(ROOT, "configs", "COCO", "mask_rcnn_convmae_base_25ep.py")
    with pytest.raises(ValueError, match="augmentations.image_size 1280 exceeds model.backbone.square_pad 1024"):
        load_lazy_config(base, ["dataloader.train.mapper.augmentations.image_size=1280"])


def test_lazy_loaders_prepare_the_builtin_data_and_check_image_files(monkeypatch, tmp_path):
    import convmae_det.engine.lazy as lazy_engine
    from detectron2.data import DatasetCatalog

    prepared = []
    monkeypatch.setattr(lazy_engine, "prepare_builtin_datasets", lambda names: prepared.extend(names))
    cfg = load_lazy_config(os.path.join(ROOT, "configs", "Shapes", "mask_rcnn_convmae_tiny_shapes_labeled.py"))
    missing = [{"file_name": str(tmp_path / f"{i}.png"), "image_id": i, "height": 8, "width": 8} for i in range(3)]
    DatasetCatalog.register("lazy_missing_images", lambda: missing)
    try:
        cfg.dataloader.train.dataset.names = "lazy_missing_images"
        with pytest.raises(FileNotFoundError, match=r"3 of 3 images of dataset\(s\) \['lazy_missing_images'\] are missing"):
            lazy_engine.instantiate_loader(cfg.dataloader.train)
    finally:
        DatasetCatalog.remove("lazy_missing_images")
    assert prepared == ["lazy_missing_images"]
    lazy_engine.instantiate_loader(cfg.dataloader.test)  # the built-in val split: its files exist
    assert prepared == ["lazy_missing_images", "convmae_shapes_val"]

