"""TEST.FAST_COCO_EVAL: faster-coco-eval gives pycocotools' COCO stats through detectron2's
COCOEvaluator, on the built-in shapes val set and on a synthetic COCO-like case.

The COCO-sized case (5000 images, 80 classes, ~100 detections an image) takes minutes on two
cores; it is ``python tools/coco_eval_bench.py`` (numbers in MODEL_ZOO.md). Here the same
generator runs on 150 images.
"""
import json

import numpy as np
import pytest

from convmae_det.data import ShapesSpec, generate_shapes_dataset
from convmae_det.evaluation import COCOEvaluator, has_faster_coco_eval, resolve_coco_eval_backend
from convmae_det.utils.coco_eval_bench import (
    compare_backends, noisy_results, register_coco_json, synthetic_coco_gt,
)
from convmae_det.utils.compat import MissingCompiledOpError, has_compiled_ops
from conftest import tiny_cfg

TOL = 1e-4  # on every COCO stat (fraction); detectron2's results dict is in percent: 100 * TOL

needs_faster = pytest.mark.skipif(not has_faster_coco_eval(), reason="faster-coco-eval is not installed")


def assert_equal_to_pycocotools(rows, tasks=("bbox", "segm")):
    assert set(rows) == set(tasks)
    for task, r in rows.items():
        assert len(r["stats_pycocotools"]) == len(r["stats_fast"]) == 12
        assert r["max_stat_diff"] <= TOL, (task, r)
        assert r["max_results_diff"] <= 100 * TOL, (task, r)


@pytest.fixture(scope="module")
def shapes_val():
    """The built-in val set: generate_shapes_dataset draws each split from its own seed, so
    ShapesSpec() with no training images writes the same 300 val images and annotations."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = generate_shapes_dataset(tmp + "/shapes", ShapesSpec(num_train=0))
        register_coco_json("test_eval_shapes_val", d["val"])
        with open(d["val"]) as f:
            yield json.load(f)


def test_fast_coco_eval_values_resolve_and_fail_clearly():
    assert resolve_coco_eval_backend("false") == resolve_coco_eval_backend(False) == "pycocotools"
    assert resolve_coco_eval_backend("pycocotools") == "pycocotools"
    expected = "compiled" if has_compiled_ops() else "faster_coco_eval" if has_faster_coco_eval() else "pycocotools"
    assert resolve_coco_eval_backend("auto") == expected
    if expected != "pycocotools":
        assert resolve_coco_eval_backend(True) == expected
    with pytest.raises(ValueError, match="TEST.FAST_COCO_EVAL = 'fastest'"):
        tiny_cfg("TEST.FAST_COCO_EVAL", "fastest")
    if not has_compiled_ops():
        with pytest.raises(MissingCompiledOpError, match="COCOevalEvaluateImages"):
            tiny_cfg("TEST.FAST_COCO_EVAL", "compiled")


@needs_faster
def test_trainer_evaluator_uses_faster_coco_eval_without_compiled_ops(shapes_val, tmp_path):
    from detectron2.evaluation import coco_evaluation

    from convmae_det.engine import Trainer

    cfg = tiny_cfg("TEST.FAST_COCO_EVAL", "faster_coco_eval" if has_compiled_ops() else "auto", "OUTPUT_DIR", str(tmp_path))
    ev = Trainer.build_evaluator(cfg, "test_eval_shapes_val")
    assert isinstance(ev, COCOEvaluator) and ev.backend == "faster_coco_eval"
    original = coco_evaluation.COCOeval_opt
    ev.reset()
    ev._predictions = [{"image_id": 1, "instances": noisy_results(dict(shapes_val, images=shapes_val["images"][:1]), 5)}]
    res = ev.evaluate()
    assert set(res) == {"bbox", "segm"} and set(res["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(v.startswith("faster_coco_eval.") for v in ev.cocoeval_used.values()), ev.cocoeval_used
    assert coco_evaluation.COCOeval_opt is original  # detectron2's module is left as it was


@needs_faster
def test_faster_coco_eval_equals_pycocotools_on_the_builtin_val_set(shapes_val):
    assert len(shapes_val["images"]) == 300
    results = noisy_results(shapes_val, dets_per_image=20, seed=3)
    rows = compare_backends("test_eval_shapes_val", results)
    assert_equal_to_pycocotools(rows)
    # a case where precision and recall vary: neither perfect nor empty
    for r in rows.values():
        assert 0.1 < r["stats_pycocotools"][0] < 0.9 and 0.2 < r["stats_pycocotools"][8] < 1.0, r


@needs_faster
def test_faster_coco_eval_equals_pycocotools_on_a_coco_like_case(tmp_path):
    gt = synthetic_coco_gt(num_images=150, num_classes=80, seed=1)
    assert sum(a["iscrowd"] for a in gt["annotations"]) > 0
    results = noisy_results(gt, dets_per_image=100, seed=2)
    assert len(results) == 150 * 100
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(gt))
    register_coco_json("test_eval_coco_like", str(json_file))
    rows = compare_backends("test_eval_coco_like", results)
    assert_equal_to_pycocotools(rows)
    for r in rows.values():
        s = np.asarray(r["stats_pycocotools"])
        assert np.all(s[[0, 3, 4, 5]] > 0.05) and np.all(s < 1), s  # small, medium and large objects all count
