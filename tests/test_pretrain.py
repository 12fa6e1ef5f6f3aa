import json
import os
import sys

import pytest
import torch

from convmae_det.pretrain import ConvMAE, complementary_masks, convmae_pretrain, patchify, random_masking, upsample_mask
from convmae_det.pretrain.data import ImageFolderDataset, list_images
from convmae_det.pretrain.engine import lr_at_step
from reference_keys import convmae_base_pretrain_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def tiny_mae(**kw):
    return ConvMAE(embed_dims=(32, 48, 64), depths=(1, 1, 2), num_heads=2, img_size=64,
                   decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **kw)


def test_masks_have_the_ratio_and_are_shared_by_all_stages():
    mask = random_masking(3, (14, 14), 0.75, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 196) and torch.all(mask.sum(1) == 147)
    for factor in (2, 4):
        up = upsample_mask(mask, (14, 14), factor)
        assert up.shape == (3, 1, 14 * factor, 14 * factor)
        # every factor x factor cell of the upsampled mask equals the stage-3 value
        assert torch.equal(up[:, 0, ::factor, ::factor].reshape(3, -1), mask)
        assert torch.equal(torch.nn.functional.max_pool2d(up, factor), -torch.nn.functional.max_pool2d(-up, factor))


@pytest.mark.parametrize("impl", ["fast", "eager"])
def test_masked_convolution_leaks_nothing(impl):
    torch.manual_seed(0)
    model = tiny_mae(impl=impl).eval()
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_masking(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(1))
    # change every pixel inside masked 16x16 blocks
    pix = upsample_mask(mask, (4, 4), 16).bool().expand(-1, 3, -1, -1)
    other = imgs.clone()
    other[pix] = torch.randn(int(pix.sum())) * 10
    vis = 1 - mask
    with torch.no_grad():
        a4, a8, _ = model.forward_conv_stages(imgs, (upsample_mask(vis, (4, 4), 4), upsample_mask(vis, (4, 4), 2)))
        b4, b8, _ = model.forward_conv_stages(other, (upsample_mask(vis, (4, 4), 4), upsample_mask(vis, (4, 4), 2)))
        keep4 = upsample_mask(vis, (4, 4), 4).bool().expand_as(a4)
        keep8 = upsample_mask(vis, (4, 4), 2).bool().expand_as(a8)
        assert torch.equal(a4[keep4], b4[keep4]) and torch.equal(a8[keep8], b8[keep8])
        assert not torch.equal(a4, b4)  # the masked positions did change
        assert torch.equal(model.forward_encoder(imgs, mask), model.forward_encoder(other, mask))


@pytest.mark.parametrize("impl", ["fast", "eager"])
def test_sparse_conv_stages_give_the_dense_loss_and_gradients(impl):
    torch.manual_seed(0)
    model = tiny_mae(impl=impl)
    imgs = torch.randn(3, 3, 64, 128)  # a non-square grid: 4 x 8
    mask = random_masking(3, (4, 8), 0.75, generator=torch.Generator().manual_seed(1))
    runs = {}
    for sparse in (True, False):
        model.sparse = sparse
        model.zero_grad()
        loss, _, _ = model(imgs, mask=mask)
        loss.backward()
        runs[sparse] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert abs(runs[True][0] - runs[False][0]) < 1e-5
    assert runs[True][1].keys() == runs[False][1].keys()
    for n, g in runs[False][1].items():
        assert torch.allclose(runs[True][1][n], g, atol=1e-6, rtol=1e-4), n


def _step_gmacs(model, ratio, grid=(14, 14)):
    from convmae_det.utils.flops import pretrain_step_gmacs

    mask = random_masking(1, grid, ratio, generator=torch.Generator().manual_seed(0))
    return pretrain_step_gmacs(model, torch.randn(1, 3, grid[0] * 16, grid[1] * 16), mask)


def test_sparse_base_step_costs_under_45_percent_of_the_unmasked_flops():
    model = convmae_pretrain("base", impl="eager").eval()  # eager: fvcore counts explicit matmuls
    full = _step_gmacs(model, 0.0)
    sparse = _step_gmacs(model, 0.75)
    model.sparse = False
    dense = _step_gmacs(model, 0.75)
    assert sparse / full <= 0.45, (sparse, full)
    assert dense / full > 0.55  # the official dense conv stages, for contrast


def test_complementary_masks_are_disjoint_and_cover_the_grid():
    masks = complementary_masks(2, (4, 4), 4, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (4, 2, 16)
    visible = 1 - masks
    assert torch.equal(visible.sum(0), torch.ones(2, 16))  # each position visible in exactly one view
    assert torch.all(masks.sum(-1) == 12)  # ratio 0.75 in every view
    with pytest.raises(ValueError, match="num_views"):
        complementary_masks(1, (3, 3), 4)


def test_complementary_step_reconstructs_every_patch():
    model = tiny_mae()
    loss, pred, mask = model(torch.randn(2, 3, 64, 64), complementary=4, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (8, 16, 16 * 16 * 3) and mask.shape == (8, 16)
    assert torch.all(mask.reshape(4, 2, 16).sum(0) == 3)  # every patch a target in 3 of the 4 views
    loss.backward()
    assert torch.isfinite(loss)


def test_stage3_sees_only_visible_tokens():
    model = tiny_mae()
    seen = []
    model.blocks3[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    mask = random_masking(2, (4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    model(torch.randn(2, 3, 64, 64), mask=mask)
    assert seen == [(2, 4, 64)]  # 25% of 16 tokens


def test_loss_is_computed_on_masked_patches_only():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_masking(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    target = patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    pred = target.clone()
    pred[mask == 0] = 100.0  # garbage at visible patches must not count
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(0.0, abs=1e-6)
    pred[mask == 1] += 1.0
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(1.0, abs=1e-5)


def test_official_full_checkpoint_layout_loads_strictly():
    model = convmae_pretrain("base")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == convmae_base_pretrain_shapes()
    official = {k: torch.zeros(s) for k, s in convmae_base_pretrain_shapes().items()}
    model.load_state_dict(official, strict=True)


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


def _pretrain(data, out, *extra):
    import pretrain as tool

    tool.main(["--data", data, "--output", str(out), "--size", "tiny", "--img-size", "64", "--decoder-dim", "32",
               "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "4", "--num-workers", "0",
               "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--device", "cpu", *extra])
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from convmae_det.data import ShapesSpec, generate_shapes_dataset

    d = generate_shapes_dataset(str(tmp_path_factory.mktemp("img") / "s"), ShapesSpec(num_train=24, num_val=2, image_size=64, max_size=40, min_size=12))
    return os.path.join(d["root"], "train")


def test_resume_continues_the_same_loss_curve(image_folder, tmp_path):
    full = _pretrain(image_folder, tmp_path / "full", "--steps", "6", "--checkpoint-every", "3")
    _pretrain(image_folder, tmp_path / "cut", "--steps", "6", "--checkpoint-every", "3", "--stop-at", "3")
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["step"] == 3
    resumed = _pretrain(image_folder, tmp_path / "cut", "--steps", "6", "--checkpoint-every", "3", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    a = torch.tensor([r["loss"] for r in full])
    b = torch.tensor([r["loss"] for r in resumed])
    assert torch.allclose(a, b, rtol=0, atol=1e-6), (a, b)
    assert [r["lr"] for r in full] == [r["lr"] for r in resumed]


def test_pretrain_writes_checkpoint_and_grid(image_folder, tmp_path):
    rows = _pretrain(image_folder, tmp_path / "o", "--steps", "2", "--checkpoint-every", "2")
    assert [r["step"] for r in rows] == [1, 2]
    ckpt = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)
    assert "patch_embed1.proj.weight" in ckpt["model"] and "decoder_pred.weight" in ckpt["model"]
    assert (tmp_path / "o" / "vis" / "step_000002.png").is_file()


def test_a_new_run_refuses_an_output_holding_one_and_resume_logs_each_step_once(image_folder, tmp_path):
    out = tmp_path / "r"
    _pretrain(image_folder, out, "--steps", "4", "--checkpoint-every", "2", "--stop-at", "2")
    with pytest.raises(SystemExit, match="holds an earlier run"):
        _pretrain(image_folder, out, "--steps", "4")
    with open(out / "log.jsonl", "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 3, "loss": 1.0, "lr": 0.0}) + "\n")
    rows = _pretrain(image_folder, out, "--steps", "4", "--checkpoint-every", "2", "--resume")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] != 1.0
    rows = _pretrain(image_folder, out, "--steps", "2", "--checkpoint-every", "2", "--overwrite")
    assert [r["step"] for r in rows] == [1, 2]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2


def test_pretrain_dense_and_sparse_conv_stages_give_the_same_losses(image_folder, tmp_path):
    sparse = _pretrain(image_folder, tmp_path / "sparse", "--steps", "2", "--checkpoint-every", "2")
    dense = _pretrain(image_folder, tmp_path / "dense", "--steps", "2", "--checkpoint-every", "2", "--dense-conv-stages")
    assert torch.allclose(torch.tensor([r["loss"] for r in sparse]), torch.tensor([r["loss"] for r in dense]), atol=1e-5)


def test_pretrain_with_complementary_masks(image_folder, tmp_path):
    rows = _pretrain(image_folder, tmp_path / "c", "--steps", "2", "--checkpoint-every", "2", "--complementary", "4")
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 10 for r in rows)


def test_ddp_under_torchrun_with_two_cpu_processes(image_folder, tmp_path):
    import subprocess

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tools", "pretrain.py"), "--data", image_folder, "--output", str(out),
           "--size", "tiny", "--img-size", "64", "--decoder-dim", "32", "--decoder-depth", "1",
           "--decoder-heads", "2", "--batch-size", "2", "--effective-batch", "8", "--steps", "3",
           "--num-workers", "0", "--checkpoint-every", "3", "--log-every", "1", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es), batch 2 x 2 x accum 2 = 8" in r.stderr
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 3
