"""The detectron2 trainer of convmae-det and the config set-up shared by the tools."""
import glob
import inspect
import logging
import os
from typing import List

import numpy as np
import torch
from PIL import Image
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import detection_utils as utils
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import SemSegEvaluator
from detectron2.structures import ImageList
from detectron2.utils.visualizer import Visualizer

from ..checkpoint import CheckpointError, load_checkpoint_file, unwrap_state_dict
from ..config import add_convmae_config
from ..data import build_train_mapper, prepare_builtin_datasets
from ..data.mapper import is_sem_seg
from ..evaluation import COCOEvaluator, resolve_coco_eval_backend
from ..model_zoo import resolve_config_file
from ..solver import build_lr_scheduler, build_optimizer
from ..utils.compat import check_compiled_ops
from ..utils.visualize import draw_predictions, draw_sem_seg

__all__ = [
    "setup_cfg",
    "Trainer",
    "adopt_periodic_checkpoints",
    "check_image_files",
    "check_sem_seg_datasets",
    "check_weights_fit",
    "draw_prediction_images",
    "visualize_predictions",
]

logger = logging.getLogger("convmae_det")


def setup_cfg(config_file: str = "", opts: List[str] = (), freeze: bool = True):
    """get_cfg + add_convmae_config + file + overrides, then checks that fail early and clearly.

    ``config_file`` is a path, or the name of a packaged config
    (:func:`convmae_det.model_zoo.resolve_config_file`); FileNotFoundError if it is neither.
    Unknown keys in the file or the overrides raise a ValueError naming the key.
    Without a GPU the model runs on the CPU, and AMP and MODEL.CONVMAE.COMPILE are turned off.
    """
    cfg = get_cfg()
    add_convmae_config(cfg)
    if config_file:
        config_file = resolve_config_file(config_file)
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:  # detectron2: "Non-existent config key: X"
            raise ValueError(f"config file {config_file}: {e.args[0]}") from None
    lazy_form = [o for o in list(opts)[::2] if "=" in str(o)]
    if lazy_form:
        raise ValueError(
            f"config override {lazy_form[0]!r}: a yacs (.yaml) config takes KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100; "
            "key=value overrides are for the LazyConfig (.py) configs"
        )
    try:
        cfg.merge_from_list(list(opts))
    except (AssertionError, KeyError) as e:  # yacs asserts "Non-existent key: X" / odd length
        raise ValueError(f"config override {list(opts)}: {e.args[0] if e.args else e}") from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu":
        cfg.SOLVER.AMP.ENABLED = False
        cfg.MODEL.CONVMAE.COMPILE = False
    check_compiled_ops(cfg)
    resolve_coco_eval_backend(cfg.TEST.FAST_COCO_EVAL)  # an unknown value or a missing package fails here
    sq = cfg.MODEL.CONVMAE.SQUARE_PAD
    if cfg.INPUT.LSJ.ENABLED and sq and cfg.INPUT.LSJ.IMAGE_SIZE > sq:
        raise ValueError(f"INPUT.LSJ.IMAGE_SIZE {cfg.INPUT.LSJ.IMAGE_SIZE} exceeds MODEL.CONVMAE.SQUARE_PAD {sq}")
    if sq and max(cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST) > sq:
        raise ValueError(
            f"test images may reach {max(cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)} px but "
            f"MODEL.CONVMAE.SQUARE_PAD is {sq}: set INPUT.MAX_SIZE_TEST/MIN_SIZE_TEST <= SQUARE_PAD"
        )
    if is_sem_seg(cfg):
        _check_sem_seg_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def _check_sem_seg_cfg(cfg) -> None:
    """What a SemanticSegmentor config must not ask for, as errors at start-up."""
    if cfg.INPUT.LSJ.ENABLED:
        raise ValueError(
            "INPUT.LSJ is the detection recipe; a SemanticSegmentor trains with INPUT.MIN_SIZE_TRAIN, "
            "INPUT.CROP and INPUT.COLOR_AUG (convmae_det.data.build_sem_seg_augmentations): set INPUT.LSJ.ENABLED False"
        )
    sq = cfg.MODEL.CONVMAE.SQUARE_PAD
    if sq and "padding_constraints" not in inspect.signature(ImageList.from_tensors).parameters:
        # the backbone would predict on the padded square while this detectron2 pads the
        # targets only to the size divisibility
        raise ValueError(
            f"MODEL.CONVMAE.SQUARE_PAD {sq} with a SemanticSegmentor needs a detectron2 that pads images "
            "and targets alike (padding_constraints, after 0.6): set MODEL.CONVMAE.SQUARE_PAD 0"
        )


def check_sem_seg_datasets(cfg, names) -> None:
    """Fail clearly if a semantic segmentation dataset's classes do not match
    MODEL.SEM_SEG_HEAD.NUM_CLASSES (labels past the head's classes would crash the loss,
    and fewer would leave classes unscored)."""
    if not is_sem_seg(cfg):
        return
    for name in names:
        classes = MetadataCatalog.get(name).get("stuff_classes")
        if classes is not None and len(classes) != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
            raise ValueError(
                f"dataset {name} has {len(classes)} classes (stuff_classes) but MODEL.SEM_SEG_HEAD.NUM_CLASSES "
                f"is {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}"
            )


def check_weights_fit(model, path: str) -> None:
    """Fail clearly if MODEL.WEIGHTS cannot be read or its backbone tensors do not fit the model.

    detectron2 only logs shape mismatches and skips those tensors, which silently leaves the
    encoder at its random initialisation. Mismatched *head* tensors (another class count) stay
    a warning: finetuning a detector on a new dataset is legitimate.
    """
    if not path or path.endswith(".pkl") or "://" in path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.WEIGHTS {path!r} does not exist")
    sd = unwrap_state_dict(load_checkpoint_file(path))
    own = getattr(model, "module", model).state_dict()
    bad = [
        f"  {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k.startswith("backbone.") and k in own and own[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(
            f"MODEL.WEIGHTS {path} does not fit the backbone of this config ({len(bad)} tensors):\n"
            + "\n".join(bad[:10])
            + "\nconvert it for this config with convmae-convert (tools/convert_pretrain.py), or fix MODEL.CONVMAE"
        )
    if any(k.startswith("backbone.") for k in own) and not any(k in own for k in sd):
        raise CheckpointError(f"MODEL.WEIGHTS {path} shares no parameter name with the model (convert it first?)")


class Trainer(DefaultTrainer):
    """DefaultTrainer with AdamW + layer decay, LSJ and the COCO evaluator that fits detectron2."""

    def __init__(self, cfg):
        prepare_builtin_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        check_sem_seg_datasets(cfg, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        super().__init__(cfg)

    def resume_or_load(self, resume=True):
        if not (resume and self.checkpointer.has_checkpoint()):
            check_weights_fit(self.model, self.cfg.MODEL.WEIGHTS)
        return super().resume_or_load(resume=resume)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    def build_hooks(self):
        """detectron2's hooks, with the periodic checkpointer keeping only the newest
        SOLVER.CHECKPOINT_MAX_TO_KEEP checkpoints (0 keeps all; model_final.pth is never removed).
        Periodic checkpoints already in OUTPUT_DIR (a resumed run) count among them."""
        ret = super().build_hooks()
        keep = self.cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP
        if keep < 0:
            raise ValueError(f"SOLVER.CHECKPOINT_MAX_TO_KEEP must be >= 0 (0 keeps all), got {keep}")
        for h in ret:
            if keep and isinstance(h, hooks.PeriodicCheckpointer):
                h.max_to_keep = keep
                adopt_periodic_checkpoints(h, self.cfg.OUTPUT_DIR)
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        check_image_files(dicts, cfg.DATASETS.TRAIN)
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg), dataset=dicts)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_image_files(DatasetCatalog.get(dataset_name), [dataset_name])
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """SemSegEvaluator (mIoU, fwIoU, mACC, pACC and per-class IoU/ACC) for datasets whose
        metadata says ``evaluator_type="sem_seg"`` (the built-in shapes sem-seg splits,
        detectron2's ADE20K), the COCO evaluator otherwise."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "sem_seg":
            return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
        backend = resolve_coco_eval_backend(cfg.TEST.FAST_COCO_EVAL)
        return COCOEvaluator(dataset_name, output_dir=output_folder, backend=backend)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        prepare_builtin_datasets(cfg.DATASETS.TEST)
        check_sem_seg_datasets(cfg, cfg.DATASETS.TEST)
        return super().test(cfg, model, evaluators)


def adopt_periodic_checkpoints(hook, output_dir: str) -> None:
    """Count the periodic checkpoints already in ``output_dir`` (a resumed run) among those that
    a PeriodicCheckpointer with ``max_to_keep`` removes when newer ones come."""
    hook.recent_checkpoints = sorted(glob.glob(os.path.join(output_dir, "model_[0-9]*.pth")))


def check_image_files(dataset_dicts, names) -> None:
    """Fail before training or evaluation starts if images (or semantic label files) of a
    dataset are missing on disk."""
    for key, what in (("file_name", "images"), ("sem_seg_file_name", "semantic label files")):
        listed = [d[key] for d in dataset_dicts if key in d]
        missing = [f for f in listed if not os.path.isfile(f)]
        if missing:
            shown = "\n  ".join(missing[:5])
            raise FileNotFoundError(
                f"{len(missing)} of {len(listed)} {what} of dataset(s) {list(names)} are missing, e.g.\n  {shown}"
            )


@torch.no_grad()
def visualize_predictions(cfg, model, dataset_name: str, num_images: int, output_dir: str, score_thresh: float = 0.5):
    """Draw predictions (left) beside ground truth (right) for the first ``num_images`` images
    of a registered dataset with detectron2's Visualizer into ``output_dir``: instances above
    ``score_thresh``, or per-pixel classes for a semantic segmentation model. Returns the PNG
    paths (and logs where they are)."""
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    loader = build_detection_test_loader(cfg, dataset_name)
    paths = draw_prediction_images(model, dicts, loader, MetadataCatalog.get(dataset_name), output_dir, score_thresh)
    logger.info(f"wrote {len(paths)} prediction images of {dataset_name} to {output_dir}")
    return paths


@torch.no_grad()
def draw_prediction_images(model, dataset_dicts, loader, metadata, output_dir: str, score_thresh: float = 0.5):
    """Write one PNG per record of ``dataset_dicts``: the predictions on the batch that ``loader``
    gives for it (left) beside its ground truth (right); returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    was_training = model.training
    model.eval()
    paths = []
    for d, inputs in zip(dataset_dicts, loader):
        img = utils.read_image(d["file_name"], format="RGB")
        out = model(inputs)[0]
        if "sem_seg" in out:
            pred = draw_sem_seg(img, out["sem_seg"], metadata)
            gt = draw_sem_seg(img, np.asarray(Image.open(d["sem_seg_file_name"])), metadata)
        else:
            pred = draw_predictions(img, out["instances"], metadata, score_thresh)
            gt = Visualizer(img, metadata).draw_dataset_dict(d).get_image()
        path = os.path.join(output_dir, os.path.splitext(os.path.basename(d["file_name"]))[0] + ".png")
        Image.fromarray(np.concatenate([pred, gt], axis=1)).save(path)
        paths.append(path)
    model.train(was_training)
    return paths
