"""A generated COCO-format instance segmentation dataset: shapes on textured backgrounds.

Five classes (circle, triangle, square, star, cross) at random scale, rotation, colour and
texture, several per image, overlapping and occluding one another. Every instance is
annotated with polygons of its *visible* part (occluders subtracted with shapely), so the
dataset exercises detection and segmentation under occlusion. Everything derives from one
seed: the same arguments write the same files.

Layout under ``root``::

    train/000000.png ...   val/000000.png ...
    annotations/instances_train.json   annotations/instances_val.json
    annotations/instances_train_100.json    the first 100 training images (write_labeled_subset)
    sem_seg/train/000000.png ...            per-pixel class labels (write_sem_seg_labels)
    sem_seg/val/000000.png ...
    pool/000000.png ... pool/spec.json      unlabeled images for pretraining (generate_shapes_pool)

The unlabeled pool is drawn from its own random stream (seed, "pool"), so its images are new
draws of the same distribution, never copies of train or val images.
"""
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from shapely.geometry import MultiPolygon, Polygon
from shapely.ops import unary_union

from ..utils.fileio import atomic_write

__all__ = [
    "SHAPE_CLASSES",
    "ShapesSpec",
    "generate_shapes_dataset",
    "generate_shapes_pool",
    "shapes_dataset_ready",
    "make_shape_polygon",
    "write_labeled_subset",
    "SEM_SEG_CLASSES",
    "SEM_SEG_IGNORE",
    "semantic_label_map",
    "sem_seg_labels_ready",
    "write_sem_seg_labels",
]

SHAPE_CLASSES = ["circle", "triangle", "square", "star", "cross"]
logger = logging.getLogger("convmae_det.data")
FORMAT_VERSION = 4
# semantic labels: 0 background, 1-5 the shape classes (category_id), 255 ignored
SEM_SEG_CLASSES = ["background"] + SHAPE_CLASSES
SEM_SEG_IGNORE = 255
SEM_SEG_VERSION = 1  # of the labelling rule (semantic_label_map); a change rewrites the labels


class ShapesSpec(dict):
    """Arguments that define the dataset (stored in the json so that a mismatch regenerates)."""

    def __init__(
        self,
        num_train: int = 1200,
        num_val: int = 300,
        image_size: int = 128,
        min_objects: int = 2,
        max_objects: int = 5,
        min_size: int = 24,
        max_size: int = 64,
        seed: int = 0,
    ):
        if image_size < 32 or min_size < 4 or not min_size <= max_size < image_size:
            raise ValueError(f"bad shapes spec: image_size={image_size}, object sizes {min_size}-{max_size}")
        super().__init__(
            num_train=num_train, num_val=num_val, image_size=image_size, min_objects=min_objects,
            max_objects=max_objects, min_size=min_size, max_size=max_size, seed=seed, version=FORMAT_VERSION,
        )


def make_shape_polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Vertices (K, 2) of a shape of the given kind, centred at (cx, cy), ``size`` wide."""
    r = size / 2.0
    if kind == "circle":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "triangle":
        t = np.array([0, 2, 4]) * math.pi / 3 - math.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * r * 0.75
    elif kind == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    elif kind == "cross":
        a, b = r, r * 0.35
        pts = np.array(
            [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]],
            dtype=np.float64,
        )
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPE_CLASSES}")
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.array([cx, cy])


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An H W 3 uint8 texture in random colours: solid (half of the time), stripes, checker
    or speckle, with a second colour close enough that the shape's outline stays the
    strongest edge."""
    c1 = rng.integers(0, 256, 3)
    c2 = np.clip(c1 + rng.integers(-60, 61, 3), 0, 255)
    kind = rng.choice(4, p=[0.5, 0.2, 0.15, 0.15])
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:
        sel = np.zeros((h, w), bool)
    elif kind == 1:
        period = rng.integers(4, 10)
        ang = rng.uniform(0, math.pi)
        sel = ((xx * math.cos(ang) + yy * math.sin(ang)) // (period / 2)) % 2 == 0
    elif kind == 2:
        p = rng.integers(3, 8)
        sel = ((xx // p) + (yy // p)) % 2 == 0
    else:
        sel = rng.random((h, w)) < 0.5
    img = np.where(sel[..., None], c2, c1).astype(np.float64)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    g = (xx * math.cos(ang) + yy * math.sin(ang))
    g = (g - g.min()) / max(g.max() - g.min(), 1e-6)
    img = a[None, None] * (1 - g[..., None]) + b[None, None] * g[..., None]
    img += rng.normal(0, 6, img.shape)
    # clutter: a few thin random lines that are not objects
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(0, 4)):
        p = rng.uniform(0, size, 4)
        draw.line(list(map(float, p)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return np.asarray(pil).copy()


def _polygons_of(geom) -> List[List[float]]:
    """COCO polygon lists of a shapely (Multi)Polygon without holes."""
    parts = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
    out = []
    for p in parts:
        if p.area < 4:
            continue
        coords = np.asarray(p.exterior.coords)[:-1]
        if len(coords) >= 3:
            out.append([round(float(v), 2) for v in coords.reshape(-1)])
    return out


def _make_image(rng: np.random.Generator, spec: ShapesSpec):
    """One image: (H W 3 uint8 canvas, COCO annotations without ids, H W uint8 map of the class
    id each pixel was painted with, 0 where the background shows)."""
    size = spec["image_size"]
    canvas = _background(rng, size)
    frame = Polygon([(0, 0), (size, 0), (size, size), (0, size)])
    placed = []  # dicts with full polygon, visible geometry and class
    target = int(rng.integers(spec["min_objects"], spec["max_objects"] + 1))
    for _ in range(target * 10):
        if len(placed) == target:
            break
        kind = int(rng.integers(len(SHAPE_CLASSES)))
        s = float(math.exp(rng.uniform(math.log(spec["min_size"]), math.log(spec["max_size"]))))
        cx, cy = rng.uniform(s * 0.45, size - s * 0.45, 2)
        pts = make_shape_polygon(SHAPE_CLASSES[kind], cx, cy, s, rng.uniform(0, 2 * math.pi))
        poly = Polygon(pts).buffer(0).intersection(frame)
        if poly.is_empty or poly.area < 0.9 * Polygon(pts).area:
            continue  # partly outside the image
        ok = True
        new_visible = []
        for obj in placed:
            vis = obj["visible"].difference(poly)
            parts = vis.geoms if isinstance(vis, MultiPolygon) else [vis]
            # keep occluded instances recognisable and representable by COCO polygons
            if vis.is_empty or vis.area < 0.65 * obj["area"] or any(len(p.interiors) for p in parts if not p.is_empty):
                ok = False
                break
            new_visible.append(vis)
        if not ok:
            continue
        for obj, vis in zip(placed, new_visible):
            obj["visible"] = vis
        placed.append(dict(kind=kind, pts=pts, visible=poly, area=poly.area))
    painted = np.zeros((size, size), np.uint8)
    for obj in placed:
        tex = _texture(rng, size, size)
        m = Image.new("L", (size, size), 0)
        ImageDraw.Draw(m).polygon([tuple(p) for p in obj["pts"]], fill=255)
        sel = np.asarray(m) > 0
        canvas[sel] = tex[sel]
        painted[sel] = obj["kind"] + 1
    anns = []
    for obj in placed:
        polys = _polygons_of(obj["visible"])
        if not polys:
            continue
        x0, y0, x1, y1 = obj["visible"].bounds
        anns.append(
            dict(
                category_id=obj["kind"] + 1,
                segmentation=polys,
                area=float(obj["visible"].area),
                bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                iscrowd=0,
            )
        )
    return canvas, anns, painted


def _draw_split(spec: ShapesSpec, split: str):
    """Yield ``_make_image`` of each image of a split, in order: the split's own random stream
    (two seeds drawn from the spec's seed), so a split can be drawn again on its own."""
    seeds = np.random.default_rng(spec["seed"]).integers(0, 2**31, 2)
    rng = np.random.default_rng(int(seeds[("train", "val").index(split)]))
    for _ in range(spec[f"num_{split}"]):
        yield _make_image(rng, spec)


def _json_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


def shapes_dataset_ready(root: str, spec: Optional[ShapesSpec] = None) -> bool:
    """True if ``root`` holds a complete dataset written with ``spec``."""
    spec = spec or ShapesSpec()
    for split in ("train", "val"):
        path = _json_path(root, split)
        if not os.path.isfile(path):
            return False
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        if data.get("info", {}).get("spec") != dict(spec):
            return False
        if any(not os.path.isfile(os.path.join(root, split, im["file_name"])) for im in data["images"]):
            return False
    return True


def generate_shapes_dataset(root: str, spec: Optional[ShapesSpec] = None, force: bool = False) -> Dict[str, str]:
    """Write the dataset under ``root`` unless an identical one is there already.

    The dataset is written into a temporary folder beside ``root`` and moved into place only
    when complete, so an interrupted run never leaves a half-written dataset behind.
    Returns ``{"train": json, "val": json, "root": root}``.
    """
    spec = spec or ShapesSpec()
    root = os.path.abspath(root)
    if force or not shapes_dataset_ready(root, spec):
        logger.info(f"writing the shapes dataset ({spec['num_train']} train, {spec['num_val']} val images of "
                    f"{spec['image_size']} px) to {root} ...")
        t0 = time.time()
        parent = os.path.dirname(root)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".shapes-", dir=parent)
        try:
            for split in ("train", "val"):
                os.makedirs(os.path.join(tmp, split))
                os.makedirs(_sem_seg_dir(tmp, split))
                images, annotations = [], []
                for i, (img, anns, painted) in enumerate(_draw_split(spec, split)):
                    name = f"{i:06d}.png"
                    Image.fromarray(img).save(os.path.join(tmp, split, name))
                    Image.fromarray(semantic_label_map(painted, anns)).save(os.path.join(_sem_seg_dir(tmp, split), name))
                    images.append(dict(id=i + 1, file_name=name, height=img.shape[0], width=img.shape[1]))
                    for a in anns:
                        a.update(id=len(annotations) + 1, image_id=i + 1)
                        annotations.append(a)
                data = dict(
                    info=dict(description="convmae-det generated shapes", spec=dict(spec)),
                    images=images,
                    annotations=annotations,
                    categories=[dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(SHAPE_CLASSES)],
                )
                os.makedirs(os.path.join(tmp, "annotations"), exist_ok=True)
                with open(_json_path(tmp, split), "w") as f:
                    json.dump(data, f)
                _write_sem_seg_marker(tmp, split)
            _replace_folder(tmp, root)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info(f"wrote the shapes dataset to {root} in {time.time() - t0:.0f} s")
    return {"train": _json_path(root, "train"), "val": _json_path(root, "val"), "root": root}


def _replace_folder(tmp: str, dst: str) -> None:
    """Move the complete folder ``tmp`` to ``dst``, replacing what was there."""
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def write_labeled_subset(root: str, num_images: int) -> str:
    """Write ``annotations/instances_train_{num_images}.json``: the first ``num_images`` images
    of the training split with their annotations (a small labeled set; the images stay in
    ``train/``). Deterministic; rewritten only when missing or stale. Returns the json path."""
    src = _json_path(root, "train")
    with open(src) as f:
        data = json.load(f)
    if not 0 < num_images <= len(data["images"]):
        raise ValueError(f"a labeled subset of {num_images} images: the training split {src} has {len(data['images'])}")
    images = data["images"][:num_images]
    keep = {im["id"] for im in images}
    subset = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    subset["info"] = dict(data["info"], subset_of="train", num_images=num_images)
    path = _json_path(root, f"train_{num_images}")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                if json.load(f) == subset:
                    return path
        except (OSError, ValueError):
            pass
    with atomic_write(path) as f:
        json.dump(subset, f)
    return path


def generate_shapes_pool(root: str, num_images: int, spec: Optional[ShapesSpec] = None, force: bool = False) -> str:
    """Write ``num_images`` unlabeled shapes images under ``root/pool`` for pretraining, unless
    the same pool is there. The images come from the random stream (spec seed, "pool"), apart
    from those of train and val. Written to a temporary folder and moved into place when
    complete. Returns the pool folder."""
    spec = spec or ShapesSpec()
    if num_images <= 0:
        raise ValueError(f"the unlabeled pool needs at least one image, got {num_images}")
    pool = os.path.join(os.path.abspath(root), "pool")
    want = dict(spec, num_pool=num_images)
    marker = os.path.join(pool, "spec.json")
    if not force and os.path.isfile(marker):
        try:
            with open(marker) as f:
                if json.load(f) == want and len(os.listdir(pool)) == num_images + 1:
                    return pool
        except (OSError, ValueError):
            pass
    logger.info(f"writing {num_images} unlabeled shapes images to {pool} ...")
    t0 = time.time()
    os.makedirs(os.path.dirname(pool), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pool-", dir=os.path.dirname(pool))
    try:
        rng = np.random.default_rng([spec["seed"], int.from_bytes(b"pool", "little")])
        for i in range(num_images):
            img, _, _ = _make_image(rng, spec)
            Image.fromarray(img).save(os.path.join(tmp, f"{i:06d}.png"))
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(want, f)
        _replace_folder(tmp, pool)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"wrote the unlabeled pool to {pool} in {time.time() - t0:.0f} s")
    return pool



def _rasterize(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """H W bool mask of COCO polygons, filled by PIL as the generator paints the shapes."""
    m = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(m)
    for p in polygons:
        if len(p) >= 6:
            draw.polygon([(float(x), float(y)) for x, y in zip(p[0::2], p[1::2])], fill=1)
    return np.asarray(m).astype(bool)


def semantic_label_map(painted: np.ndarray, annotations: Sequence[dict]) -> np.ndarray:
    """H W uint8 semantic labels of one image: the class each pixel was painted with (0 where
    the background shows, 1-5 the shapes, exact: the generator paints without anti-aliasing),
    and :data:`SEM_SEG_IGNORE` (255) where the image's instance annotations say otherwise.

    The instance masks are polygons of the visible parts, cut with shapely and stored rounded,
    and PIL snaps their vertices to the pixel grid and fills them edges included. So along
    object borders some pixels fall on the other side of a polygon than in the painting, and
    the shared edge of two touching visible parts is covered by both polygons. Those pixels,
    and those of shapes too small to keep an instance polygon (visible area under 4 px), are
    ignored: no pixel is scored against a label that one of the dataset's two ground truths
    contradicts. On the built-in val split that is 0.15% of the pixels, 99.5% of them within
    one pixel of a painted border, two thirds of them shared edges.
    """
    h, w = painted.shape
    annotated = np.zeros((h, w), np.int64)  # category of the annotation covering the pixel; -1: two differ
    for a in annotations:
        cat = int(a["category_id"])
        if not 0 < cat < SEM_SEG_IGNORE:
            raise ValueError(f"annotation {a.get('id')}: category_id {cat} does not fit a uint8 label map with 255 ignored")
        m = _rasterize(a["segmentation"], h, w)
        annotated[m & (annotated != 0) & (annotated != cat)] = -1
        annotated[m & (annotated == 0)] = cat
    labels = painted.astype(np.uint8, copy=True)
    labels[annotated != painted] = SEM_SEG_IGNORE
    return labels


def _sem_seg_dir(root: str, split: str) -> str:
    return os.path.join(root, "sem_seg", split)


def _sem_seg_marker(root: str, split: str) -> dict:
    """What the labels of a split derive from: the labelling rule and the annotation file."""
    with open(_json_path(root, split), "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
    return dict(version=SEM_SEG_VERSION, ignore_label=SEM_SEG_IGNORE, classes=SEM_SEG_CLASSES, instances_sha1=digest)


def _write_sem_seg_marker(root: str, split: str) -> None:
    with open(os.path.join(_sem_seg_dir(root, split), "labels.json"), "w") as f:
        json.dump(_sem_seg_marker(root, split), f)


def sem_seg_labels_ready(root: str, split: str) -> bool:
    """True if ``root/sem_seg/split`` holds a label PNG for every image of the split, written
    by the current rule for the current annotation file."""
    folder = _sem_seg_dir(root, split)
    try:
        with open(os.path.join(folder, "labels.json")) as f:
            info = json.load(f)
        with open(_json_path(root, split)) as f:
            images = json.load(f)["images"]
        if info != _sem_seg_marker(root, split):
            return False
    except (OSError, ValueError):
        return False
    return all(os.path.isfile(os.path.join(folder, im["file_name"])) for im in images)


def write_sem_seg_labels(root: str, split: str, force: bool = False) -> str:
    """Write the label PNGs ``root/sem_seg/split/<image>.png`` of a dataset written earlier
    (datasets written now get them with the images), unless they are there and current.

    The painting is not stored, so the split is drawn again from the spec in its annotation
    file; every image drawn must equal the one on disk (else an error: the dataset was written
    by another generator or library version, and ``tools/make_shapes_dataset.py --force``
    rewrites it). Only ``root/sem_seg/split`` is written, via a temporary folder moved into
    place when complete; the images and annotation files are read, never changed.
    Returns the folder."""
    json_file = _json_path(root, split)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"no annotation file {json_file} to derive semantic labels from")
    folder = _sem_seg_dir(root, split)
    if not force and sem_seg_labels_ready(root, split):
        return folder
    with open(json_file) as f:
        data = json.load(f)
    saved = dict(data.get("info", {}).get("spec") or {})
    if saved.pop("version", None) != FORMAT_VERSION:
        raise ValueError(f"{json_file} was not written by this generator (format {FORMAT_VERSION}): rewrite the dataset")
    spec = ShapesSpec(**saved)
    if len(data["images"]) != spec[f"num_{split}"]:
        raise ValueError(f"{json_file} lists {len(data['images'])} images, its spec {spec[f'num_{split}']}")
    by_image: Dict[int, List[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{split}-", dir=os.path.dirname(folder))
    try:
        for im, (img, _, painted) in zip(data["images"], _draw_split(spec, split)):
            path = os.path.join(root, split, im["file_name"])
            if not np.array_equal(np.asarray(Image.open(path).convert("RGB")), img):
                raise RuntimeError(
                    f"{path} is not the image the generator draws for the spec of {json_file}: the dataset was "
                    "written by another version of the generator or its libraries; rewrite it with "
                    "python tools/make_shapes_dataset.py --force"
                )
            Image.fromarray(semantic_label_map(painted, by_image.get(im["id"], []))).save(os.path.join(tmp, im["file_name"]))
        with open(os.path.join(tmp, "labels.json"), "w") as f:
            json.dump(_sem_seg_marker(root, split), f)
        _replace_folder(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
