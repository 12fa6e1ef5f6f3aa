"""Registration of the built-in shapes dataset with detectron2.

``convmae_shapes_train`` and ``convmae_shapes_val`` live under
``$DETECTRON2_DATASETS/convmae_shapes`` (default ``./datasets/convmae_shapes``), read when the
dataset is used, not when ``convmae_det`` is imported: the catalog entries are functions that
find the root, write the files there if they are missing and load them (detectron2's
``load_coco_json``), and the metadata's ``json_file`` and ``image_root`` (what COCOEvaluator
reads) follow the same root. ``convmae_shapes_train_N`` (any N, e.g.
``convmae_shapes_train_100``) is the labeled subset of the first N training images, for
label-efficient finetuning. :func:`prepare_builtin_datasets`, which the trainer calls for the
datasets a config names, writes them up front (and rewrites a stale copy), so a fresh
checkout needs no download.
"""
import functools
import os
import re
from typing import Iterable, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .checks import load_coco_json_named
from .shapes import SHAPE_CLASSES, ShapesSpec, generate_shapes_dataset, write_labeled_subset

__all__ = [
    "BUILTIN_SHAPES",
    "shapes_root",
    "register_builtin_shapes",
    "prepare_builtin_datasets",
    "register_coco_datasets",
    "add_register_argument",
]

BUILTIN_SHAPES = ("convmae_shapes_train", "convmae_shapes_val")
_SUBSET = re.compile(r"convmae_shapes_train_(\d+)")


def shapes_root() -> str:
    """``$DETECTRON2_DATASETS/convmae_shapes`` (``./datasets/convmae_shapes`` if it is unset), now."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "convmae_shapes")


def _files(name: str):
    """(json file, image folder) of a built-in dataset name under the current root."""
    m = _SUBSET.fullmatch(name)
    split = f"train_{m.group(1)}" if m else {"convmae_shapes_train": "train", "convmae_shapes_val": "val"}[name]
    root = shapes_root()
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split.split("_")[0])


class _ShapesMetadata(Metadata):
    """Metadata of a built-in split whose ``json_file`` and ``image_root`` are under
    :func:`shapes_root` at the time they are read."""

    @property
    def json_file(self) -> str:
        return _files(self.name)[0]

    @property
    def image_root(self) -> str:
        return _files(self.name)[1]


def _ensure_files(name: str, spec: ShapesSpec = None, check: bool = False) -> None:
    """Write the built-in dataset under the current root if it is missing (with ``check``, also
    if it differs from ``spec``), and the labeled subset that ``name`` names."""
    root = shapes_root()
    if check or not all(os.path.isfile(_files(n)[0]) for n in BUILTIN_SHAPES):
        generate_shapes_dataset(root, spec)
    m = _SUBSET.fullmatch(name)
    if m:
        write_labeled_subset(root, int(m.group(1)))


def _register_lazy(name: str) -> None:
    def load():
        _ensure_files(name)
        meta = MetadataCatalog.get(name)
        return load_coco_json_named(meta.json_file, meta.image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog[name] = _ShapesMetadata(name=name, thing_classes=list(SHAPE_CLASSES), evaluator_type="coco")


def register_builtin_shapes(root: str = None) -> None:
    """Register the two splits (idempotent: existing registrations are kept): under the root
    of their use (see the module's doc), or under ``root`` if given."""
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


def prepare_builtin_datasets(names: Iterable[str], spec: ShapesSpec = None) -> None:
    """Write the built-in dataset under the current root, unless an identical one is there, if
    any of ``names`` is one of its splits, and write and register the labeled subsets
    ``convmae_shapes_train_N`` among them."""
    names = [n for n in names if n in BUILTIN_SHAPES or _SUBSET.fullmatch(n)]
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
