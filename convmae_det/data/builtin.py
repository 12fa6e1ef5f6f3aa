"""Registration of the built-in shapes dataset with detectron2.

``convmae_shapes_train`` and ``convmae_shapes_val`` live under
``$DETECTRON2_DATASETS/convmae_shapes`` (default ``./datasets/convmae_shapes``), read when the
dataset is used, not when ``convmae_det`` is imported: the catalog entries are functions that
find the root, write the files there if they are missing and load them (detectron2's
``load_coco_json``), and the metadata's ``json_file`` and ``image_root`` (what COCOEvaluator
reads) follow the same root. ``convmae_shapes_train_N`` (any N, e.g.
``convmae_shapes_train_100``) is the labeled subset of the first N training images, for
label-efficient finetuning. ``convmae_shapes_sem_seg_train`` and ``convmae_shapes_sem_seg_val``
are the same images as detectron2 semantic segmentation datasets: per-pixel labels 0
(background) to 5 under ``convmae_shapes/sem_seg/``, 255 ignored
(:func:`~convmae_det.data.shapes.semantic_label_map`). :func:`prepare_builtin_datasets`, which
the trainer calls for the datasets a config names, writes them up front (and rewrites a stale
copy), so a fresh checkout needs no download.
"""
import functools
import json
import os
import re
from typing import Iterable, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .checks import load_coco_json_named
from .shapes import (
    SEM_SEG_CLASSES,
    SEM_SEG_IGNORE,
    SHAPE_CLASSES,
    ShapesSpec,
    generate_shapes_dataset,
    sem_seg_labels_ready,
    write_labeled_subset,
    write_sem_seg_labels,
)

__all__ = [
    "BUILTIN_SHAPES",
    "BUILTIN_SHAPES_SEM_SEG",
    "SEM_SEG_COLORS",
    "load_shapes_sem_seg",
    "shapes_root",
    "register_builtin_shapes",
    "prepare_builtin_datasets",
    "register_coco_datasets",
    "add_register_argument",
]

BUILTIN_SHAPES = ("convmae_shapes_train", "convmae_shapes_val")
BUILTIN_SHAPES_SEM_SEG = ("convmae_shapes_sem_seg_train", "convmae_shapes_sem_seg_val")
# drawing colours of the semantic classes: background black, the shapes distinct
SEM_SEG_COLORS = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]]
_SUBSET = re.compile(r"convmae_shapes_train_(\d+)")


def shapes_root() -> str:
    """``$DETECTRON2_DATASETS/convmae_shapes`` (``./datasets/convmae_shapes`` if it is unset), now."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "convmae_shapes")


def load_shapes_sem_seg(root: str, split: str):
    """detectron2 dataset dicts of a split for semantic segmentation: ``file_name``,
    ``sem_seg_file_name``, ``height``, ``width``, ``image_id``, in the annotation file's order.
    The labels must have been written (:func:`prepare_builtin_datasets`)."""
    if not sem_seg_labels_ready(root, split):
        raise FileNotFoundError(
            f"no current semantic labels for the {split} split under {os.path.join(root, 'sem_seg', split)}: "
            "tools/train_net.py writes them for the datasets a config names (prepare_builtin_datasets)"
        )
    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
        images = json.load(f)["images"]
    return [
        dict(
            file_name=os.path.join(root, split, im["file_name"]),
            sem_seg_file_name=os.path.join(root, "sem_seg", split, im["file_name"]),
            height=im["height"], width=im["width"], image_id=im["id"],
        )
        for im in images
    ]


def _files(name: str):
    """(json file, image folder) of a built-in instance dataset name under the current root."""
    m = _SUBSET.fullmatch(name)
    split = f"train_{m.group(1)}" if m else {"convmae_shapes_train": "train", "convmae_shapes_val": "val"}[name]
    root = shapes_root()
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split.split("_")[0])


def _sem_seg_split(name: str) -> str:
    return ("train", "val")[BUILTIN_SHAPES_SEM_SEG.index(name)]


class _ShapesMetadata(Metadata):
    """Metadata of a built-in split whose ``json_file`` and ``image_root`` (instance splits) or
    ``image_root`` and ``sem_seg_root`` (semantic splits) are under :func:`shapes_root` at the
    time they are read."""

    @property
    def json_file(self) -> str:
        if self.name in BUILTIN_SHAPES_SEM_SEG:
            raise AttributeError(f"semantic segmentation dataset {self.name} has no json_file")
        return _files(self.name)[0]

    @property
    def image_root(self) -> str:
        if self.name in BUILTIN_SHAPES_SEM_SEG:
            return os.path.join(shapes_root(), _sem_seg_split(self.name))
        return _files(self.name)[1]

    @property
    def sem_seg_root(self) -> str:
        return os.path.join(shapes_root(), "sem_seg", _sem_seg_split(self.name))


def _ensure_files(name: str, spec: ShapesSpec = None, check: bool = False) -> None:
    """Write the built-in dataset under the current root if it is missing (with ``check``, also
    if it differs from ``spec``), the labeled subset that ``name`` names, and the semantic
    labels of a ``convmae_shapes_sem_seg_*`` split (for a dataset written before there were
    labels, or by an older labelling rule)."""
    root = shapes_root()
    if check or not all(os.path.isfile(_files(n)[0]) for n in BUILTIN_SHAPES):
        generate_shapes_dataset(root, spec)
    m = _SUBSET.fullmatch(name)
    if m:
        write_labeled_subset(root, int(m.group(1)))
    if name in BUILTIN_SHAPES_SEM_SEG:
        write_sem_seg_labels(root, _sem_seg_split(name))


def _sem_seg_metadata() -> dict:
    """The metadata of the built-in semantic splits, besides their folders."""
    return dict(
        stuff_classes=list(SEM_SEG_CLASSES),
        stuff_colors=[list(c) for c in SEM_SEG_COLORS],
        ignore_label=SEM_SEG_IGNORE,
        evaluator_type="sem_seg",
    )


def _register_lazy(name: str) -> None:
    if name in BUILTIN_SHAPES_SEM_SEG:

        def load():
            _ensure_files(name)
            return load_shapes_sem_seg(shapes_root(), _sem_seg_split(name))

        DatasetCatalog.register(name, load)
        MetadataCatalog[name] = _ShapesMetadata(name=name, **_sem_seg_metadata())
        return

    def load():
        _ensure_files(name)
        meta = MetadataCatalog.get(name)
        return load_coco_json_named(meta.json_file, meta.image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog[name] = _ShapesMetadata(name=name, thing_classes=list(SHAPE_CLASSES), evaluator_type="coco")


def register_builtin_shapes(root: str = None) -> None:
    """Register the two splits for instance and for semantic segmentation (idempotent:
    existing registrations are kept): under the root of their use (see the module's doc), or
    under ``root`` if given."""
    for name, split in zip(BUILTIN_SHAPES, ("train", "val")):
        if name in DatasetCatalog.list():
            continue
        if root is None:
            _register_lazy(name)
        else:
            register_coco_instances(
                name,
                {"thing_classes": list(SHAPE_CLASSES)},
                os.path.join(root, "annotations", f"instances_{split}.json"),
                os.path.join(root, split),
            )
    for name, split in zip(BUILTIN_SHAPES_SEM_SEG, ("train", "val")):
        if name in DatasetCatalog.list():
            continue
        if root is None:
            _register_lazy(name)
        else:
            DatasetCatalog.register(name, lambda r=root, s=split: load_shapes_sem_seg(r, s))
            MetadataCatalog.get(name).set(
                image_root=os.path.join(root, split), sem_seg_root=os.path.join(root, "sem_seg", split),
                **_sem_seg_metadata(),
            )


def prepare_builtin_datasets(names: Iterable[str], spec: ShapesSpec = None) -> None:
    """Write the built-in dataset under the current root, unless an identical one is there, if
    any of ``names`` is one of its splits, the semantic labels of the ``convmae_shapes_sem_seg_*``
    splits among them, and write and register the labeled subsets ``convmae_shapes_train_N``
    among them."""
    names = [n for n in names if n in BUILTIN_SHAPES or n in BUILTIN_SHAPES_SEM_SEG or _SUBSET.fullmatch(n)]
    for i, name in enumerate(names):
        _ensure_files(name, spec, check=i == 0)
        if name not in DatasetCatalog.list():
            _register_lazy(name)


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> None:
    """Register COCO-format datasets of your own: ``(name, json_file, image_root)`` triples (the
    tools' ``--register NAME JSON IMAGE_ROOT``), loaded by :func:`~.checks.load_coco_json_named`
    (a json that does not parse is an error naming it). A missing annotation file or image folder
    is a FileNotFoundError naming it; a name already registered (built in, or registered twice)
    is a ValueError: keeping the old dataset under the name would train on other data silently."""
    for name, json_file, image_root in specs or []:
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"--register {name}: annotation file {json_file!r} does not exist")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"--register {name}: image folder {image_root!r} does not exist")
        if name in DatasetCatalog.list():
            raise ValueError(f"--register {name}: a dataset of that name is already registered (built in, or given twice): choose another NAME")
        DatasetCatalog.register(name, functools.partial(load_coco_json_named, json_file, image_root, name))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def add_register_argument(parser) -> None:
    """The tools' ``--register NAME JSON IMAGE_ROOT`` option (repeatable), for
    :func:`register_coco_datasets`."""
    parser.add_argument(
        "--register", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable); use NAME in DATASETS.TRAIN/TEST",
    )


register_builtin_shapes()
