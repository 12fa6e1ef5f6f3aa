"""Fault injection: bad inputs and interruptions, each answered by a named error, an intact
earlier file (checksum) or an exact resume. One section per item of "What happens when things
go wrong" in README.md:

1. exact resume of detection training (optimizer, schedule, data position), SOLVER changes;
2. protected outputs: a used OUTPUT_DIR, atomic checkpoint writes, an unusable last_checkpoint;
3. no code runs from weights files (.pkl payloads with a marker file), unsafe vs corrupt;
4. weights must fit wherever they are used (prediction, --eval-only);
5. a diverged pretraining step never replaces its checkpoint; partial log lines, stale temp files;
6. bad data named at start (json, images, class count, polygons, 16-bit images, --register,
   argument ranges, a full disk, the converter's input named by a symlink).

Most cases call the package functions the tools call, in this process; train_net runs as a
subprocess where its command line itself is under test.
"""
import hashlib
import json
import os
import pickle
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, tiny_cfg, tiny_mae_kwargs, tool
from convmae_det.checkpoint import CheckpointError, SafeCheckpointer, load_checkpoint_file, save_weights
from convmae_det.data import DatasetError, ShapesSpec, generate_shapes_dataset, register_coco_datasets
from convmae_det.data import checks as data_checks
from convmae_det.engine import Trainer, build_predictor, load_eval_weights, predict_images, prepare_output_dir, setup_cfg
from convmae_det.pretrain import ConvMAE, engine
from convmae_det.pretrain.data import ImageFolderDataset


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class Payload:
    """Unpickling it creates the file ``marker``: code that runs from a weights file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def full_disk(path) -> None:
    """Make the next atomic_write of ``path`` in this process write to /dev/full (ENOSPC)."""
    os.symlink("/dev/full", os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = generate_shapes_dataset(str(tmp_path_factory.mktemp("faults") / "shapes"),
                                ShapesSpec(num_train=8, num_val=4, image_size=128, seed=5))
    if "f_train" not in __import__("detectron2.data").data.DatasetCatalog.list():
        register_coco_datasets([("f_train", d["train"], os.path.join(d["root"], "train")),
                                ("f_val", d["val"], os.path.join(d["root"], "val"))])
    return d


def train_cfg(out, max_iter, *opts):
    return setup_cfg(TINY, [
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('f_train',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out),
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(3,)",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "0",
        "MODEL.CONVMAE.DROP_PATH_RATE", "0.1", "SEED", "3", *opts])


def train(out, max_iter, *opts, resume=False):
    """Train in this process as tools/train_net.py does (its default_setup seeds the init)."""
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    trainer = Trainer(train_cfg(out, max_iter, *opts))
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def two_iterations(data, tmp_path_factory):
    """A run stopped after 2 iterations: model_0000000.pth, model_0000001.pth, model_final.pth."""
    out = tmp_path_factory.mktemp("run2")
    train(out, 2)
    return out


@pytest.fixture(scope="module")
def tiny_model():
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg())


# --- 1. exact resume ------------------------------------------------------------------------------

def test_resume_gives_the_weights_of_the_uninterrupted_run(two_iterations, tmp_path):
    full = train(tmp_path / "full", 4)
    cut = tmp_path / "cut"
    shutil.copytree(two_iterations, cut)
    # the resumed half maps its images in a worker process: the stream does not depend on it
    resumed = train(cut, 4, "DATALOADER.NUM_WORKERS", "1", resume=True)
    assert resumed.start_iter == 2
    a, b = full.model.state_dict(), resumed.model.state_dict()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    moments = [(full.optimizer.state[p]["exp_avg"], resumed.optimizer.state[q]["exp_avg"])
               for p, q in zip(full.model.parameters(), resumed.model.parameters())]
    assert max((x - y).abs().max().item() for x, y in moments) <= 1e-6
    assert [g["lr"] for g in full.optimizer.param_groups] == [g["lr"] for g in resumed.optimizer.param_groups]
    assert torch.load(cut / "model_final.pth", weights_only=True)["iteration"] == 3


def test_a_changed_schedule_applies_from_the_resumed_iteration(two_iterations, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(two_iterations, cut)
    torch.manual_seed(0)
    trainer = Trainer(train_cfg(cut, 4, "SOLVER.BASE_LR", "0.0001"))  # the run used 0.0005
    trainer.resume_or_load(resume=True)
    scales = [g["lr_scale"] for g in trainer.optimizer.param_groups]
    # iteration 2 is after the 2 warm-up iterations and before the step at 3: the new base lr
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-4 * s for s in scales])
    assert trainer.scheduler.base_lrs == pytest.approx([1e-4 * s for s in scales])
    for key, value in (("SOLVER.IMS_PER_BATCH", "4"), ("SOLVER.OPTIMIZER", "SGD")):
        torch.manual_seed(0)
        trainer = Trainer(train_cfg(cut, 4, key, value))
        with pytest.raises(CheckpointError, match=f"{key} is .* but the checkpoint's run used"):
            trainer.resume_or_load(resume=True)


# --- 2. protected outputs -------------------------------------------------------------------------

def test_a_new_run_refuses_a_used_output_dir(two_iterations, tmp_path):
    out = tmp_path / "used"
    shutil.copytree(two_iterations, out)
    before = sha(out / "model_final.pth")
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(events.out.tfevents.*, last_checkpoint, metrics.json, "):
        prepare_output_dir(str(out), resume=False, overwrite=False)
    assert sha(out / "model_final.pth") == before
    prepare_output_dir(str(out), resume=True, overwrite=False)  # continuing it is fine
    (out / ".model_final.pth.tmp999999999").write_bytes(b"half")  # a write killed mid-way
    prepare_output_dir(str(out), resume=False, overwrite=True)
    assert os.listdir(out) == []
    # what a run that failed before its first logged iteration leaves (its writers' empty files)
    # is no earlier run: the next start is not refused
    failed = tmp_path / "failed_start"
    failed.mkdir()
    (failed / "metrics.json").write_bytes(b"")
    (failed / "events.out.tfevents.1.vm.1.0").write_bytes(b"header")
    prepare_output_dir(str(failed), resume=False, overwrite=False)


def test_train_net_refuses_a_used_output_dir_and_keeps_model_final(two_iterations, tmp_path):
    out = tmp_path / "used"
    shutil.copytree(two_iterations, out)
    before = sha(out / "model_final.pth")
    cmd = [sys.executable, tool("train_net.py"), "--config-file", TINY, "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "holds an earlier run" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and sha(out / "model_final.pth") == before


def test_checkpoint_writes_are_atomic(two_iterations, tmp_path, tiny_model):
    out = tmp_path / "ckpt"
    shutil.copytree(two_iterations, out)
    before, tag = sha(out / "model_final.pth"), (out / "last_checkpoint").read_text()
    full_disk(out / "model_final.pth")  # the write fails mid-way, as a kill or a full disk would
    with pytest.raises(OSError, match="no space left on device while writing .*model_final.pth"):
        SafeCheckpointer(tiny_model, str(out)).save("model_final")
    assert sha(out / "model_final.pth") == before and (out / "last_checkpoint").read_text() == tag
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_an_unusable_last_checkpoint_is_named_with_the_previous_one(two_iterations, tmp_path, tiny_model):
    out = tmp_path / "bad"
    shutil.copytree(two_iterations, out)
    (out / "model_final.pth").write_bytes(b"")  # a 0-byte file, as a kill during a plain write left it
    with pytest.raises(CheckpointError, match=r"model_final.pth is empty.*newest other checkpoint is .*model_0000001.pth"):
        SafeCheckpointer(tiny_model, str(out)).resume_or_load("", resume=True)
    (out / "last_checkpoint").write_text("")
    with pytest.raises(CheckpointError, match=r"last_checkpoint is empty.*echo model_0000001.pth >"):
        SafeCheckpointer(tiny_model, str(out)).resume_or_load("", resume=True)


# --- 3. no code from files ------------------------------------------------------------------------

def test_pickle_payloads_never_run(data, two_iterations, tmp_path):
    marker = tmp_path / "RAN"
    pkl, pth = tmp_path / "weights.pkl", tmp_path / "weights.pth"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {}, "x": Payload(marker)}, f)
    torch.save({"model": {}, "x": Payload(marker)}, pth)
    from detectron2.modeling import build_model

    os.makedirs(tmp_path / "o")

    for weights in (pkl, pth):
        wcfg = tiny_cfg("MODEL.WEIGHTS", str(weights), "DATASETS.TRAIN", "('f_train',)", "DATASETS.TEST", "()",
                        "OUTPUT_DIR", str(tmp_path / "o"), "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0")
        with pytest.raises(CheckpointError, match="unsafe content"):  # train_net's MODEL.WEIGHTS
            Trainer(wcfg).resume_or_load(resume=False)
        with pytest.raises(CheckpointError, match="unsafe content"):  # tools/predict.py --weights
            build_predictor(wcfg)
        with pytest.raises(CheckpointError, match="unsafe content"):  # --eval-only
            load_eval_weights(wcfg, build_model(wcfg))
    resumed = tmp_path / "resumed"  # --resume from a checkpoint replaced by a payload
    shutil.copytree(two_iterations, resumed)
    shutil.copy(pth, resumed / "model_final.pth")
    with pytest.raises(CheckpointError, match=r"--resume: unsafe content: .*model_final.pth would import and call io.open"):
        train(resumed, 4, resume=True)
    # the tools' command lines: --eval-only and predict.py
    r = subprocess.run([sys.executable, tool("train_net.py"), "--config-file", TINY, "--eval-only", "MODEL.WEIGHTS", str(pkl),
                        "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "e")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "unsafe content" in r.stderr and "--allow-pickle" in r.stderr, r.stderr[-2000:]
    from convmae_det.cli import predict

    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(img)
    with pytest.raises(SystemExit, match="unsafe content"):
        predict.main(["--config-file", TINY, "--weights", str(pkl), "--input", str(img), "--output", str(tmp_path / "p"),
                      "MODEL.DEVICE", "cpu"])
    assert not marker.exists()


def test_unsafe_content_and_corrupt_files_are_told_apart(tmp_path):
    old = tmp_path / "protocol0.pth"  # a pickle of protocol 0 does not start like a torch file
    old.write_bytes(pickle.dumps({"model": Payload(tmp_path / "RAN")}, protocol=0))
    with pytest.raises(CheckpointError, match=r"^unsafe content: .* would import and call io.open"):
        load_checkpoint_file(str(old))
    cut = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.ones(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"^corrupt file: .*cut.pth is not a readable torch checkpoint"):
        load_checkpoint_file(str(cut))
    assert not (tmp_path / "RAN").exists()


# --- 4. weights must fit --------------------------------------------------------------------------

def test_prediction_and_evaluation_refuse_weights_that_do_not_fit(data, tmp_path, tiny_model):
    from detectron2.modeling import build_model

    cfg = tiny_cfg("DATASETS.TEST", "('f_val',)", "OUTPUT_DIR", str(tmp_path))
    pretrain = tmp_path / "pretrain.pth"  # an unconverted pretraining checkpoint
    torch.save({"model": ConvMAE(**tiny_mae_kwargs()).state_dict()}, pretrain)
    small = tmp_path / "small.pth"  # a model of another size
    torch.save({"model": build_model(tiny_cfg("MODEL.CONVMAE.EMBED_DIMS", "[32, 64, 128]")).state_dict()}, small)
    backbone = tmp_path / "backbone.pth"  # converted, but no trained heads
    torch.save({"model": {k: v for k, v in tiny_model.state_dict().items() if k.startswith("backbone.")}}, backbone)
    for weights, message in ((pretrain, "shares no parameter name with the model"),
                             (small, r"(?s)does not fit this config .*backbone\.net\."),
                             (backbone, r"lacks \d+ of the model's \d+ tensors \(proposal_generator.rpn_head, roi_heads")):
        wcfg = cfg.clone()
        wcfg.defrost()
        wcfg.MODEL.WEIGHTS = str(weights)
        with pytest.raises(CheckpointError, match=message):
            build_predictor(wcfg)
        with pytest.raises(CheckpointError, match=message):
            load_eval_weights(wcfg, build_model(wcfg))
    with pytest.raises(CheckpointError, match="--eval-only needs the weights to evaluate"):
        load_eval_weights(cfg, build_model(cfg))


def test_predict_reports_an_input_that_is_no_image_and_draws_the_others(data, tmp_path, tiny_model):
    weights = tmp_path / "model.pth"
    torch.save({"model": tiny_model.state_dict()}, weights)
    predictor = build_predictor(tiny_cfg("MODEL.WEIGHTS", str(weights)))
    inputs = [tmp_path / "a.png", tmp_path / "notes.png", tmp_path / "b.jpg"]
    Image.new("RGB", (96, 80), (30, 60, 90)).save(inputs[0])
    inputs[1].write_text("not an image")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(inputs[2])
    failed = predict_images(predictor, [str(p) for p in inputs], str(tmp_path / "out"))
    assert failed == [str(inputs[1])]
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png"]


# --- 5. pretraining: divergence, logs, temporary files --------------------------------------------

TINY_PRETRAIN = ["--size", "tiny", "--img-size", "64", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
                 "--num-workers", "0", "--device", "cpu", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def pretrain_tool():
    from convmae_det.cli import pretrain as pretrain_cli

    return pretrain_cli


@pytest.fixture(scope="module")
def pretrain(pretrain_tool, data):
    """Run tools/pretrain.py's engine in this process on the training images; ``inject(done, run)``
    runs after each step, before that step's checkpoint."""

    def run_steps(out, *extra, inject=None):
        args = pretrain_tool.get_args(["--data", os.path.join(data["root"], "train"), "--output", str(out), *TINY_PRETRAIN, *extra])
        engine.prepare_output(args.output, resume=args.resume is not None, overwrite=args.overwrite)
        run = engine.build_run(args, torch.device("cpu"))
        for step, *_ in engine.train(run):
            if inject:
                inject(step + 1, run)
        return run

    return run_steps


def test_a_diverged_step_never_replaces_the_checkpoint(pretrain, tmp_path):
    out = tmp_path / "jump"

    def blow_up(done, run):  # step 13's update explodes (after the checkpoint of step 12): step 14's loss is huge
        if done == 13:
            with torch.no_grad():
                run.raw_model.decoder_pred.weight.mul_(1e4)

    with pytest.raises(SystemExit, match=r"diverged at step 14: the loss .* is over 100 times the median .*checkpoint.pth of step 12 is kept"):
        pretrain(out, "--steps", "20", "--checkpoint-every", "4", inject=blow_up)
    kept = sha(out / "checkpoint.pth")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 12

    def poison(done, run):  # parameters turn NaN in step 14, a save step: nothing is written
        if done == 14:
            with torch.no_grad():
                run.raw_model.patch_embed1.proj.weight[0, 0, 0, 0] = float("nan")

    with pytest.raises(SystemExit, match=r"diverged by step 14: patch_embed1.proj.weight holds NaN .*of step 12 is kept"):
        pretrain(out, "--steps", "20", "--checkpoint-every", "2", "--resume", inject=poison)
    assert sha(out / "checkpoint.pth") == kept
    run = pretrain(out, "--steps", "13", "--checkpoint-every", "13", "--resume")  # the kept checkpoint resumes
    assert run.start_step == 12 and torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 13


def test_pretraining_resumes_past_a_partial_log_line_and_removes_stale_temp_files(pretrain, tmp_path):
    out = tmp_path / "p"
    pretrain(out, "--steps", "2", "--checkpoint-every", "2")
    with open(out / "log.jsonl", "w") as f:  # killed while writing step 3's line
        f.write(json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps({"step": 2, "loss": 1.0}) + '\n{"step": 3, "lo')
    stale = out / f".checkpoint.pth.tmp{2**22 + 12345}"  # a save killed mid-write, by a process that is gone
    stale.write_bytes(b"half")
    engine.prepare_output(str(out), resume=True, overwrite=False)
    assert not stale.exists()
    engine.trim_log(str(out / "log.jsonl"), 2)
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]
    (out / "log.jsonl").write_text('{"step": 1}\nbroken\n{"step": 2}\n')
    with pytest.raises(SystemExit, match=r"log.jsonl line 2 is not JSON"):
        engine.trim_log(str(out / "log.jsonl"), 2)


def test_a_full_disk_is_reported_as_such_and_keeps_the_old_file(tmp_path):
    model = ConvMAE(**tiny_mae_kwargs())
    opt = engine.build_optimizer(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ckpt = tmp_path / "checkpoint.pth"
    engine.save_checkpoint(str(ckpt), model, opt, scaler, 2, {})
    before = sha(ckpt)
    full_disk(ckpt)
    with pytest.raises(OSError, match="no space left on device while writing"):
        engine.save_checkpoint(str(ckpt), model, opt, scaler, 4, {})
    converted = tmp_path / "d2.pth"
    save_weights({"w": torch.ones(2)}, str(converted))
    full_disk(converted)
    with pytest.raises(OSError, match="no space left on device"):
        save_weights({"w": torch.zeros(2)}, str(converted))
    assert sha(ckpt) == before and torch.equal(torch.load(converted, weights_only=True)["model"]["w"], torch.ones(2))


# --- 6. bad data named at start -------------------------------------------------------------------

def test_a_json_that_does_not_parse_is_named(data, tmp_path):
    from detectron2.data import DatasetCatalog

    bad = tmp_path / "bad.json"
    bad.write_text(open(data["train"]).read()[:-40])
    register_coco_datasets([("f_badjson", str(bad), os.path.join(data["root"], "train"))])
    with pytest.raises(DatasetError, match=r"f_badjson: annotation file .*bad.json is not valid JSON"):
        DatasetCatalog.get("f_badjson")
    with pytest.raises(ValueError, match="f_badjson: a dataset of that name is already registered"):
        register_coco_datasets([("f_badjson", data["train"], os.path.join(data["root"], "train"))])


def test_bad_images_are_named_before_training_and_good_ones_cached(data, tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog

    images = tmp_path / "images"
    shutil.copytree(os.path.join(data["root"], "train"), images)
    dicts = [dict(d, file_name=str(images / os.path.basename(d["file_name"]))) for d in DatasetCatalog.get("f_train")]
    data_checks.check_image_files(dicts, ["mine"])
    calls = []
    real = data_checks.verify_image
    monkeypatch.setattr(data_checks, "verify_image", lambda *a: calls.append(a[0]) or real(*a))
    data_checks.check_image_files(dicts, ["mine"])
    assert calls == []  # every image was checked by the first call
    png = images / "000003.png"
    png.write_bytes(png.read_bytes()[:300])  # truncated
    with pytest.raises(DatasetError, match=r"image .*000003.png cannot be decoded \(OSError: image file is truncated"):
        data_checks.check_image_files(dicts, ["mine"])
    assert calls == [str(png)]  # only the changed file was read again
    shutil.copy(images / "000004.png", png)
    Image.open(png).resize((100, 128)).save(png)
    with pytest.raises(DatasetError, match=r"000003.png is 100x128 pixels but its annotations say 128x128"):
        data_checks.check_image_files(dicts, ["mine"])


def test_a_class_count_mismatch_names_num_classes(data):
    cfg = train_cfg("/nonexistent", 1, "MODEL.ROI_HEADS.NUM_CLASSES", "3")
    with pytest.raises(DatasetError, match=r"MODEL.ROI_HEADS.NUM_CLASSES is 3 but dataset f_train has 5 classes"):
        Trainer.build_train_loader(cfg)


def test_degenerate_polygons_are_dropped_alike_for_training_and_evaluation(data, tmp_path, caplog):
    from detectron2.data import DatasetCatalog

    from convmae_det.evaluation import COCOEvaluator

    js = json.load(open(data["val"]))
    js["annotations"][0]["segmentation"] = [[10.0, 10.0, 20.0, 20.0]]  # 2 points
    js["annotations"][1]["segmentation"].append([1.0, 1.0, 2.0, 2.0])  # one good polygon and a 2-point one
    path = tmp_path / "val.json"
    path.write_text(json.dumps(js))
    register_coco_datasets([("f_poly", str(path), os.path.join(data["root"], "val"))])
    train_instances = sum(len(d["annotations"]) for d in DatasetCatalog.get("f_poly"))
    with caplog.at_level("WARNING"):
        ev = COCOEvaluator("f_poly", output_dir=str(tmp_path / "ev"))
    assert "dropped 2 polygon(s) of fewer than 3 points" in caplog.text and "1 instance(s)" in caplog.text
    anns = ev._coco_api.dataset["annotations"]
    assert len(anns) == train_instances == len(js["annotations"]) - 1
    for ann in anns:  # pycocotools rasterises every remaining one (a 2-point polygon raised TypeError)
        ev._coco_api.annToRLE(ann)


def test_16_bit_and_palette_images_are_scaled_not_clipped(tmp_path):
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(values).save(tmp_path / "a16.png")
    Image.fromarray((values // 257).astype(np.uint8)).convert("P").save(tmp_path / "b_palette.png")
    ds = ImageFolderDataset(str(tmp_path), lambda im: np.asarray(im))
    a16, palette = ds[0], ds[1]
    assert a16.shape == (32, 32, 3) and np.abs(a16[..., 0].astype(float) - values / 257).max() <= 0.5
    assert a16.mean() < 200  # PIL's convert("RGB") clips it: almost all 255
    assert np.abs(palette[..., 0].astype(int) - values // 257).max() <= 1


def test_16_bit_images_in_a_dataset_are_named_not_clipped(tmp_path):
    """detectron2's reader (detection and semantic labels) would clip them: refused up front."""
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "a16.png")
    Image.fromarray((values // 257).astype(np.uint8)).convert("RGB").save(tmp_path / "b8.png")
    dicts = [dict(file_name=str(tmp_path / n), width=32, height=32) for n in ("b8.png", "a16.png")]
    with pytest.raises(DatasetError, match=r"image .*a16.png is a I;16 \(16-bit or float\) image, which detectron2's reader clips"):
        data_checks.check_image_files(dicts, ["d16"])


def test_resume_with_overwrite_is_an_error_without_traceback(two_iterations, tmp_path):
    out = tmp_path / "used"
    shutil.copytree(two_iterations, out)
    cmd = [sys.executable, tool("train_net.py"), "--config-file", TINY, "--resume", "--overwrite", "OUTPUT_DIR", str(out),
           "MODEL.DEVICE", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "--resume continues the run in OUTPUT_DIR and --overwrite removes it" in r.stderr
    assert "Traceback" not in r.stderr and sorted(os.listdir(out)) == sorted(os.listdir(two_iterations))


def test_numeric_arguments_out_of_range_are_refused(pretrain_tool, capsys):
    for bad in (["--batch-size", "0"], ["--checkpoint-every", "0"], ["--steps", "-3"], ["--mask-ratio", "1"]):
        with pytest.raises(SystemExit):
            pretrain_tool.get_args(["--data", "x", "--output", "y", *bad])
        assert "expected" in capsys.readouterr().err
    predict = runpy.run_path(tool("predict.py"))
    with pytest.raises(SystemExit):
        predict["main"](["--config-file", TINY, "--weights", "w", "--input", "x", "--output", "o", "--score-thresh", "1.5"])
    assert "expected a number in [0, 1], got 1.5" in capsys.readouterr().err


def test_the_converter_refuses_an_output_that_is_its_input(tmp_path):
    src = tmp_path / "checkpoint.pth"
    torch.save({"model": ConvMAE(**tiny_mae_kwargs()).state_dict()}, src)
    before = sha(src)
    link = tmp_path / "link.pth"
    link.symlink_to(src)
    convert = runpy.run_path(tool("convert_pretrain.py"))
    with pytest.raises(SystemExit, match="refusing to overwrite the input checkpoint"):
        convert["main"]([str(link), str(src), "--config", TINY])
    assert sha(src) == before


# --- the LazyConfig (.py) path of train_net: the same refusals ------------------------------------
def test_lazy_config_path_refuses_payloads_missing_weights_and_a_used_output_dir(data, tmp_path):
    from convmae_det.cli import train_net

    marker = tmp_path / "RAN"
    pkl = tmp_path / "weights.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {}, "x": Payload(marker)}, f)
    out = tmp_path / "lazy"

    def run(*extra, flags=()):
        return train_net.cli([
            "--config-file", os.path.join(ROOT, "configs", "Shapes", "mask_rcnn_convmae_tiny_shapes.py"), *flags,
            "train.device=cpu", f"train.output_dir={out}", "dataloader.train.dataset.names=f_train",
            "dataloader.test.dataset.names=f_val", "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
            "train.max_iter=1", *extra])

    with pytest.raises(SystemExit, match=r"unsafe content.*--allow-pickle"):  # training from train.init_checkpoint
        run(f"train.init_checkpoint={pkl}")
    with pytest.raises(SystemExit, match=r"unsafe content"):  # --eval-only
        run(f"train.init_checkpoint={pkl}", flags=["--eval-only"])
    with pytest.raises(SystemExit, match=r"--eval-only needs the weights to evaluate: train.init_checkpoint"):
        run(flags=["--eval-only"])
    assert not marker.exists()

    run()  # one iteration and the evaluation: writes model_final.pth atomically
    final = out / "model_final.pth"
    before = sha(final)
    with pytest.raises(SystemExit, match=r"holds an earlier run .*--resume.*--overwrite"):
        run()
    assert sha(final) == before
    with pytest.raises(SystemExit, match=r"unsafe content"):  # --resume reads the last checkpoint safely too
        torch.save({"model": {}, "x": Payload(marker)}, out / "model_final.pth")
        run(flags=["--resume"])
    assert not marker.exists()
    run(flags=["--overwrite"])  # starts over: the replaced checkpoint is gone, a new one written
    assert load_checkpoint_file(str(final))["iteration"] == 0
    assert not [p for p in os.listdir(out) if ".tmp" in p]
