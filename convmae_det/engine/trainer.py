"""The detectron2 trainer of convmae-det and the config set-up shared by the tools."""
import functools
import glob
import inspect
import logging
import os
import shutil
import weakref
from typing import List

import numpy as np
import torch
from PIL import Image
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import detection_utils as utils
from detectron2.engine import DefaultPredictor, DefaultTrainer, TrainerBase, hooks
from detectron2.evaluation import SemSegEvaluator
from detectron2.solver.lr_scheduler import LRMultiplier
from detectron2.structures import ImageList
from detectron2.utils import comm
from detectron2.utils.visualizer import Visualizer

from ..checkpoint import CheckpointError, SafeCheckpointer, check_state_dict_fit, load_checkpoint_file, unwrap_state_dict
from ..config import add_convmae_config
from ..data import build_train_mapper, prepare_builtin_datasets
from ..data.checks import DatasetError, check_image_files, check_num_classes
from ..data.loader import ResumableTrainLoader, iteration_seed, seed_everything
from ..data.mapper import is_sem_seg
from ..evaluation import COCOEvaluator, resolve_coco_eval_backend
from ..model_zoo import resolve_config_file
from ..solver import build_lr_scheduler, build_optimizer
from ..utils.compat import check_compiled_ops
from ..utils.fileio import remove_stale_temp_files
from ..utils.visualize import draw_predictions, draw_sem_seg

__all__ = [
    "setup_cfg",
    "Trainer",
    "OptionError",
    "add_safety_arguments",
    "adopt_periodic_checkpoints",
    "build_predictor",
    "check_image_files",
    "check_weights_fit",
    "draw_prediction_images",
    "exit_on_user_error",
    "load_eval_weights",
    "predict_images",
    "prepare_output_dir",
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


def check_weights_fit(model, path: str, allow_pickle: bool = False) -> None:
    """Fail clearly if MODEL.WEIGHTS cannot be read safely or its backbone tensors do not fit
    the model (:func:`~convmae_det.checkpoint.check_state_dict_fit`); the trainer's checkpointer
    runs the same check when it loads them. URLs are left to detectron2's download."""
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.WEIGHTS {path!r} does not exist")
    if path.endswith(".pkl") and allow_pickle:
        return  # detectron2's model zoo layouts are matched by name heuristics
    sd = unwrap_state_dict(load_checkpoint_file(path, allow_pickle))
    check_state_dict_fit(model, sd, f"MODEL.WEIGHTS {path}")


def add_safety_arguments(parser, overwrite: bool = True) -> None:
    """The tools' ``--allow-pickle`` (and ``--overwrite``) options."""
    parser.add_argument("--allow-pickle", action="store_true",
                        help="trust the weights files: allow unpickling objects other than tensors (and .pkl files)")
    if overwrite:
        parser.add_argument("--overwrite", action="store_true",
                            help="start a new run in an OUTPUT_DIR that holds one: its checkpoints, metrics, events and logs are removed")


# a new training run refuses an OUTPUT_DIR holding one of these (a checkpoint or a metrics.json with
# content among them: _holds_results); --overwrite also removes the leftovers
RUN_FILES = ("last_checkpoint", "model_*.pth", "metrics.json", "events.out.tfevents.*")
RUN_LEFTOVERS = ("log.txt", "log.txt.rank*", "inference", "vis")


class OptionError(ValueError):
    """Command-line options that contradict each other."""


def _holds_results(path: str) -> bool:
    """Whether a file of RUN_FILES holds what a run produced: any checkpoint, a metrics.json
    with content; the event files count only beside those."""
    name = os.path.basename(path)
    if name.startswith("events.out.tfevents."):
        return False
    return name != "metrics.json" or os.path.getsize(path) > 0


def prepare_output_dir(output_dir: str, *, resume: bool, overwrite: bool, eval_only: bool = False) -> None:
    """Check OUTPUT_DIR before a run writes to it. Temporary files of interrupted atomic writes
    are removed. A new training run (neither ``resume`` nor ``eval_only``) refuses a folder
    with an earlier run's checkpoints, metrics or events, which it would overwrite and mix
    with its own, unless ``overwrite``, which removes them and the earlier logs first."""
    if resume and overwrite:
        raise OptionError("--resume continues the run in OUTPUT_DIR and --overwrite removes it: give one of them")
    if comm.is_main_process():
        remove_stale_temp_files(output_dir)
    if resume or eval_only:
        return
    found = sorted({p for pattern in RUN_FILES for p in glob.glob(os.path.join(output_dir, pattern))})
    if not any(_holds_results(p) for p in found):
        # nothing but the writers' empty files of a run that failed before its first logged
        # iteration (a bad MODEL.WEIGHTS, say): no earlier run to protect
        return
    if not overwrite:
        shown = ", ".join(os.path.basename(p) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise FileExistsError(
            f"OUTPUT_DIR {output_dir} holds an earlier run ({shown}): pass --resume to continue it, "
            "--overwrite to start over in it, or set another OUTPUT_DIR"
        )
    if comm.is_main_process():
        found += sorted({p for pattern in RUN_LEFTOVERS for p in glob.glob(os.path.join(output_dir, pattern))})
        for path in found:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        logger.info(f"--overwrite: removed {len(found)} files of the earlier run from {output_dir}")
    comm.synchronize()


def exit_on_user_error(main):
    """Decorator of a tool's ``main``: an error the user fixes (a file, an option, a config value:
    :class:`CheckpointError`, :class:`DatasetError`, :class:`OptionError`, a missing or existing
    file) ends the run with its message, not a traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (CheckpointError, DatasetError, OptionError, FileNotFoundError, FileExistsError) as e:
            raise SystemExit(f"error: {e}") from e

    return run


class Trainer(DefaultTrainer):
    """DefaultTrainer with AdamW + layer decay, LSJ, the COCO evaluator that fits detectron2, and
    an exact ``--resume``.

    A checkpoint holds the model, the optimizer (AdamW's moments and step counts), the AMP grad
    scaler, the LR scheduler, the iteration and the data seed. Resuming restores all of them;
    the training stream continues at the next batch (:class:`~convmae_det.data.ResumableTrainLoader`)
    and the model's random draws are seeded per iteration (:meth:`run_step`), so N iterations
    plus N resumed ones give the weights of 2N uninterrupted ones.

    SOLVER settings on ``--resume`` come from the current config and apply from the resumed
    iteration on: the lr of iteration i is the current schedule's lr at i (BASE_LR, STEPS,
    WARMUP_*, MAX_ITER, ...), weight decay, betas and clipping are the current ones; only the
    optimizer's per-parameter state comes from the checkpoint. Changes that would make that
    state mean something else are refused: SOLVER.OPTIMIZER, SOLVER.IMS_PER_BATCH (the data
    position counts batches) and a different grouping of the parameters (SOLVER.LAYER_DECAY,
    SOLVER.WEIGHT_DECAY_* or the model).

    Weights files are read by :class:`~convmae_det.checkpoint.SafeCheckpointer`: no code runs
    from them unless ``allow_pickle``; they must fit the model; checkpoints are written atomically.
    """

    def __init__(self, cfg, allow_pickle: bool = False):
        self.allow_pickle = allow_pickle
        prepare_builtin_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        super().__init__(cfg)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        # the stream of the first iteration to run; detectron2 v0.6 made its iterator already
        self.data_loader.set_position(self.data_loader.seed, self.start_iter)
        if hasattr(self._trainer, "_data_loader_iter_obj"):  # detectron2 main: made on first use
            self._trainer._data_loader_iter_obj = None
        else:
            self._trainer._data_loader_iter = iter(self.data_loader)

    def run_step(self):
        seed_everything(iteration_seed(self.data_loader.seed, comm.get_rank(), self.iter))
        super().run_step()

    def _resume_check(self) -> dict:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {
            "SOLVER.OPTIMIZER": self.cfg.SOLVER.OPTIMIZER.upper(),
            "SOLVER.IMS_PER_BATCH": self.cfg.SOLVER.IMS_PER_BATCH,
            "param_groups": [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups],
        }

    def state_dict(self):
        ret = TrainerBase.state_dict(self)  # iteration, hooks (the LR scheduler)
        ret["_trainer"] = self._trainer.state_dict()  # optimizer; AMP grad scaler
        ret["data_seed"] = self.data_loader.seed
        ret["resume_check"] = self._resume_check()
        return ret

    def load_state_dict(self, state):
        saved, now = state.get("resume_check"), self._resume_check()
        for key in ("SOLVER.OPTIMIZER", "SOLVER.IMS_PER_BATCH"):
            if saved and saved[key] != now[key]:
                raise CheckpointError(
                    f"--resume: {key} is {now[key]} but the checkpoint's run used {saved[key]}: its optimizer state "
                    f"and data position would not fit. Resume with {key} {saved[key]}, or start a new run from its "
                    "weights (MODEL.WEIGHTS OUTPUT_DIR/model_....pth, another OUTPUT_DIR)"
                )
        if saved and saved["param_groups"] != now["param_groups"]:
            raise CheckpointError(
                f"--resume: the optimizer's parameter groups differ from the checkpoint's ({len(now['param_groups'])} "
                f"groups now, {len(saved['param_groups'])} then: SOLVER.LAYER_DECAY, SOLVER.WEIGHT_DECAY_* or the model "
                "changed), so its optimizer state cannot be matched to the parameters. Resume with the old values, "
                "or start a new run from its weights (MODEL.WEIGHTS)"
            )
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        TrainerBase.load_state_dict(self, state)  # iteration, LR scheduler
        inner = state.get("_trainer", {})
        if "optimizer" in inner:
            self.optimizer.load_state_dict(inner["optimizer"])
        else:
            logger.warning("the checkpoint holds no optimizer state (an older checkpoint): the optimizer starts anew")
        scaler = getattr(self._trainer, "grad_scaler", None)
        if scaler is not None and "grad_scaler" in inner:
            scaler.load_state_dict(inner["grad_scaler"])
        elif scaler is not None:
            logger.warning("the checkpoint holds no AMP grad scaler state: the scaler starts anew")
        # the current SOLVER from the resumed iteration on: hyperparameters, then the schedule's lr
        for group, values in zip(self.optimizer.param_groups, current):
            group.update(values)
        self.scheduler.base_lrs = base_lrs
        if isinstance(self.scheduler, LRMultiplier):
            factor = self.scheduler._multiplier(self.scheduler.last_epoch / self.scheduler._max_iter)
            lrs = [base * factor for base in base_lrs]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            self.scheduler._last_lr = lrs
        if state.get("data_seed") is not None:
            self.data_loader.set_position(state["data_seed"], 0)
        else:
            logger.warning("the checkpoint holds no data seed (an older checkpoint): the data stream is not the one it saw")

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    def build_hooks(self):
        """detectron2's hooks, with the periodic checkpointer keeping only the newest
        SOLVER.CHECKPOINT_MAX_TO_KEEP checkpoints (0 keeps all; model_final.pth is never removed).
        Periodic checkpoints already in OUTPUT_DIR (a resumed run) count among them.
        The checkpointer (made by DefaultTrainer just before) becomes a SafeCheckpointer."""
        self.checkpointer = SafeCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, allow_pickle=self.allow_pickle, trainer=weakref.proxy(self)
        )
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
        """The resumable training stream (:class:`~convmae_det.data.ResumableTrainLoader`) of
        detectron2's sampler and batching, after the dataset checks: every image decodes and
        has its annotated size, and the class count is MODEL.ROI_HEADS.NUM_CLASSES. The data
        seed is SEED, or one drawn for the run when SEED < 0 (saved in its checkpoints)."""
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        check_image_files(dicts, cfg.DATASETS.TRAIN)
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return ResumableTrainLoader(cfg, dicts, build_train_mapper(cfg), seed)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_image_files(DatasetCatalog.get(dataset_name), [dataset_name])
        check_num_classes(cfg, [dataset_name])
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
        return super().test(cfg, model, evaluators)


def adopt_periodic_checkpoints(hook, output_dir: str) -> None:
    """Count the periodic checkpoints already in ``output_dir`` (a resumed run) among those that
    a PeriodicCheckpointer with ``max_to_keep`` removes when newer ones come."""
    hook.recent_checkpoints = sorted(glob.glob(os.path.join(output_dir, "model_[0-9]*.pth")))


def load_eval_weights(cfg, model, resume: bool = False, allow_pickle: bool = False, *,
                      weights: str = None, output_dir: str = None, weights_key: str = "MODEL.WEIGHTS") -> None:
    """Load the weights that ``--eval-only`` evaluates into ``model``: OUTPUT_DIR's last checkpoint
    with ``resume`` (when there is one), else MODEL.WEIGHTS; read safely, and they must fit the
    whole model. Evaluating without weights (a random model) is an error. A LazyConfig passes
    ``cfg=None`` with ``weights`` (its ``train.init_checkpoint``) and ``output_dir``."""
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    output_dir = cfg.OUTPUT_DIR if output_dir is None else output_dir
    checkpointer = SafeCheckpointer(model, output_dir, allow_pickle=allow_pickle, complete=True, source=weights_key)
    if not weights and not (resume and checkpointer.has_checkpoint()):
        raise CheckpointError(
            f"--eval-only needs the weights to evaluate: {weights_key} path/to/model_final.pth "
            "(or --resume with a checkpoint in the output folder); without them it would evaluate a random model"
        )
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights_key} {weights!r} does not exist")
    checkpointer.resume_or_load(weights, resume=resume)


def build_predictor(cfg, allow_pickle: bool = False) -> DefaultPredictor:
    """detectron2's DefaultPredictor of ``cfg``, with MODEL.WEIGHTS read safely and checked to fit
    the whole model (a random or unconverted model would draw noise)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise CheckpointError("no weights given: prediction needs a trained model's weights")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights {weights!r} do not exist")
    blank = cfg.clone()
    blank.defrost()
    blank.MODEL.WEIGHTS = ""  # DefaultPredictor loads nothing; the safe checkpointer loads them
    predictor = DefaultPredictor(blank)
    SafeCheckpointer(predictor.model, allow_pickle=allow_pickle, complete=True, source="--weights").load(weights)
    predictor.cfg = cfg.clone()
    return predictor


def predict_images(predictor: DefaultPredictor, paths: List[str], output_dir: str, metadata=None) -> List[str]:
    """Draw the predictions on each image file into ``output_dir`` (one PNG per input, same stem):
    instances (boxes, masks, class names), or per-pixel classes for a semantic segmentation
    model; a line per input. A file that is not a readable image is reported and skipped;
    returns those paths."""
    os.makedirs(output_dir, exist_ok=True)
    fmt = predictor.input_format
    failed = []
    for path in paths:
        try:
            img = utils.read_image(path, format=fmt)
        except Exception as e:  # PIL raises many types for files that are no images
            logger.warning(f"{path}: skipped, not a readable image ({type(e).__name__}: {e})")
            failed.append(path)
            continue
        pred = predictor(img)
        rgb = img if fmt == "RGB" else img[:, :, ::-1]
        out = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        if "sem_seg" in pred:
            labels = pred["sem_seg"].argmax(dim=0).to("cpu")
            Image.fromarray(draw_sem_seg(rgb, labels, metadata)).save(out)
            names = list(metadata.get("stuff_classes", None) or []) if metadata is not None else []
            found = [names[i] if i < len(names) else str(i) for i in torch.unique(labels).tolist()]
            logger.info(f"{path}: classes {', '.join(found)} -> {out}")
            continue
        # the ROI heads already dropped the detections under SCORE_THRESH_TEST
        instances = pred["instances"]
        Image.fromarray(draw_predictions(rgb, instances, metadata)).save(out)
        logger.info(f"{path}: {len(instances)} instances -> {out}")
    return failed


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
