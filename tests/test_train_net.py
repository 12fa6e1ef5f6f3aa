"""tools/train_net.py end to end on a tiny generated dataset: train, resume, evaluate."""
import os
import subprocess
import sys

import pytest

from convmae_det.data import ShapesSpec, generate_shapes_dataset
from conftest import ROOT, TINY, tool


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    spec = ShapesSpec(num_train=8, num_val=4, image_size=128, seed=5)
    return generate_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), spec)


def run_train_net(dataset, out, *extra, opts=()):
    cmd = [
        sys.executable, tool("train_net.py"), "--config-file", TINY,
        "--register", "t_train", dataset["train"], os.path.join(dataset["root"], "train"),
        "--register", "t_val", dataset["val"], os.path.join(dataset["root"], "val"),
        *extra,
        "DATASETS.TRAIN", "('t_train',)", "DATASETS.TEST", "('t_val',)", "OUTPUT_DIR", str(out),
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "TEST.VIS_NUM_IMAGES", "2",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", *opts,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def copypaste_results(log):
    """{task: {metric: value}} from the `copypaste:` lines detectron2 logs after an evaluation."""
    lines = [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]
    return {
        line[len("Task: "):]: dict(zip(lines[i + 1].split(","), map(float, lines[i + 2].split(","))))
        for i, line in enumerate(lines) if line.startswith("Task: ")
    }


def assert_box_and_mask_ap(log):
    res = copypaste_results(log)
    assert set(res) == {"bbox", "segm"}, log[-3000:]
    assert all(0 <= res[t]["AP"] <= 100 and 0 <= res[t]["AP50"] <= 100 for t in res), res


# detectron2's COCOEvaluator evaluates the tasks it finds in the predictions: when a model of a
# few iterations scores no box above SCORE_THRESH_TEST (0.05), it evaluates bbox alone, with no
# segm line (where that happens depends on the random stream, which differs between detectron2
# v0.6 and main). A threshold of 0 keeps every box, so both tasks are always evaluated.
EVERY_BOX = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def test_train_resume_and_evaluate(dataset, tmp_path):
    out = tmp_path / "run"
    log = run_train_net(dataset, out, opts=["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2", *EVERY_BOX])
    assert "Starting training from iteration 0" in log
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").read_text() == "model_final.pth"
    assert_box_and_mask_ap(log)
    assert len(list((out / "vis").glob("*.png"))) == 2
    text = (out / "log.txt").read_text()  # detectron2's log and convmae_det's, in one file
    assert "Starting training from iteration 0" in text and f"wrote 2 prediction images of t_val to {out / 'vis'}" in text

    log = run_train_net(dataset, out, "--resume", opts=["SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "2"])
    assert "Starting training from iteration 3" in log, log[-2000:]

    log = run_train_net(dataset, out, "--eval-only", opts=["MODEL.WEIGHTS", str(out / "model_final.pth"), *EVERY_BOX])
    assert_box_and_mask_ap(log)
    assert "Starting training" not in log


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    cmd = [sys.executable, tool("train_net.py"), "--config-file", TINY,
           "--register", "x", str(tmp_path / "nope.json"), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "nope.json" in r.stderr and "does not exist" in r.stderr


def test_checkpoint_max_to_keep_bounds_periodic_checkpoints_across_resume(dataset, tmp_path):
    out = tmp_path / "run"
    opts = ["SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.CHECKPOINT_MAX_TO_KEEP", "2", "TEST.EVAL_PERIOD", "0"]
    run_train_net(dataset, out, opts=["SOLVER.MAX_ITER", "4", *opts, "DATASETS.TEST", "()"])
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000002.pth", "model_0000003.pth", "model_final.pth"]
    log = run_train_net(dataset, out, "--resume", opts=["SOLVER.MAX_ITER", "6", *opts, "DATASETS.TEST", "()"])
    assert "Starting training from iteration 4" in log
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000004.pth", "model_0000005.pth", "model_final.pth"]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


TINY_LAZY = os.path.splitext(TINY)[0] + ".py"


def run_lazy_train_net(dataset, out, *extra, opts=()):
    """tools/train_net.py on the LazyConfig twin of the tiny config: key=value overrides."""
    cmd = [
        sys.executable, tool("train_net.py"), "--config-file", TINY_LAZY,
        "--register", "t_train", dataset["train"], os.path.join(dataset["root"], "train"),
        "--register", "t_val", dataset["val"], os.path.join(dataset["root"], "val"),
        *extra,
        "dataloader.train.dataset.names=t_train", "dataloader.test.dataset.names=t_val", f"train.output_dir={out}",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "train.vis.num_images=2",
        "model.roi_heads.box_predictor.test_score_thresh=0.0", *opts,  # EVERY_BOX
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_lazy_config_trains_resumes_and_evaluates(dataset, tmp_path):
    out = tmp_path / "run"
    log = run_lazy_train_net(dataset, out, opts=["train.max_iter=20", "train.checkpointer.period=10"])
    assert "Starting training from iteration 0" in log and "iter: 19" in log
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000009.pth", "model_0000019.pth", "model_final.pth"]
    assert (out / "last_checkpoint").read_text() == "model_final.pth" and (out / "config.yaml").is_file()
    assert_box_and_mask_ap(log)
    assert len(list((out / "vis").glob("*.png"))) == 2

    log = run_lazy_train_net(dataset, out, "--resume", opts=["train.max_iter=22"])
    assert "Starting training from iteration 20" in log, log[-2000:]

    log = run_lazy_train_net(dataset, out, "--eval-only", opts=[f"train.init_checkpoint={out / 'model_final.pth'}"])
    assert_box_and_mask_ap(log)
    assert "Starting training" not in log
