"""Checks that name a bad dataset file before training or evaluation starts.

- :func:`load_coco_json_named`: detectron2's ``load_coco_json``, with a parse error naming the json;
- :func:`check_image_files`: every image exists, decodes and has the size its json gives;
  checked in parallel, and remembered by (path, size, mtime) in a cache so that COCO's 118k
  images are read once (:func:`cache_dir`);
- :func:`check_image_files` also checks semantic label files (``sem_seg_file_name``);
- :func:`check_num_classes`: ``MODEL.ROI_HEADS.NUM_CLASSES`` (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``
  for a SemanticSegmentor) equals the dataset's class count.
"""
import concurrent.futures
import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.utils import comm
from PIL import Image

from ..utils.fileio import atomic_write
from .mapper import is_sem_seg

__all__ = ["DatasetError", "cache_dir", "check_image_files", "check_num_classes", "load_coco_json_named", "verify_image"]

logger = logging.getLogger("convmae_det")
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """A dataset file that cannot be used as it is; the message names it and the problem."""


def load_coco_json_named(json_file: str, image_root: str, name: str) -> List[dict]:
    """``load_coco_json``; a file that is not valid JSON raises a :class:`DatasetError` naming it."""
    try:
        return load_coco_json(json_file, image_root, name)
    except json.JSONDecodeError as e:
        raise DatasetError(f"dataset {name}: annotation file {json_file} is not valid JSON: {e}") from None


def cache_dir() -> str:
    """Where checks remember their results: ``$CONVMAE_DET_CACHE``, else
    ``$XDG_CACHE_HOME/convmae_det`` (default ``~/.cache/convmae_det``)."""
    if os.getenv("CONVMAE_DET_CACHE"):
        return os.environ["CONVMAE_DET_CACHE"]
    return os.path.join(os.getenv("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "convmae_det")


def verify_image(path: str, width: Optional[int] = None, height: Optional[int] = None) -> Tuple[Optional[str], Tuple[int, int]]:
    """(problem or None, (width, height)) of an image file: it must be 8-bit (detectron2's reader
    would clip a 16-bit or float one), decode to the end (a JPEG at reduced scale, which still
    reads every byte) and, when given, have the ``width`` x ``height``
    that detectron2's ``read_image`` gives it (after the EXIF orientation)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                return (
                    f"is a {im.mode} (16-bit or float) image, which detectron2's reader clips to 255 (white): "
                    "convert it to 8 bits (16-bit values / 257)"
                ), (w, h)
            if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except Exception as e:  # PIL raises many types for damaged files
        return f"cannot be decoded ({type(e).__name__}: {e})", (0, 0)
    if width is not None and height is not None and (w, h) != (width, height):
        return f"is {w}x{h} pixels but its annotations say {width}x{height}", (w, h)
    return None, (w, h)


def _cache_file(folder: str) -> str:
    return os.path.join(cache_dir(), "image_checks", hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:16] + ".json")


def _load_cache(folder: str) -> Dict[str, list]:
    try:
        with open(_cache_file(folder)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_cache(folder: str, entries: Dict[str, list]) -> None:
    try:
        with atomic_write(_cache_file(folder)) as f:
            json.dump(entries, f)
    except OSError as e:  # a cache that cannot be written only costs time
        logger.warning(f"cannot write the image check cache {_cache_file(folder)}: {e}")


def check_image_files(dataset_dicts: Sequence[dict], names: Sequence[str], workers: Optional[int] = None) -> None:
    """Fail before training or evaluation starts if an image of the dataset (or a semantic label
    file, ``sem_seg_file_name``) is missing, does not decode, or has another size than its
    dataset dict says; the error names the first bad file and its problem. Good files are
    remembered by (size, mtime) in :func:`cache_dir`, so a later run stats them only. On several
    processes, the first of each machine checks and the others wait for it."""
    for key, what in (("file_name", "image"), ("sem_seg_file_name", "semantic label file")):
        files = [dict(file_name=d[key], width=d.get("width"), height=d.get("height")) for d in dataset_dicts if key in d]
        missing = [d["file_name"] for d in files if not os.path.isfile(d["file_name"])]
        if missing:
            shown = "\n  ".join(missing[:5])
            raise FileNotFoundError(
                f"{len(missing)} of {len(files)} {what}s of dataset(s) {list(names)} are missing, e.g.\n  {shown}"
            )
        if files and comm.get_local_rank() == 0:
            _verify_all(files, names, workers, what)
        comm.synchronize()


def _verify_all(dataset_dicts, names, workers, what="image"):
    by_folder: Dict[str, Dict[str, Tuple[int, int, Optional[int], Optional[int]]]] = {}
    for d in dataset_dicts:  # one entry per file, with the size its dicts give
        path = d["file_name"]
        by_folder.setdefault(os.path.dirname(path), {})[os.path.basename(path)] = (d.get("width"), d.get("height"))
    todo, caches = [], {}
    for folder, files in by_folder.items():
        cache = caches[folder] = _load_cache(folder)
        for name, (w, h) in files.items():
            st = os.stat(os.path.join(folder, name))
            known = cache.get(name)
            if not (known and known[:2] == [st.st_size, st.st_mtime_ns] and (w is None or known[2:] == [w, h])):
                todo.append((folder, name, w, h, st))
    if not todo:
        return
    logger.info(f"checking {len(todo)} {what}s of {list(names)} (decodable, sizes as annotated)")
    workers = workers or min(32, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda t: verify_image(os.path.join(t[0], t[1]), t[2], t[3]), todo))
    bad = []
    for (folder, name, _, _, st), (problem, (w, h)) in zip(todo, results):
        if problem:
            bad.append(f"{os.path.join(folder, name)} {problem}")
        else:
            caches[folder][name] = [st.st_size, st.st_mtime_ns, w, h]
    for folder in {t[0] for t in todo}:
        _save_cache(folder, caches[folder])
    if bad:
        more = f" ({len(bad) - 1} more bad {what}s)" if len(bad) > 1 else ""
        raise DatasetError(f"dataset(s) {list(names)}: {what} {bad[0]}{more}")


def check_num_classes(cfg, names: Sequence[str]) -> None:
    """The model's class count must equal that of the datasets ``names`` (read from their
    metadata, which loading their dicts sets): ``MODEL.ROI_HEADS.NUM_CLASSES`` against
    ``thing_classes`` for a detector, ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` against
    ``stuff_classes`` for a SemanticSegmentor (labels past the head's classes would crash the
    loss mid-training, fewer would leave classes unscored)."""
    if is_sem_seg(cfg):
        key, field, n = "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes", cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    else:
        key, field, n = "MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes", cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in names:
        classes = MetadataCatalog.get(name).get(field)
        if classes is not None and len(classes) != n:
            shown = ", ".join(map(str, classes[:8])) + (", ..." if len(classes) > 8 else "")
            raise DatasetError(
                f"{key} is {n} but dataset {name} has {len(classes)} classes ({shown}): set {key} {len(classes)}"
            )
