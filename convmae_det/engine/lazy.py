"""LazyConfig (``.py``) configs: ViTDet's training conventions with convmae-det's checks and evaluation.

A config defines ``model``, ``dataloader`` (``train``, ``test``, ``evaluator``), ``optimizer``,
``lr_multiplier`` and ``train``, as detectron2's ``tools/lazyconfig_train_net.py`` expects
(``configs/common/mask_rcnn_convmae.py`` documents each key against its yacs twin).
:func:`main_lazy` trains and evaluates one the way :class:`~convmae_det.engine.Trainer` does a
yacs config: AMPTrainer or SimpleTrainer, detectron2's hooks, convmae_det's COCOEvaluator, the
built-in dataset generated on first use, image files and ``train.init_checkpoint`` checked
before anything runs, the same CPU fallback. Overrides are ``key=value``
(:meth:`LazyConfig.apply_overrides`), checked against the config's keys.

It has the yacs path's protections: ``train.output_dir`` holding an earlier run is refused
unless ``--resume`` or ``--overwrite``; weights are read by
:class:`~convmae_det.checkpoint.SafeCheckpointer` (no code runs from them unless
``--allow-pickle``, they must fit, checkpoints are written atomically); ``--eval-only`` needs
weights. ``--resume`` restores the model, the optimizer (and AMP grad scaler), the LR
scheduler and the iteration, but not the data stream: detectron2's training loader of
``dataloader.train`` starts its sampler over, so a resumed run sees other batches than the
uninterrupted one would have (the yacs path's resume is exact).
"""
import inspect
import logging
import os
from pydoc import locate
from typing import List, Sequence

import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..checkpoint import SafeCheckpointer
from ..data import prepare_builtin_datasets, register_coco_datasets
from ..solver import use_fused_optimizer
from ..utils.logger import setup_logging
from .trainer import (
    adopt_periodic_checkpoints,
    check_image_files,
    check_weights_fit,
    draw_prediction_images,
    load_eval_weights,
    prepare_output_dir,
)

__all__ = [
    "REQUIRED_KEYS",
    "is_lazy_config",
    "load_lazy_config",
    "check_overrides",
    "build_lazy_optimizer",
    "instantiate_loader",
    "do_test",
    "do_train",
    "main_lazy",
]

logger = logging.getLogger("convmae_det")

REQUIRED_KEYS = ("model", "dataloader", "optimizer", "lr_multiplier", "train")


def is_lazy_config(path: str) -> bool:
    """A ``.py`` file is a LazyConfig; anything else is for yacs."""
    return os.path.splitext(path)[1] == ".py"


def _unknown_key(key: str, why: str) -> ValueError:
    hint = ""
    if key.split(".")[0].isupper():
        hint = (
            "\nKEYS IN CAPITALS are yacs keys (the .yaml configs); a LazyConfig's top-level keys are "
            f"{', '.join(REQUIRED_KEYS)} (e.g. MODEL.WEIGHTS is train.init_checkpoint)"
        )
    return ValueError(f"config override {key!r}: {why}{hint}")


def check_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Fail clearly on an override that is not ``key=value`` or names no key of ``cfg``.

    A key may be new only as an argument of a LazyCall (a node with ``_target_``) whose
    callable takes it; ``+key=value`` (hydra's explicit addition) adds any key unchecked.
    LazyConfig.apply_overrides alone would add a misspelt key silently."""
    for o in overrides:
        if "=" not in o:
            raise ValueError(
                f"config override {o!r}: a LazyConfig (.py) config takes key=value overrides, e.g. "
                "train.max_iter=100; KEY VALUE pairs are for the yacs (.yaml) configs"
            )
        key = o.split("=", 1)[0]
        if key.startswith("+"):
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
        if isinstance(parent, DictConfig):
            if name in parent:
                continue
            if "_target_" in parent:
                target = parent._target_
                target = locate(target) if isinstance(target, str) else target
                params = inspect.signature(target).parameters
                if name in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                    continue
                raise _unknown_key(key, f"{_qualname(target)} takes no argument {name!r} (it takes {', '.join(params)})")
            raise _unknown_key(key, f"no such key; {parent_key or 'the config'} has {', '.join(map(str, parent))}")
        if isinstance(parent, ListConfig) and name.isdigit() and int(name) < len(parent):
            continue
        raise _unknown_key(key, f"no such key ({parent_key!r} is not in the config)" if parent is None else "no such key")


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}"


def _set_everywhere(node, key: str, value) -> None:
    """Set ``key`` to ``value`` in every dict node under ``node`` that has it."""
    if isinstance(node, DictConfig):
        children = [k for k in node.keys() if not OmegaConf.is_interpolation(node, k)]
        if key in children:
            node[key] = value
        children = [node[k] for k in children if k != key]
    elif isinstance(node, ListConfig):
        children = [node[i] for i in range(len(node)) if not OmegaConf.is_interpolation(node, i)]
    else:
        return
    for child in children:
        _set_everywhere(child, key, value)


def load_lazy_config(config_file: str, overrides: Sequence[str] = ()) -> DictConfig:
    """LazyConfig.load + checked ``key=value`` overrides, then what the yacs ``setup_cfg`` does:
    without a GPU the model runs on the CPU, and on the CPU AMP and ``compile_blocks`` are off;
    the evaluator's COCOeval backend is resolved once so that a bad value fails here."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file!r} does not exist")
    cfg = LazyConfig.load(config_file)
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"LazyConfig {config_file} defines no {', '.join(missing)} (it needs {', '.join(REQUIRED_KEYS)})")
    overrides = list(overrides)
    check_overrides(cfg, overrides)
    cfg = LazyConfig.apply_overrides(cfg, overrides)
    train = cfg.train
    if str(train.device).startswith("cuda") and not torch.cuda.is_available():
        train.device = "cpu"
    if train.device == "cpu":
        train.amp.enabled = False
        _set_everywhere(cfg.model, "compile_blocks", False)
    keep = OmegaConf.select(cfg, "train.checkpointer.max_to_keep", default=None)
    if keep is not None and keep < 1:
        raise ValueError(f"train.checkpointer.max_to_keep must be None (keep all) or >= 1, got {keep}")
    _check_square_pad(cfg)
    backend = OmegaConf.select(cfg, "dataloader.evaluator.backend", default=None)
    if isinstance(backend, DictConfig) and "_target_" in backend:
        instantiate(backend)  # an unknown TEST.FAST_COCO_EVAL-like value or a missing package fails here
    return cfg


def _target_name(node) -> str:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return getattr(target, "__name__", str(target).rpartition(".")[2]) if target is not None else ""


def _check_square_pad(cfg: DictConfig) -> None:
    """The yacs checks of INPUT.LSJ.IMAGE_SIZE and the test size against the model's square
    padding, on the LazyCalls that set them (build_lsj_augmentations, ResizeShortestEdge)."""
    square = OmegaConf.select(cfg, "model.backbone.square_pad", default=0)
    if not square:
        return
    for split in ("train", "test"):
        key = f"dataloader.{split}.mapper.augmentations"
        augs = OmegaConf.select(cfg, key, default=None)
        if _target_name(augs) == "build_lsj_augmentations" and augs.image_size > square:
            raise ValueError(f"{key}.image_size {augs.image_size} exceeds model.backbone.square_pad {square}")
        for i, aug in enumerate(augs if isinstance(augs, ListConfig) else []):
            if _target_name(aug) == "ResizeShortestEdge" and split == "test":
                edge = aug.short_edge_length
                size = max(aug.get("max_size", 0), *(edge if isinstance(edge, ListConfig) else [edge]))
                if size > square:
                    raise ValueError(
                        f"test images may reach {size} px ({key}.{i}) but model.backbone.square_pad is {square}: "
                        "set short_edge_length and max_size <= square_pad"
                    )


def _solver_view(train: DictConfig) -> CfgNode:
    """The SOLVER keys that the yacs optimizer helpers read, from ``train.fused_optimizer`` and
    ``train.clip_gradients`` (absent: off, as in ViTDet's configs)."""
    clip = OmegaConf.select(train, "clip_gradients", default=None) or {}
    return CfgNode({"SOLVER": {
        "FUSED": bool(OmegaConf.select(train, "fused_optimizer", default=False)),
        "CLIP_GRADIENTS": {
            "ENABLED": bool(clip.get("enabled", False)),
            "CLIP_TYPE": str(clip.get("clip_type", "value")),
            "CLIP_VALUE": float(clip.get("clip_value", 1.0)),
            "NORM_TYPE": float(clip.get("norm_type", 2.0)),
        },
    }})


def _plain(v):
    if isinstance(v, ListConfig):
        return tuple(_plain(x) for x in v)
    if isinstance(v, DictConfig):
        return {k: _plain(x) for k, x in v.items()}
    return v


def build_lazy_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``instantiate(cfg.optimizer)`` for ``model`` (ViTDet's convention: ``optimizer.params.model``
    is set to it), with detectron2's gradient clipping of ``train.clip_gradients`` and the fused
    kernels of ``train.fused_optimizer``, under the rules of the yacs path (SOLVER.CLIP_GRADIENTS,
    SOLVER.FUSED; :func:`convmae_det.solver.use_fused_optimizer`)."""
    cfg.optimizer.params.model = model
    node = cfg.optimizer
    cls = node._target_
    cls = locate(cls) if isinstance(cls, str) else cls
    # hyper-parameters as plain tuples (betas arrive as a ListConfig, which would be pickled
    # into the optimizer's state in every checkpoint)
    kwargs = {k: _plain(instantiate(node[k])) for k in node if k != "_target_"}
    view = _solver_view(cfg.train)
    if "fused" not in kwargs and "fused" in inspect.signature(cls).parameters and use_fused_optimizer(view, model):
        kwargs["fused"] = True
    return maybe_add_gradient_clipping(view, cls)(**kwargs)


def _dataset_names(loader_cfg) -> List[str]:
    names = OmegaConf.select(loader_cfg, "dataset.names", default=None)
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def instantiate_loader(loader_cfg: DictConfig, dataset=None):
    """``instantiate(loader_cfg)`` with its dataset built first (or ``dataset`` given) and its image
    files checked, as the yacs Trainer's loaders do; the built-in datasets are generated first."""
    if "dataset" not in loader_cfg:
        return instantiate(loader_cfg)
    names = _dataset_names(loader_cfg)
    if dataset is None:
        prepare_builtin_datasets(names)
        dataset = instantiate(loader_cfg.dataset)
    if isinstance(dataset, list) and dataset and isinstance(dataset[0], dict) and "file_name" in dataset[0]:
        check_image_files(dataset, names)
    args = {k: loader_cfg[k] for k in loader_cfg if k != "dataset"}
    return instantiate({**args, "dataset": dataset})


def do_test(cfg: DictConfig, model: torch.nn.Module):
    """Evaluate on ``dataloader.test`` with ``dataloader.evaluator``; log the ``copypaste:`` lines."""
    names = _dataset_names(cfg.dataloader.test)
    loader = instantiate_loader(cfg.dataloader.test)
    results = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        logger.info(f"Evaluation results for {','.join(names)} in csv format:")
        print_csv_format(results)
    return results


def do_train(cfg: DictConfig, resume: bool = False, allow_pickle: bool = False):
    """Train as detectron2's lazyconfig_train_net.py does (and DefaultTrainer for yacs), with
    checkpoints read and written by the SafeCheckpointer; return the last evaluation's results
    and the (possibly DDP-wrapped) model."""
    prepare_builtin_datasets(_dataset_names(cfg.dataloader.train) + _dataset_names(cfg.dataloader.test))
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)
    optimizer = build_lazy_optimizer(cfg, model)
    train_loader = instantiate_loader(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = SafeCheckpointer(
        model, cfg.train.output_dir, allow_pickle=allow_pickle, source="train.init_checkpoint", trainer=trainer
    )
    last = {}

    def test_and_keep():
        last["results"] = do_test(cfg, model)
        return last["results"]

    periodic = None
    if comm.is_main_process():
        periodic = hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        adopt_periodic_checkpoints(periodic, cfg.train.output_dir)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        periodic,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    if not (resume and checkpointer.has_checkpoint()):
        check_weights_fit(model, cfg.train.init_checkpoint, allow_pickle)
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return last.get("results"), model


def _visualize(cfg: DictConfig, model: torch.nn.Module) -> None:
    """train.vis: the first images of dataloader.test drawn with predictions beside ground truth."""
    num = OmegaConf.select(cfg, "train.vis.num_images", default=0)
    names = _dataset_names(cfg.dataloader.test)
    if not num or not names or not comm.is_main_process():
        return
    dicts = instantiate(cfg.dataloader.test.dataset)[:num]
    loader = instantiate_loader(cfg.dataloader.test, dataset=dicts)
    out = os.path.join(cfg.train.output_dir, "vis")
    paths = draw_prediction_images(
        getattr(model, "module", model), dicts, loader, MetadataCatalog.get(names[0]), out, cfg.train.vis.score_thresh
    )
    logger.info(f"wrote {len(paths)} prediction images of {names[0]} to {out}")


def main_lazy(args):
    """``tools/train_net.py --config-file X.py``: train (or ``--eval-only``) a LazyConfig."""
    try:
        register_coco_datasets(args.register)  # --register NAME JSON IMAGE_ROOT
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    cfg = load_lazy_config(args.config_file, args.opts)
    allow_pickle = getattr(args, "allow_pickle", False)
    prepare_output_dir(
        cfg.train.output_dir, resume=args.resume, overwrite=getattr(args, "overwrite", False), eval_only=args.eval_only
    )
    default_setup(cfg, args)
    setup_logging(cfg.train.output_dir, comm.get_rank())
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        load_eval_weights(
            None, model, resume=args.resume, allow_pickle=allow_pickle, weights=cfg.train.init_checkpoint,
            output_dir=cfg.train.output_dir, weights_key="train.init_checkpoint",
        )
        res = do_test(cfg, model)
    else:
        res, model = do_train(cfg, resume=args.resume, allow_pickle=allow_pickle)
    _visualize(cfg, model)
    return res
