"""Semantic segmentation: the shapes label PNGs, the sem-seg datasets, mapper, poly schedule,
evaluator and training path, and the ADE20K ConvMAE-B config with an official checkpoint."""
import glob
import json
import os
import time

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.evaluation import SemSegEvaluator
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

from convmae_det.checkpoint import convert_state_dict, save_weights
from convmae_det.data import (
    SEM_SEG_CLASSES,
    ShapesSpec,
    build_sem_seg_augmentations,
    generate_shapes_dataset,
    load_shapes_sem_seg,
    prepare_builtin_datasets,
    write_sem_seg_labels,
)
from convmae_det.data.checks import DatasetError, check_image_files
from convmae_det.data.shapes import _draw_split, sem_seg_labels_ready
from convmae_det.engine import Trainer, setup_cfg, visualize_predictions
from convmae_det.solver import build_lr_scheduler, build_optimizer
from conftest import ROOT
from reference_keys import convmae_base_pretrain_shapes

SHAPES_SEG = os.path.join(ROOT, "configs", "Shapes", "sem_seg_convmae_tiny_shapes.yaml")
ADE = os.path.join(ROOT, "configs", "ADE20K", "sem_seg_convmae_base_512_160k.yaml")
SPEC = ShapesSpec(num_train=8, num_val=4, image_size=96, max_size=48, seed=3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes_dataset(str(tmp_path_factory.mktemp("seg") / "convmae_shapes"), SPEC)


def _labels(root, split):
    files = sorted(glob.glob(os.path.join(root, "sem_seg", split, "*.png")))
    return [np.asarray(Image.open(f)) for f in files], files


def _near_border(painted, radius=1):
    """Pixels with another painted class within ``radius`` (the image frame does not count)."""
    h, w = painted.shape
    pad = np.pad(painted, radius, mode="edge")
    out = np.zeros((h, w), bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= pad[radius + dy:radius + dy + h, radius + dx:radius + dx + w] != painted
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_label_pngs_are_the_painting_with_a_thin_ignore_band(shapes, split):
    labels, files = _labels(shapes["root"], split)
    data = json.load(open(os.path.join(shapes["root"], "annotations", f"instances_{split}.json")))
    assert [os.path.basename(f) for f in files] == [im["file_name"] for im in data["images"]]
    painted = [p for _, _, p in _draw_split(SPEC, split)]
    ignored = total = 0
    for lab, paint, im in zip(labels, painted, data["images"]):
        assert lab.dtype == np.uint8 and lab.shape == (im["height"], im["width"])
        assert set(np.unique(lab)) <= set(range(len(SEM_SEG_CLASSES))) | {255}
        keep = lab != 255
        # every labelled pixel is the class the image shows there
        assert np.array_equal(lab[keep], paint[keep])
        # ignored pixels sit at borders between classes (or on shapes without an instance polygon)
        ign = ~keep
        unannotated = np.isin(paint, [c for c in range(1, 6) if c not in {a["category_id"] for a in data["annotations"]
                                                                            if a["image_id"] == im["id"]}])
        assert not (ign & ~_near_border(paint) & ~unannotated).any()
        ignored += ign.sum()
        total += lab.size
    assert (np.concatenate([lab.ravel() for lab in labels]) > 0).any()  # shapes are labelled
    assert 0 < ignored < 0.02 * total


def test_labels_of_an_existing_dataset_are_written_alone_and_checked(shapes, tmp_path):
    import shutil

    root = str(tmp_path / "convmae_shapes")
    shutil.copytree(shapes["root"], root)
    shutil.rmtree(os.path.join(root, "sem_seg"))
    before = {f: open(f, "rb").read() for f in glob.glob(os.path.join(root, "*", "*"))}
    assert not sem_seg_labels_ready(root, "val")
    write_sem_seg_labels(root, "val")
    assert sem_seg_labels_ready(root, "val")
    # the same labels as written with the dataset; images and annotations untouched
    assert all(np.array_equal(a, b) for a, b in zip(_labels(root, "val")[0], _labels(shapes["root"], "val")[0]))
    assert {f: open(f, "rb").read() for f in before} == before
    # a changed annotation file makes the labels stale; an image the generator did not draw is refused
    ann = os.path.join(root, "annotations", "instances_val.json")
    data = json.load(open(ann))
    data["annotations"] = data["annotations"][1:]
    json.dump(data, open(ann, "w"))
    assert not sem_seg_labels_ready(root, "val")
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(os.path.join(root, "val", "000002.png"))
    with pytest.raises(RuntimeError, match="000002.png.*make_shapes_dataset.py --force"):
        write_sem_seg_labels(root, "val")


def test_sem_seg_datasets_are_registered_with_classes_and_ignore(shapes, monkeypatch):
    meta = MetadataCatalog.get("convmae_shapes_sem_seg_val")
    assert meta.stuff_classes == ["background", "circle", "triangle", "square", "star", "cross"]
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    dicts = load_shapes_sem_seg(shapes["root"], "val")
    assert len(dicts) == 4 and all(os.path.isfile(d["sem_seg_file_name"]) for d in dicts)
    assert dicts[0]["file_name"].endswith(os.path.join("val", "000000.png")) and dicts[0]["height"] == 96
    with pytest.raises(FileNotFoundError, match="semantic labels"):
        load_shapes_sem_seg(os.path.join(shapes["root"], "nowhere"), "val")
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(shapes["root"]))
    prepare_builtin_datasets(["convmae_shapes_sem_seg_val"], SPEC)  # present and current: nothing rewritten
    assert sem_seg_labels_ready(shapes["root"], "val")


def test_sem_seg_augmentations_resize_before_crop():
    cfg = setup_cfg(ADE, ["MODEL.DEVICE", "cpu"])
    augs = build_sem_seg_augmentations(cfg)
    assert [type(a).__name__ for a in augs] == [
        "ResizeShortestEdge", "RandomCrop_CategoryAreaConstraint", "RandomApply", "RandomApply", "RandomApply", "RandomFlip"]
    rng = np.random.default_rng(0)
    for _ in range(5):
        seg = rng.integers(0, 150, (40, 60)).repeat(25, 0).repeat(25, 1).astype(np.uint8)  # 1000 x 1500
        inp = T.AugInput(rng.integers(0, 255, seg.shape + (3,), dtype=np.uint8), sem_seg=seg)
        T.AugmentationList(augs)(inp)
        # a 512 crop of the rescaled image (short side 256-1024), not of the 1000 x 1500 original
        assert max(inp.image.shape[:2]) <= 512 and inp.image.shape[:2] == inp.sem_seg.shape
        assert min(inp.image.shape[:2]) >= 256 or inp.image.shape[:2] == (512, 512)
        assert set(np.unique(inp.sem_seg)) <= set(range(150))


def test_lsj_or_square_pad_with_a_sem_seg_config_is_an_error():
    with pytest.raises(ValueError, match="INPUT.LSJ"):
        setup_cfg(SHAPES_SEG, ["MODEL.DEVICE", "cpu", "INPUT.LSJ.ENABLED", "True"])
    from detectron2.structures import ImageList
    import inspect

    if "padding_constraints" not in inspect.signature(ImageList.from_tensors).parameters:  # detectron2 0.6
        with pytest.raises(ValueError, match="SQUARE_PAD 0"):
            setup_cfg(SHAPES_SEG, ["MODEL.DEVICE", "cpu", "MODEL.CONVMAE.SQUARE_PAD", "128"])


def test_poly_schedule_after_warmup_keeps_layer_decay():
    cfg = setup_cfg(SHAPES_SEG, ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "100", "SOLVER.WARMUP_ITERS", "10",
                                 "SOLVER.POLY_LR_POWER", "0.9", "SOLVER.LAYER_DECAY", "0.5"])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert min(scales) < 1.0
    lrs = []
    for it in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    base = cfg.SOLVER.BASE_LR
    for it in (10, 37, 99):
        want = base * (1 - it / 100) ** 0.9
        assert np.allclose(lrs[it], [want * s for s in scales], rtol=1e-6), (it, lrs[it][:2], want)
    assert lrs[0][scales.index(1.0)] == pytest.approx(base * 0.001)  # warm-up starts at WARMUP_FACTOR


def test_evaluator_reports_miou_fwiou_macc_pacc(shapes):
    name = "test_sem_seg_eval_val"
    DatasetCatalog.register(name, lambda: load_shapes_sem_seg(shapes["root"], "val"))
    MetadataCatalog.get(name).set(stuff_classes=list(SEM_SEG_CLASSES), ignore_label=255, evaluator_type="sem_seg")
    cfg = setup_cfg(SHAPES_SEG, ["MODEL.DEVICE", "cpu"])
    evaluator = Trainer.build_evaluator(cfg, name, output_folder=None)
    assert isinstance(evaluator, SemSegEvaluator)
    dicts = DatasetCatalog.get(name)

    def run(flip_background):
        evaluator.reset()
        for d in dicts:
            gt = np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64)
            pred = np.where(gt == 255, 0, gt)
            if flip_background:
                pred = np.where(pred == 0, 1, pred)
            scores = torch.nn.functional.one_hot(torch.from_numpy(pred), len(SEM_SEG_CLASSES)).permute(2, 0, 1).float()
            evaluator.process([{"file_name": d["file_name"]}], [{"sem_seg": scores}])
        return evaluator.evaluate()["sem_seg"]

    perfect = run(False)
    classes = [c for c in SEM_SEG_CLASSES]
    keys = {"mIoU", "fwIoU", "mACC", "pACC"} | {f"IoU-{c}" for c in classes} | {f"ACC-{c}" for c in classes}
    assert keys <= set(perfect)
    # detectron2 main adds boundary IoU per class (when cv2 imports); nothing else
    assert all(k.startswith(("BoundaryIoU-", "min(IoU, B-Iou)-")) for k in set(perfect) - keys), sorted(perfect)
    present = [c for c in classes if not np.isnan(perfect[f"IoU-{c}"])]
    assert all(perfect[f"IoU-{c}"] == pytest.approx(100) for c in present)
    assert perfect["mIoU"] == pytest.approx(100) and perfect["pACC"] == pytest.approx(100)
    wrong = run(True)  # background predicted as circle
    assert wrong["IoU-background"] == 0 and wrong["mIoU"] < 100 and wrong["pACC"] < 50


def test_trainer_trains_evaluates_and_draws_sem_seg(shapes, tmp_path):
    for split in ("train", "val"):
        name = f"test_sem_seg_run_{split}"
        DatasetCatalog.register(name, lambda s=split: load_shapes_sem_seg(shapes["root"], s))
        MetadataCatalog.get(name).set(stuff_classes=list(SEM_SEG_CLASSES), ignore_label=255, evaluator_type="sem_seg")
    cfg = setup_cfg(SHAPES_SEG, [
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('test_sem_seg_run_train',)", "DATASETS.TEST", "('test_sem_seg_run_val',)",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
        "OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    res = Trainer.test(cfg, trainer.model)  # what the end-of-training evaluation logs
    assert {"mIoU", "fwIoU", "mACC", "pACC"} <= set(res["sem_seg"])
    assert 0 <= res["sem_seg"]["mIoU"] <= 100
    paths = visualize_predictions(cfg, trainer.model, "test_sem_seg_run_val", 2, str(tmp_path / "vis"))
    assert len(paths) == 2 and Image.open(paths[0]).size == (2 * 96, 96)  # prediction | ground truth
    bad = setup_cfg(SHAPES_SEG, ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7",
                                 "DATASETS.TRAIN", "('test_sem_seg_run_train',)", "DATASETS.TEST", "()"])
    with pytest.raises(DatasetError, match=r"MODEL.SEM_SEG_HEAD.NUM_CLASSES is 7 but dataset test_sem_seg_run_train has 6 classes"):
        Trainer(bad)


def test_missing_or_damaged_label_files_are_named(shapes, tmp_path):
    dicts = load_shapes_sem_seg(shapes["root"], "val")
    check_image_files(dicts, ["val"])  # all present and decodable
    gone = [dict(d, sem_seg_file_name=str(tmp_path / "nowhere.png")) if i == 1 else d for i, d in enumerate(dicts)]
    with pytest.raises(FileNotFoundError, match=r"1 of 4 semantic label files of dataset\(s\) \['val'\] are missing"):
        check_image_files(gone, ["val"])
    cut = tmp_path / "cut.png"
    with open(dicts[2]["sem_seg_file_name"], "rb") as f:
        cut.write_bytes(f.read()[:-40])
    broken = [dict(d, sem_seg_file_name=str(cut)) if i == 2 else d for i, d in enumerate(dicts)]
    with pytest.raises(DatasetError, match=r"semantic label file .*cut.png cannot be decoded"):
        check_image_files(broken, ["val"])


def test_ade20k_base_config_loads_an_official_checkpoint_and_trains_one_step(tmp_path):
    """ConvMAE-B at 512x512 as configured (11 global blocks, SemSegFPNHead with 150 classes):
    a converted official-layout pretraining checkpoint leaves no encoder key missing, then one
    AdamW + layer-decay step on a synthetic batch."""
    cfg = setup_cfg(ADE, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=g) * 0.02 for k, s in convmae_base_pretrain_shapes().items()}
    out, report = convert_state_dict(official, model.state_dict())
    path = str(tmp_path / "convmae_base_seg.pth")
    save_weights(out, path)
    assert DetectionCheckpointer(model).load(path) == {}  # as MODEL.WEIGHTS loads
    incompatible = model.load_state_dict(torch.load(path, weights_only=True)["model"], strict=False)
    assert [k for k in incompatible.missing_keys if k.startswith("backbone.net.")] == []
    assert incompatible.unexpected_keys == []
    assert torch.equal(model.backbone.net.blocks3[10].attn.qkv.weight, official["blocks3.10.attn.qkv.weight"])
    assert any(k.startswith("sem_seg_head.") for k in report.missing)  # the head starts from its init
    assert model.backbone.net.pos_embed.shape[1] == 196  # resampled per input at run time

    model.train()
    opt = build_optimizer(cfg, model)
    labels = torch.randint(0, 150, (512, 512), generator=g)
    labels[:16] = 255  # ignored rows
    batch = [{"image": torch.randint(0, 256, (3, 512, 512), generator=g, dtype=torch.uint8), "sem_seg": labels}]
    before = model.backbone.net.blocks3[0].attn.qkv.weight.detach().clone()
    start = time.perf_counter()
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    losses["loss_sem_seg"].backward()
    opt.step()
    print(f"ConvMAE-B 512x512 training step on the CPU: {time.perf_counter() - start:.1f} s")
    assert not torch.equal(before, model.backbone.net.blocks3[0].attn.qkv.weight)
