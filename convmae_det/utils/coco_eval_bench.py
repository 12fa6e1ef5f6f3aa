"""The fast COCOeval against pycocotools: the same stats, in less time (tools/coco_eval_bench.py).

Both run through this project's :class:`~convmae_det.evaluation.COCOEvaluator` (detectron2's,
with the COCOeval of ``backend``), on COCO-format ground truth and results made here:

- :func:`synthetic_coco_gt`: a COCO-like val set (default 5000 images of 640x480 or 480x640,
  80 classes with COCO's category ids and an uneven class frequency, Poisson(7.3) objects an
  image, sizes from small to large, polygon masks, about 1% crowd regions as uncompressed RLE);
- :func:`noisy_results`: about ``dets_per_image`` detections an image, as detectron2's
  COCOEvaluator makes them (contiguous class ids, float32 scores, xywh boxes, compressed RLE
  masks): jittered copies of the ground truth (IoU from ~0.3 to ~1), confusions with another
  class and false positives, with overlapping score distributions. Also used on the built-in
  shapes val set (tests/test_evaluation.py).

:func:`compare_backends` evaluates each task with each backend (one run each, same process,
same inputs), and returns the times, their ratio and the largest difference of the 12 COCO
stats and of detectron2's results dict; :func:`run` prints them and fails if a stat differs by
more than ``tol``.
"""
import contextlib
import importlib.metadata
import io
import json
import os
import tempfile
import time
from itertools import groupby
from typing import Dict, List, Sequence

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..evaluation import COCOEvaluator, resolve_coco_eval_backend
from .fileio import atomic_write
from .profiling import machine

__all__ = [
    "COCO_CATEGORY_IDS",
    "compare_backends",
    "evaluate_results",
    "noisy_results",
    "register_coco_json",
    "run",
    "synthetic_coco_gt",
]


# COCO's 80 category ids (1..90 with gaps), so that detectron2 maps contiguous ids back
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def _ellipse_polygon(rng, x0, y0, w, h, k):
    """A star-shaped polygon (flat x, y list) of ``k`` vertices with radial noise in a box."""
    t = np.sort(rng.uniform(0, 2 * np.pi, k))
    r = rng.uniform(0.7, 1.0, k)
    x = x0 + w / 2 * (1 + r * np.cos(t))
    y = y0 + h / 2 * (1 + r * np.sin(t))
    return np.stack([x, y], 1).reshape(-1)


def _uncompressed_rle(mask: np.ndarray) -> List[int]:
    """Run lengths (column-major, starting with zeros) of a binary mask: COCO's crowd format."""
    flat = np.asfortranarray(mask).reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0] + runs


def synthetic_coco_gt(num_images: int = 5000, num_classes: int = 80, seed: int = 0, objects_per_image: float = 7.3) -> dict:
    """A COCO-format ground-truth dict shaped like COCO val (see the module docstring)."""
    if not 1 <= num_classes <= len(COCO_CATEGORY_IDS):
        raise ValueError(f"num_classes must be in 1..{len(COCO_CATEGORY_IDS)}, got {num_classes}")
    rng = np.random.default_rng(seed)
    cat_ids = COCO_CATEGORY_IDS[:num_classes]
    freq = 1.0 / np.arange(1, num_classes + 1) ** 0.8
    freq = rng.permutation(freq / freq.sum())
    images, anns = [], []
    for i in range(num_images):
        h, w = (480, 640) if rng.random() < 0.7 else (640, 480)
        images.append(dict(id=i + 1, file_name=f"{i + 1:012d}.jpg", height=h, width=w))
        for _ in range(min(int(rng.poisson(objects_per_image)), 60)):
            side = float(np.exp(rng.uniform(np.log(6), np.log(450))))
            aspect = float(np.exp(rng.normal(0, 0.5)))
            bw, bh = min(side * aspect ** 0.5, w - 1), min(side / aspect ** 0.5, h - 1)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            poly = _ellipse_polygon(rng, x0, y0, bw, bh, int(rng.integers(8, 21)))
            rle = mask_util.frPyObjects([poly.tolist()], h, w)[0]
            area = float(mask_util.area(rle))
            if area < 1:
                continue
            crowd = rng.random() < 0.01
            seg = {"size": [h, w], "counts": _uncompressed_rle(mask_util.decode(rle))} if crowd else [poly.round(2).tolist()]
            bx, by, bw2, bh2 = mask_util.toBbox(rle).tolist()
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(cat_ids[rng.choice(num_classes, p=freq)]),
                             segmentation=seg, area=area, bbox=[bx, by, bw2, bh2], iscrowd=int(crowd)))
    cats = [dict(id=c, name=f"class_{c}") for c in cat_ids]
    return dict(info=dict(description="convmae-det synthetic COCO-like val set"), images=images, annotations=anns, categories=cats)


def _gt_polygon(ann, rng) -> np.ndarray:
    """The ground truth's outline as a flat polygon (a crowd region: an ellipse in its box)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return np.asarray(max(seg, key=len), dtype=np.float64)
    x, y, w, h = ann["bbox"]
    return _ellipse_polygon(rng, x, y, w, h, 12)


def noisy_results(gt: dict, dets_per_image: int = 100, seed: int = 0) -> List[dict]:
    """detectron2-style COCO results for the ground truth ``gt`` (a COCO-format dict): per
    image up to ``dets_per_image`` detections (see the module docstring). ``category_id`` is
    the contiguous id (0-based, in the order of ``gt["categories"]``), as detectron2's
    COCOEvaluator receives it from a model."""
    rng = np.random.default_rng(seed)
    contiguous = {c["id"]: i for i, c in enumerate(gt["categories"])}
    num_classes = len(contiguous)
    by_image = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        if a["image_id"] in by_image:
            by_image[a["image_id"]].append(a)
    results = []
    for im in gt["images"]:
        h, w = im["height"], im["width"]
        polys, boxes, classes, scores = [], [], [], []
        for a in by_image[im["id"]]:
            base = _gt_polygon(a, rng)
            x, y, bw, bh = a["bbox"]
            for _ in range(int(rng.integers(1, 4))):
                s = rng.uniform(0.02, 0.3)  # jitter relative to the object's size
                dx, dy = rng.normal(0, s * bw), rng.normal(0, s * bh)
                scale = np.exp(rng.normal(0, s, 2))
                cx, cy = x + bw / 2, y + bh / 2
                p = base.reshape(-1, 2)
                p = np.stack([(p[:, 0] - cx) * scale[0] + cx + dx, (p[:, 1] - cy) * scale[1] + cy + dy], 1)
                polys.append(p.reshape(-1))
                box = np.array([x, y, x + bw, y + bh]) + rng.normal(0, s, 4) * [bw, bh, bw, bh] + [dx, dy, dx, dy]
                boxes.append(box)
                confused = rng.random() < 0.1
                classes.append(int(rng.integers(num_classes)) if confused else contiguous[a["category_id"]])
                scores.append(rng.beta(5, 2) * (1 - s))
        seen = sorted({c for c in classes}) or [0]
        likely = np.concatenate([seen, rng.integers(num_classes, size=8)])
        while len(polys) < dets_per_image:  # false positives: mostly classes of the image
            side = float(np.exp(rng.uniform(np.log(6), np.log(400))))
            bw, bh = min(side, w - 1), min(side * np.exp(rng.normal(0, 0.4)), h - 1)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            polys.append(_ellipse_polygon(rng, x0, y0, bw, bh, 12))
            boxes.append(np.array([x0, y0, x0 + bw, y0 + bh]))
            classes.append(int(rng.choice(likely)))
            scores.append(rng.beta(2, 5))
        keep = np.argsort(-np.asarray(scores), kind="stable")[:dets_per_image]
        rles = mask_util.frPyObjects([polys[k].tolist() for k in keep], h, w)
        for k, rle in zip(keep, rles):
            x0, y0, x1, y1 = np.clip(boxes[k], 0, [w, h, w, h])
            rle["counts"] = rle["counts"].decode("utf-8")
            results.append(dict(image_id=im["id"], category_id=classes[k], bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                score=float(np.float32(scores[k])), segmentation=rle))
    return results


def register_coco_json(name: str, json_file: str, image_root: str = "") -> None:
    """(Re-)register a COCO-format json as a detectron2 dataset, with its contiguous-id
    mapping set up front (so that results carry contiguous ids, as a model's do)."""
    with open(json_file) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco",
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
    )


def _timed(cls, clock: list):
    """``cls`` whose evaluate, accumulate and summarize add their seconds to ``clock[0]``."""

    class Timed(cls):
        pass

    for name in ("evaluate", "accumulate", "summarize"):
        def timed(self, *args, _f=getattr(cls, name), **kwargs):
            t = time.perf_counter()
            try:
                return _f(self, *args, **kwargs)
            finally:
                clock[0] += time.perf_counter() - t

        setattr(Timed, name, timed)
    Timed.__module__, Timed.__qualname__ = cls.__module__, cls.__qualname__
    return Timed


@contextlib.contextmanager
def _clocked_cocoeval(ev: COCOEvaluator, clock: list):
    """Time the COCOeval calls of one evaluation of ``ev`` (whichever class it uses)."""
    from detectron2.evaluation import coco_evaluation as m

    saved = m.COCOeval, m.COCOeval_opt
    m.COCOeval, m.COCOeval_opt = _timed(m.COCOeval, clock), _timed(m.COCOeval_opt, clock)
    if ev.backend == "faster_coco_eval":
        ev._cocoeval_cls = _timed(ev._cocoeval_cls, clock)
    try:
        yield
    finally:
        m.COCOeval, m.COCOeval_opt = saved


def evaluate_results(dataset_name: str, results: Sequence[dict], backend: str, tasks=("bbox", "segm")):
    """Evaluate COCO results (contiguous ids) on a registered dataset with detectron2's
    COCOEvaluator and the COCOeval of ``backend``. Returns detectron2's results dict,
    {task: the 12 COCO stats}, {task: seconds of the evaluator's whole evaluation (loading the
    results, COCOeval, the per-class table)} and {task: seconds in COCOeval's evaluate,
    accumulate and summarize}."""
    out, stats, seconds, cocoeval_seconds = {}, {}, {}, {}
    for task in tasks:
        ev = COCOEvaluator(dataset_name, tasks=(task,), distributed=False, output_dir=None, backend=backend)
        ev.reset()
        # detectron2 maps the class ids in place: each run gets its own (shallow) copies
        ev._predictions = [{"image_id": i, "instances": [dict(r) for r in g]} for i, g in groupby(results, key=lambda r: r["image_id"])]
        clock = [0.0]
        # COCOeval prints its summary
        with _clocked_cocoeval(ev, clock), contextlib.redirect_stdout(io.StringIO()):
            t = time.perf_counter()
            out.update(ev.evaluate())
            seconds[task] = time.perf_counter() - t
        cocoeval_seconds[task] = clock[0]
        stats[task] = ev.coco_stats[task]
    return out, stats, seconds, cocoeval_seconds


def _max_diff(a: Dict[str, Dict[str, float]], b: Dict[str, Dict[str, float]]) -> float:
    """Largest |a - b| over detectron2's results dicts (percent), NaN equal to NaN."""
    assert a.keys() == b.keys() and all(a[t].keys() == b[t].keys() for t in a), (a.keys(), b.keys())
    x = np.array([a[t][k] for t in a for k in a[t]], dtype=np.float64)
    y = np.array([b[t][k] for t in a for k in a[t]], dtype=np.float64)
    both_nan = np.isnan(x) & np.isnan(y)
    return float(np.max(np.where(both_nan, 0.0, np.abs(x - y)), initial=0.0))


def compare_backends(dataset_name: str, results: Sequence[dict], fast: str = "faster_coco_eval", tasks=("bbox", "segm")) -> dict:
    """pycocotools and the ``fast`` backend on the same results, one run each per task.

    Returns per task: both times, pycocotools' over the fast one's, the largest difference of
    the 12 stats (fraction) and of detectron2's results dict (percent, per-class AP included),
    and both stats."""
    rows = {}
    for task in tasks:
        ref, ref_stats, ref_t, ref_c = evaluate_results(dataset_name, results, "pycocotools", (task,))
        got, got_stats, got_t, got_c = evaluate_results(dataset_name, results, fast, (task,))
        a, b = np.asarray(ref_stats[task][:12]), np.asarray(got_stats[task][:12])
        rows[task] = dict(
            pycocotools_s=ref_t[task], fast_s=got_t[task], ratio=ref_t[task] / got_t[task],
            cocoeval_pycocotools_s=ref_c[task], cocoeval_fast_s=got_c[task], cocoeval_ratio=ref_c[task] / got_c[task],
            max_stat_diff=float(np.max(np.abs(a - b))), max_results_diff=_max_diff(ref, got),
            stats_pycocotools=a.tolist(), stats_fast=b.tolist(),
        )
    return rows


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(num_images: int = 5000, num_classes: int = 80, dets_per_image: int = 100, seed: int = 0, tol: float = 1e-4,
        fast: str = "faster_coco_eval", out: str = "") -> dict:
    """Make the synthetic case, compare the backends, print a table; raise if a stat differs
    by more than ``tol`` (or a results-dict value by more than 100 * tol, it is in percent)."""
    fast = resolve_coco_eval_backend(fast)
    t = time.perf_counter()
    gt = synthetic_coco_gt(num_images, num_classes, seed)
    results = noisy_results(gt, dets_per_image, seed + 1)
    made_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        json_file = os.path.join(tmp, "instances_synthetic.json")
        with open(json_file, "w") as f:
            json.dump(gt, f)
        register_coco_json("convmae_coco_eval_bench", json_file)
        try:
            rows = compare_backends("convmae_coco_eval_bench", results, fast)
        finally:
            DatasetCatalog.remove("convmae_coco_eval_bench")
            MetadataCatalog.remove("convmae_coco_eval_bench")
    info = machine()
    summary = dict(
        case=dict(images=num_images, classes=num_classes, annotations=len(gt["annotations"]), detections=len(results),
                  crowd=sum(a["iscrowd"] for a in gt["annotations"]), seed=seed, made_s=made_s),
        fast=fast, faster_coco_eval=_version("faster_coco_eval"), pycocotools=_version("pycocotools"),
        machine=f"{info.get('cpu')}, {info['cpu_count']} CPUs", tasks=rows,
    )
    total = {k: sum(r[k] for r in rows.values()) for k in ("pycocotools_s", "fast_s", "cocoeval_pycocotools_s", "cocoeval_fast_s")}
    total.update(ratio=total["pycocotools_s"] / total["fast_s"], cocoeval_ratio=total["cocoeval_pycocotools_s"] / total["cocoeval_fast_s"])
    summary["total"] = total
    c = summary["case"]
    print(f"{c['images']} images, {c['classes']} classes, {c['annotations']} ground-truth objects ({c['crowd']} crowd), "
          f"{c['detections']} detections (made in {made_s:.0f} s); {summary['machine']}")
    print(f"seconds: the whole COCOEvaluator evaluation, and within it COCOeval (evaluate + accumulate + summarize); "
          f"pycocotools against {fast}")
    print(f"{'task':<6} {'evaluator':>10} {'fast':>8} {'ratio':>7}   {'COCOeval':>9} {'fast':>8} {'ratio':>7}   "
          f"{'max|d stat|':>11} {'max|d AP%|':>10}")
    for task, r in list(rows.items()) + [("both", dict(total, max_stat_diff=None))]:
        line = (f"{task:<6} {r['pycocotools_s']:>10.2f} {r['fast_s']:>8.2f} {r['ratio']:>6.2f}x   "
                f"{r['cocoeval_pycocotools_s']:>9.2f} {r['cocoeval_fast_s']:>8.2f} {r['cocoeval_ratio']:>6.2f}x")
        if r["max_stat_diff"] is not None:
            line += f"   {r['max_stat_diff']:>11.2e} {r['max_results_diff']:>10.2e}"
        print(line)
    if out:
        with atomic_write(out) as f:
            json.dump(summary, f, indent=1)
    bad = [t for t, r in rows.items() if r["max_stat_diff"] > tol or r["max_results_diff"] > 100 * tol]
    if bad:
        raise AssertionError(f"{fast} differs from pycocotools by more than {tol} on {bad}: {rows}")
    print(f"equal within {tol} on all 12 stats of {', '.join(rows)} (and on detectron2's results dict)")
    return summary
