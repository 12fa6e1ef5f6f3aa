"""The label-efficient setting: unlabeled pool, labeled subsets, and the seed-grid tool."""
import glob
import hashlib
import json
import os
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog

from convmae_det.data import ShapesSpec, generate_shapes_dataset, generate_shapes_pool, prepare_builtin_datasets, write_labeled_subset
from convmae_det.utils import seed_grid
from conftest import TINY, tool

SPEC = ShapesSpec(num_train=10, num_val=5, image_size=64, min_size=12, max_size=30, seed=7)


def _digests(folder):
    return {hashlib.sha256(open(f, "rb").read()).hexdigest() for f in glob.glob(os.path.join(folder, "*.png"))}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes_dataset(str(tmp_path_factory.mktemp("le") / "convmae_shapes"), SPEC)


def test_pool_is_deterministic_new_and_reused(shapes, tmp_path):
    pool = generate_shapes_pool(shapes["root"], 12, SPEC)
    assert len(glob.glob(os.path.join(pool, "*.png"))) == 12
    # never a copy of a labeled image: train and val come from other random streams
    labeled = _digests(os.path.join(shapes["root"], "train")) | _digests(os.path.join(shapes["root"], "val"))
    assert not _digests(pool) & labeled
    # the same arguments give the same files; an identical pool is not rewritten
    other = generate_shapes_pool(str(tmp_path / "copy"), 12, SPEC)
    assert _digests(other) == _digests(pool)
    mtime = os.path.getmtime(os.path.join(pool, "000003.png"))
    assert generate_shapes_pool(shapes["root"], 12, SPEC) == pool
    assert os.path.getmtime(os.path.join(pool, "000003.png")) == mtime
    # another size is rewritten whole, the labeled splits untouched
    generate_shapes_pool(shapes["root"], 5, SPEC)
    assert len(glob.glob(os.path.join(pool, "*.png"))) == 5
    assert len(json.load(open(shapes["train"]))["images"]) == 10
    with pytest.raises(ValueError, match="at least one image"):
        generate_shapes_pool(shapes["root"], 0, SPEC)


def test_labeled_subset_is_the_first_images_with_their_annotations(shapes):
    path = write_labeled_subset(shapes["root"], 4)
    sub, full = json.load(open(path)), json.load(open(shapes["train"]))
    assert [im["id"] for im in sub["images"]] == [im["id"] for im in full["images"][:4]]
    assert sub["annotations"] == [a for a in full["annotations"] if a["image_id"] <= 4]
    assert sub["categories"] == full["categories"]
    with pytest.raises(ValueError, match="has 10"):
        write_labeled_subset(shapes["root"], 11)


def test_subset_dataset_is_registered_on_use(shapes, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(shapes["root"]))
    prepare_builtin_datasets(["convmae_shapes_train_3"], SPEC)
    records = DatasetCatalog.get("convmae_shapes_train_3")
    assert len(records) == 3 and all(os.path.isfile(r["file_name"]) for r in records)
    assert all(os.path.dirname(r["file_name"]) == os.path.join(shapes["root"], "train") for r in records)


def test_seed_grid_runs_each_cell_once_and_tabulates_mean_and_std(tmp_path, monkeypatch):
    calls = []

    def fake_train_net(cmd, stdout, stderr, env):
        out = cmd[cmd.index("OUTPUT_DIR") + 1]
        seed = int(cmd[cmd.index("SEED") + 1])
        n = int(cmd[cmd.index("DATASETS.TRAIN") + 1].split("_")[-1].split('"')[0])
        bonus = 5.0 if "MODEL.WEIGHTS" in cmd else 0.0
        calls.append((out, seed))
        with open(os.path.join(out, "metrics.json"), "w") as f:
            f.write(json.dumps({"iteration": 9, "total_loss": 1.0}) + "\n")
            f.write(json.dumps({"bbox/AP": 10 + n / 100 + seed + bonus, "bbox/AP50": 20.0, "segm/AP": 8 + seed + bonus,
                                "segm/AP50": 16.0}) + "\n")
            f.write('{"iteration": 10, "bbox/A')  # a partial last line is ignored
        stdout.write("copypaste: Task: bbox\n")
        return 0

    monkeypatch.setattr(seed_grid.subprocess, "call", fake_train_net)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    argv = ["--out", str(tmp_path / "grid"), "--labeled", "100", "300", "--seeds", "0", "1", "2",
            "--init", f"random={TINY}", "--init", f"pretrained={TINY}:{weights}"]
    rows = seed_grid.main(argv)
    assert len(calls) == 12
    by = {(r["init"], r["labeled"]): r for r in rows}
    assert by[("random", 100)]["bbox/AP mean"] == pytest.approx(12.0)  # 11, 12, 13
    assert by[("random", 100)]["bbox/AP std"] == pytest.approx(1.0)
    assert by[("pretrained", 300)]["bbox/AP mean"] == pytest.approx(19.0)
    table = open(tmp_path / "grid" / "grid.md").read()
    assert "| pretrained | 300 | 3 | 19.00 ± 1.00 |" in table and "run now" in table
    assert (tmp_path / "grid" / "grid.png").stat().st_size > 1000

    # a second call reads every cell; changing the weights file reruns only its cells
    calls.clear()
    seed_grid.main(argv)
    assert calls == []
    assert "read from" in open(tmp_path / "grid" / "grid.md").read()
    # one seed: the value alone, no spread
    seed_grid.main(argv[:2] + ["--labeled", "100", "--seeds", "0"] + argv[9:])
    one = open(tmp_path / "grid" / "grid.md").read()
    assert "| random | 100 | 1 | 11.00 | 20.00 |" in one and "±" not in one.split("\n\n")[0]
    os.utime(weights, ns=(0, 0))
    seed_grid.main(argv)
    assert len(calls) == 6 and all("pretrained" in out for out, _ in calls)


def test_seed_grid_sem_seg_task_reads_miou_and_keeps_the_configs_training_set(tmp_path, monkeypatch):
    calls = []

    def fake_train_net(cmd, stdout, stderr, env):
        out = cmd[cmd.index("OUTPUT_DIR") + 1]
        seed = int(cmd[cmd.index("SEED") + 1])
        # the flag before the KEY VALUE overrides (train_net's opts take the rest of the line)
        assert cmd.index("--overwrite") < cmd.index("SEED") and cmd[-2:] != ["--overwrite"]
        calls.append(cmd)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            f.write(json.dumps({"sem_seg/mIoU": 20.0 + 2 * seed, "sem_seg/fwIoU": 70.0, "sem_seg/mACC": 30.0,
                                "sem_seg/pACC": 80.0 + seed}) + "\n")
        return 0

    monkeypatch.setattr(seed_grid.subprocess, "call", fake_train_net)
    seg = os.path.join(os.path.dirname(TINY), "sem_seg_convmae_tiny_shapes.yaml")
    rows = seed_grid.main(["--task", "sem_seg", "--out", str(tmp_path / "g"), "--seeds", "0", "1", "2", "--init", f"random={seg}"])
    assert len(calls) == 3 and not any("DATASETS.TRAIN" in c for c in calls)
    assert rows[0]["sem_seg/mIoU mean"] == pytest.approx(22.0) and rows[0]["sem_seg/mIoU std"] == pytest.approx(2.0)
    table = open(tmp_path / "g" / "grid.md").read()
    assert "| init | labeled images | seeds | mIoU | fwIoU | mACC | pACC | mIoU per seed | how |" in table
    assert "| random | all (config) | 3 | 22.00 ± 2.00 | 70.00 ± 0.00 | 30.00 ± 0.00 | 81.00 ± 1.00 | 20.00, 22.00, 24.00 |" in table
    assert os.path.isdir(tmp_path / "g" / "random_s1")
    partial = tmp_path / "metrics.json"
    partial.write_text(json.dumps({"sem_seg/mIoU": 1, "sem_seg/fwIoU": 2}) + "\n")
    with pytest.raises(RuntimeError, match=r"has no \['sem_seg/mACC', 'sem_seg/pACC'\]"):
        seed_grid.final_metrics(str(partial), seed_grid.TASKS["sem_seg"][0])


def test_seed_grid_rejects_bad_arguments(tmp_path):
    cmd = [sys.executable, tool("seed_grid.py"), "--out", str(tmp_path), "--labeled", "0", "--init", "a=" + TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "positive integer" in r.stderr
    cmd[cmd.index("0")] = "10"
    cmd[-1] = "a=nope.yaml"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.yaml" in r.stderr
