"""The pretraining engine (convmae_det.pretrain.engine) and its command line, tools/pretrain.py
(the model's own tests are in test_pretrain_model.py).

The tool runs in this process through ``runpy.run_path`` (its ``main(argv)``), under torchrun as
a subprocess for DDP; nothing here puts tools/ on sys.path.
"""
import json
import os
import runpy
import shutil
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT, tiny_mae_kwargs, tool
from convmae_det.modeling.masking import random_masking
from convmae_det.pretrain import ConvMAE
from convmae_det.pretrain.data import ImageFolderDataset, list_images
from convmae_det.pretrain.engine import (
    PretrainError,
    build_optimizer,
    lr_at_step,
    mask_generator,
    resume,
    save_checkpoint,
    step_seed,
    train_step,
)
from convmae_det.utils.fileio import atomic_write


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at_step(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_unreadable_images_are_skipped_and_reported(tmp_path, caplog):
    from PIL import Image

    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "b" / "bad.jpg").write_bytes(b"not an image")
    files = list_images(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["bad.jpg", "good.png"]
    ds = ImageFolderDataset(str(tmp_path), lambda im: torch.tensor(im.size))
    with caplog.at_level("WARNING"):
        assert ds[0].tolist() == [20, 20]
    assert "bad.jpg" in caplog.text


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "sub" / "result.json"
    with atomic_write(str(path)) as f:
        f.write("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(str(path)) as f:
            f.write("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["result.json"]  # no temporary file left
    with atomic_write(str(path), "wb") as f:
        torch.save({"x": torch.ones(2)}, f)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert os.listdir(path.parent) == ["result.json"]
    with pytest.raises(ValueError, match="for writing"):
        with atomic_write(str(path), "a"):
            pass


def test_weight_decay_spares_biases_and_norms():
    model = ConvMAE(**tiny_mae_kwargs())
    model.decoder_pred.weight.requires_grad_(False)  # frozen: in no group
    groups = build_optimizer(model, 1e-3, 0.05).param_groups
    named = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    no_decay = {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))}
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    assert {named[id(p)] for p in groups[0]["params"]} == no_decay
    assert {named[id(p)] for p in groups[1]["params"]} == set(named.values()) - no_decay
    assert "norm.weight" in no_decay and "patch_embed1.proj.weight" not in no_decay
    assert groups[0]["betas"] == (0.9, 0.95)


def test_train_step_lets_the_model_draw_the_seeded_masks():
    torch.manual_seed(0)
    model = ConvMAE(**tiny_mae_kwargs(drop_path_rate=0.1))
    batches = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = []
    for micro, imgs in enumerate(batches):  # the same step by hand: masks from mask_generator
        step_seed(3, 5, micro)
        mask = random_masking(2, (4, 4), 0.5, generator=mask_generator(3, 5, micro, rank=1))
        expected.append(model(imgs, mask=mask)[0].item())
    model.load_state_dict(state)
    opt = build_optimizer(model, 1.0, 0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss, images = train_step(model, iter(batches), opt, scaler, step=5, lr=1e-3, accum=2, seed=3, rank=1, mask_ratio=0.5)
    assert loss == pytest.approx(sum(expected) / 2, abs=1e-6) and images == 4
    assert opt.param_groups[0]["lr"] == 1e-3
    assert not torch.equal(model.patch_embed1.proj.weight, state["patch_embed1.proj.weight"])  # it stepped
    assert all(p.grad is None for p in model.parameters())
    loss, images = train_step(model, iter(batches), opt, scaler, step=6, lr=1e-3, complementary=4)
    assert images == 2  # counted before the model repeats them 4 times


def test_resume_names_a_checkpoint_that_is_missing_or_does_not_fit(tmp_path):
    model = ConvMAE(**tiny_mae_kwargs())
    opt = build_optimizer(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    path = str(tmp_path / "checkpoint.pth")
    with pytest.raises(PretrainError, match=f"{path} does not exist"):
        resume(path, model, opt, scaler)
    save_checkpoint(path, model, opt, scaler, 7, {"seed": 0, "skipped": [1]})
    assert resume(path, ConvMAE(**tiny_mae_kwargs()), opt, scaler) == 7
    assert torch.load(path, weights_only=True)["args"] == {"seed": 0}
    other = ConvMAE(**tiny_mae_kwargs(decoder_embed_dim=16))
    with pytest.raises(PretrainError, match=f"{path} does not fit this run"):
        resume(path, other, build_optimizer(other, 1e-3, 0.05), scaler)
    (tmp_path / "checkpoint.pth").write_bytes(b"truncated")
    with pytest.raises(PretrainError, match=f"{path} is not a readable checkpoint"):
        resume(path, model)


# --- tools/pretrain.py ---------------------------------------------------------------------------

TINY_RUN = ["--size", "tiny", "--img-size", "64", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
            "--num-workers", "0", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrain_tool() -> types.SimpleNamespace:
    return types.SimpleNamespace(**runpy.run_path(tool("pretrain.py")))


@pytest.fixture(scope="module")
def pretrain(pretrain_tool, image_folder):
    def run(out, *extra):
        pretrain_tool.main(["--data", image_folder, "--output", str(out), *TINY_RUN, "--batch-size", "4",
                            "--lr", "1e-3", "--warmup-steps", "2", *extra])
        return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]

    return run


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from convmae_det.data import ShapesSpec, generate_shapes_dataset

    d = generate_shapes_dataset(str(tmp_path_factory.mktemp("img") / "s"), ShapesSpec(num_train=24, num_val=2, image_size=64, max_size=40, min_size=12))
    return os.path.join(d["root"], "train")


@pytest.fixture(scope="module")
def full_run(pretrain, tmp_path_factory):
    """6 uninterrupted steps, checkpoints at 3 and 6: the loss curve the other runs must repeat."""
    out = tmp_path_factory.mktemp("full")
    return out, pretrain(out, "--steps", "6", "--checkpoint-every", "3")


def test_pretrain_writes_checkpoints_grid_args_and_log(full_run):
    out, rows = full_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 6 and "patch_embed1.proj.weight" in ckpt["model"] and "decoder_pred.weight" in ckpt["model"]
    assert [torch.load(out / f"checkpoint-{s}.pth", weights_only=True)["step"] for s in (3, 6)] == [3, 6]
    assert (out / "vis" / "step_000003.png").is_file() and (out / "vis" / "step_000006.png").is_file()
    assert json.loads((out / "args.json").read_text())["accum_iter"] == 1
    log = (out / "log.txt").read_text()  # detectron2's format, through convmae_det.utils.logger
    assert ".pretrain INFO: 24 images, 1 process(es)" in log and "step 6/6 epoch" in log
    assert f"saved {out / 'checkpoint-6.pth'}" in log


def test_keep_last_prunes_only_older_numbered_checkpoints(pretrain, tmp_path):
    out = tmp_path / "k"
    out.mkdir()
    (out / "checkpoint-best.pth").write_bytes(b"mine")  # not of the checkpoint-STEP.pth pattern
    pretrain(out, "--steps", "6", "--checkpoint-every", "1", "--keep-last", "2", "--stop-at", "4")
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == [
        "checkpoint-3.pth", "checkpoint-4.pth", "checkpoint-best.pth", "checkpoint.pth"]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 4
    assert torch.load(out / "checkpoint-3.pth", weights_only=True)["step"] == 3
    # a later step's file (left by an earlier, longer run) is not this run's to prune
    shutil.copy(out / "checkpoint-4.pth", out / "checkpoint-99.pth")
    pretrain(out, "--steps", "6", "--checkpoint-every", "1", "--keep-last", "2", "--resume")
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == [
        "checkpoint-5.pth", "checkpoint-6.pth", "checkpoint-99.pth", "checkpoint-best.pth", "checkpoint.pth"]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 6
    with pytest.raises(SystemExit, match="holds an earlier run .*checkpoint-5.pth"):
        pretrain(out, "--steps", "2")
    pretrain(out, "--steps", "2", "--checkpoint-every", "1", "--keep-last", "0", "--overwrite")  # 0 keeps all
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == [
        "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-best.pth", "checkpoint.pth"]


def test_resume_continues_the_same_loss_curve(pretrain, full_run, tmp_path):
    _, full = full_run
    pretrain(tmp_path / "cut", "--steps", "6", "--checkpoint-every", "3", "--stop-at", "3")
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["step"] == 3
    resumed = pretrain(tmp_path / "cut", "--steps", "6", "--checkpoint-every", "3", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    a = torch.tensor([r["loss"] for r in full])
    b = torch.tensor([r["loss"] for r in resumed])
    assert torch.allclose(a, b, rtol=0, atol=1e-6), (a, b)
    assert [r["lr"] for r in full] == [r["lr"] for r in resumed]


def test_a_new_run_refuses_an_output_holding_one_and_resume_logs_each_step_once(pretrain, tmp_path):
    out = tmp_path / "r"
    pretrain(out, "--steps", "4", "--checkpoint-every", "2", "--stop-at", "2")
    with pytest.raises(SystemExit, match="holds an earlier run"):
        pretrain(out, "--steps", "4")
    with open(out / "log.jsonl", "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 3, "loss": 1.0, "lr": 0.0}) + "\n")
    rows = pretrain(out, "--steps", "4", "--checkpoint-every", "2", "--resume")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] != 1.0
    rows = pretrain(out, "--steps", "2", "--checkpoint-every", "2", "--overwrite")
    assert [r["step"] for r in rows] == [1, 2]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2
    with pytest.raises(SystemExit, match="missing.pth does not exist"):
        pretrain(out, "--steps", "2", "--resume", str(out / "missing.pth"))


def test_pretrain_reference_and_sparse_models_give_the_same_losses(pretrain, full_run, tmp_path):
    # during the 2 warm-up steps the lr does not depend on --steps: the full run's first 2 steps
    _, sparse = full_run
    dense = pretrain(tmp_path / "dense", "--steps", "2", "--checkpoint-every", "2", "--dense-conv-stages")
    assert torch.allclose(torch.tensor([r["loss"] for r in sparse[:2]]), torch.tensor([r["loss"] for r in dense]), atol=1e-5)


def test_pretrain_with_complementary_masks(pretrain, tmp_path):
    rows = pretrain(tmp_path / "c", "--steps", "2", "--checkpoint-every", "2", "--complementary", "4")
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 10 for r in rows)


def test_ddp_under_torchrun_with_two_cpu_processes(image_folder, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", tool("pretrain.py"),
           "--data", image_folder, "--output", str(out), *TINY_RUN, "--batch-size", "2", "--effective-batch", "8",
           "--steps", "3", "--checkpoint-every", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es), batch 2 x 2 x accum 2 = 8" in r.stdout  # rank 0's console log
    assert "2 process(es), batch 2 x 2 x accum 2 = 8" in (out / "log.txt").read_text()
    assert (out / "log.txt.rank1").is_file()
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 3
