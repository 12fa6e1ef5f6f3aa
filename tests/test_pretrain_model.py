"""The ConvMAE pretraining model: masks, sparse conv stages against the reference's dense
masked convolution, the loss, the official checkpoint layout."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_function, randomize_, tiny_mae_kwargs
from convmae_det.modeling.masking import draw_masks, patch_mean_std
from convmae_det.modeling.reference import ReferenceConvMAE
from convmae_det.pretrain import ConvMAE, complementary_masks, convmae_pretrain, patchify, random_masking, upsample_mask
from reference_keys import convmae_base_pretrain_shapes


def tiny_mae(**kw):
    return ConvMAE(**tiny_mae_kwargs(**kw))


def test_masks_have_the_ratio_and_are_shared_by_all_stages():
    mask = random_masking(3, (14, 14), 0.75, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 196) and torch.all(mask.sum(1) == 147)
    for factor in (2, 4):
        up = upsample_mask(mask, (14, 14), factor)
        assert up.shape == (3, 1, 14 * factor, 14 * factor)
        # every factor x factor cell of the upsampled mask equals the stage-3 value
        assert torch.equal(up[:, 0, ::factor, ::factor].reshape(3, -1), mask)
        assert torch.equal(F.max_pool2d(up, factor), -F.max_pool2d(-up, factor))


def test_reference_masked_convolution_leaks_nothing():
    """The official dense computation: changing every pixel of the masked 16x16 blocks changes
    no visible position of stages 1-2 and no encoder output."""
    model = ReferenceConvMAE(**tiny_mae_kwargs()).eval()
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_masking(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(1))
    pix = upsample_mask(mask, (4, 4), 16).bool().expand(-1, 3, -1, -1)
    other = imgs.clone()
    other[pix] = torch.randn(int(pix.sum())) * 10
    vis = 1 - mask
    masks = (upsample_mask(vis, (4, 4), 4), upsample_mask(vis, (4, 4), 2))
    with torch.no_grad():
        a4, a8, _ = model.forward_conv_stages(imgs, masks)
        b4, b8, _ = model.forward_conv_stages(other, masks)
        keep4, keep8 = masks[0].bool().expand_as(a4), masks[1].bool().expand_as(a8)
        assert torch.equal(a4[keep4], b4[keep4]) and torch.equal(a8[keep8], b8[keep8])
        assert not torch.equal(a4, b4)  # the masked positions did change
        assert torch.equal(model.forward_encoder(imgs, mask), model.forward_encoder(other, mask))


def test_sparse_encoder_never_reads_masked_pixels():
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_masking(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(1))
    other = imgs.clone()
    other[upsample_mask(mask, (4, 4), 16).bool().expand(-1, 3, -1, -1)] = 1e3
    with torch.no_grad():
        assert torch.equal(model.forward_encoder(imgs, mask), model.forward_encoder(other, mask))


@pytest.mark.parametrize("hw,ratio", [((64, 128), 0.75), ((64, 64), 0.5), ((48, 80), 0.6)])
def test_sparse_model_equals_reference_loss_outputs_and_gradients(hw, ratio):
    """The product's sparse stages 1-2 against the reference's dense masked convolution, with
    non-square and odd grids, through the decoder and the loss."""
    fast = randomize_(tiny_mae(drop_path_rate=0.0))
    ref = ReferenceConvMAE(**tiny_mae_kwargs())
    grid = (hw[0] // 16, hw[1] // 16)
    mask = random_masking(3, grid, ratio, generator=torch.Generator().manual_seed(1))
    imgs = torch.randn(3, 3, *hw, requires_grad=True)
    report = assert_same_function(fast, ref, dict(imgs=imgs, mask=mask), atol=1e-4)
    assert "output 0" in report and "grad patch_embed1.proj.weight" in report  # loss and stage-1 grads compared


def test_sparse_encoder_equals_reference_with_checkpointing():
    fast = randomize_(tiny_mae(use_act_checkpoint=True))
    ref = ReferenceConvMAE(**tiny_mae_kwargs())
    mask = random_masking(2, (4, 4), 0.75, generator=torch.Generator().manual_seed(2))
    assert_same_function(fast, ref, dict(imgs=torch.randn(2, 3, 64, 64), mask=mask), atol=1e-4)


def _step_gmacs(model, ratio, grid=(14, 14)):
    from convmae_det.utils.flops import pretrain_step_gmacs

    mask = random_masking(1, grid, ratio, generator=torch.Generator().manual_seed(0))
    return pretrain_step_gmacs(model, torch.randn(1, 3, grid[0] * 16, grid[1] * 16), mask)


def test_sparse_base_step_costs_under_45_percent_of_the_unmasked_flops():
    ref = convmae_pretrain("base", reference=True).eval()
    fast = convmae_pretrain("base").eval()
    full = _step_gmacs(ref, 0.0)
    sparse = _step_gmacs(fast, 0.75)
    dense = _step_gmacs(ref, 0.75)
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


def test_bad_masks_are_named():
    imgs = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="does not fit 2 images"):
        draw_masks(imgs, torch.zeros(2, 9))
    with pytest.raises(ValueError, match="hides no patch"):
        draw_masks(imgs, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="same number of visible tokens"):
        tiny_mae()(imgs, mask=torch.tensor([[1.0] * 8 + [0.0] * 8, [1.0] * 4 + [0.0] * 12]))
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_mae()(torch.randn(1, 3, 64, 60))


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
    mean, std = patch_mean_std(target)
    target = (target - mean) / std
    pred = target.clone()
    pred[mask == 0] = 100.0  # garbage at visible patches must not count
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(0.0, abs=1e-6)
    pred[mask == 1] += 1.0
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(1.0, abs=1e-5)
    # MAE's normalisation: unbiased variance, eps inside the square root
    p = patchify(imgs)
    assert torch.allclose(std, (p.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt())


@pytest.mark.parametrize("reference", [False, True])
def test_official_full_checkpoint_layout_loads_strictly(reference):
    model = convmae_pretrain("base", reference=reference)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == convmae_base_pretrain_shapes()
    official = {k: torch.zeros(s) for k, s in convmae_base_pretrain_shapes().items()}
    model.load_state_dict(official, strict=True)


def test_sparse_conv_block_traces_to_one_graph():
    """The sparse stage-1/2 block is a module method with tensor and int arguments, so
    set_compile covers it: torch.compile captures it whole (it was a closure, never compiled)."""
    import torch._dynamo
    from convmae_det.modeling import ConvBlock

    blk = ConvBlock(32)
    ids_keep = torch.tensor([[0, 2, 3], [1, 2, 3]])
    explained = torch._dynamo.explain(blk.forward)(torch.randn(2, 3, 4, 4, 32), ids_keep, (2, 2))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
