import pytest
import torch

from conftest import assert_same_function, randomize_, tiny_convvit_kwargs
from convmae_det.modeling import BlockRunner, ConvViT, ReferenceConvViT, TransformerBlock
from convmae_det.modeling.convvit import Attention
from convmae_det.modeling.layers import get_rel_pos, resample_abs_pos, window_partition, window_unpartition
from convmae_det.modeling.reference import ReferenceAttention, ReferenceBlock
from reference_keys import convmae_base_encoder_shapes


@pytest.mark.parametrize("hw", [(64, 64), (64, 96), (96, 32), (160, 224)])
def test_strides_and_shapes(hw):
    net = ConvViT(**tiny_convvit_kwargs(window_size=3, window_block_indexes=[0], use_rel_pos=True)).eval()
    H, W = hw
    out = net(torch.randn(2, 3, H, W))
    assert list(out) == ["s4", "s8", "s16", "s32"]
    for name, c in net.out_feature_channels.items():
        s = net.out_feature_strides[name]
        assert out[name].shape == (2, c, H // s, W // s), (name, out[name].shape)


@pytest.mark.parametrize("hw", [(64, 63), (50, 64)])
def test_rejects_sizes_not_multiple_of_16(hw):
    net = ConvViT(**tiny_convvit_kwargs())
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 3, *hw))


def test_window_padding_roundtrip():
    x = torch.randn(2, 9, 11, 5)
    win, pad_hw = window_partition(x, 4)
    assert pad_hw == (12, 12) and win.shape == (2 * 9, 4, 4, 5)
    assert torch.equal(window_unpartition(win, 4, pad_hw, (9, 11)), x)


def test_window_attention_equals_global_when_one_window_covers_grid():
    glob = randomize_(TransformerBlock(32, 4, use_rel_pos=True, rel_pos_size=(6, 6)))
    win = TransformerBlock(32, 4, use_rel_pos=True, window_size=6)
    assert_same_function(glob, win, torch.randn(2, 6, 6, 32, requires_grad=True), atol=1e-5)


def test_window_block_differs_from_global_when_windows_split_grid():
    glob = TransformerBlock(32, 4)
    win = TransformerBlock(32, 4, window_size=3)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 6, 6, 32)
    assert not torch.allclose(glob(x), win(x), atol=1e-4)


def _tiny_pair(**overrides):
    kw = tiny_convvit_kwargs(window_size=3, window_block_indexes=[0], use_rel_pos=True, rel_pos_grid=(4, 4))
    kw.update(overrides)
    return randomize_(ConvViT(**kw)), ReferenceConvViT(**kw)


@pytest.mark.parametrize("hw", [(64, 64), (96, 64), (80, 48), (32, 112)])
def test_encoder_equals_reference_forward_and_gradients(hw):
    """Windowed (3x3 windows: padded on every grid here) and global blocks with relative
    position, square and odd grids, against the official computation."""
    fast, ref = _tiny_pair()
    assert_same_function(fast, ref, torch.randn(2, 3, *hw, requires_grad=True), atol=1e-4)


@pytest.mark.parametrize("hw", [(1, 1), (2, 5), (7, 3), (6, 6)])
@pytest.mark.parametrize("dim,heads", [(36, 3), (64, 1)])
def test_fused_rel_pos_attention_equals_explicit_bias(hw, dim, heads):
    """The relative shift of the fused path against the official explicit N x N bias, on grids
    from 1x1 up, non-square, with tables sized for another grid (resized) and head widths
    whose channel padding differs."""
    fast = randomize_(Attention(dim, heads, use_rel_pos=True, rel_pos_size=(4, 5)), std=0.5)
    ref = ReferenceAttention(dim, heads, use_rel_pos=True, rel_pos_size=(4, 5))
    assert_same_function(fast, ref, torch.randn(2, *hw, dim, requires_grad=True), atol=1e-5)


@pytest.mark.parametrize("window,hw", [(3, (4, 5)), (3, (6, 6)), (0, (5, 3))])
def test_block_equals_reference_block(window, hw):
    """Window attention that never projects the padding (qkv bias added after padding), and
    a global block, against ViTDet's zero-pad / partition / crop."""
    kw = dict(use_rel_pos=True, window_size=window, rel_pos_size=hw, drop_path=0.0)
    fast, ref = randomize_(TransformerBlock(48, 3, **kw)), ReferenceBlock(48, 3, **kw)
    assert_same_function(fast, ref, torch.randn(2, *hw, 48, requires_grad=True), atol=1e-5)


@pytest.mark.parametrize("window,hw", [(0, (4, 5)), (3, (5, 7))])
def test_traced_rel_pos_attention_equals_the_relative_shift(window, hw):
    """Under torch.jit.trace the relative-position windows are gathers instead of the custom
    autograd function (which a trace cannot save): same outputs and gradients."""
    import io

    attn = randomize_(Attention(36, 3, window_size=window, use_rel_pos=True, rel_pos_size=(4, 5)), std=0.5)
    x = torch.randn(2, *hw, 36, requires_grad=True)
    traced = torch.jit.trace(attn, x)
    torch.jit.save(traced, io.BytesIO())
    assert_same_function(attn, traced, x, atol=1e-5, load=False)


def test_rel_pos_attention_compiles_to_one_graph():
    """torch.compile traces the fused relative-position attention whole (reading a tensor's
    storage offset in it split the graph into 9 pieces)."""
    import torch._dynamo

    attn = Attention(36, 3, use_rel_pos=True, rel_pos_size=(4, 5))
    explained = torch._dynamo.explain(attn)(torch.randn(2, 4, 5, 36))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_window_attention_stays_in_bf16_under_autocast(monkeypatch):
    """The padded window path adds the qkv bias in the activations' dtype: under bf16 autocast
    the attention gets bf16 inputs, not fp32 ones promoted by an fp32 bias."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    blk = TransformerBlock(64, 2, window_size=3, use_rel_pos=True)  # 4x4 grid: padded to 6x6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blk(torch.randn(1, 4, 4, 64))
    assert seen == [(torch.bfloat16,) * 3]


def test_conv_stages_keep_channels_last_without_copies():
    net = ConvViT(**tiny_convvit_kwargs()).eval()
    s4, s8, tokens = net.forward_conv_stages(torch.randn(1, 3, 64, 64))
    assert all(t.is_contiguous() for t in (s4, s8, tokens))  # B H W C
    out = net(torch.randn(1, 3, 64, 64))
    for k in ("s4", "s8", "s16"):  # NCHW views of B H W C memory
        assert out[k].is_contiguous(memory_format=torch.channels_last) and out[k].permute(0, 2, 3, 1).is_contiguous()


def test_rel_pos_table_is_resized_for_other_grids():
    table = torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 3)  # length 2*4-1
    same = get_rel_pos(4, table)
    assert same.shape == (4, 4, 3) and same[0, 0, 0] == 3 and same[3, 0, 0] == 6 and same[0, 3, 0] == 0
    bigger = get_rel_pos(6, table)  # resized to 11 entries by linear interpolation
    assert bigger.shape == (6, 6, 3)
    assert torch.allclose(bigger[0, 0], torch.full((3,), 3.0), atol=0.35)


def test_pos_embed_is_resampled_to_the_input_grid():
    net = ConvViT(**tiny_convvit_kwargs()).eval()
    # the 64 px pretraining grid is 4x4; a 128x64 input needs 8x4 positions
    out = net(torch.randn(1, 3, 128, 64))
    assert out["s16"].shape[-2:] == (8, 4)


@pytest.mark.parametrize("hw", [(64, 64), (8, 20), (14, 14)])
def test_separable_pos_resampling_equals_bicubic_interpolation(hw):
    pos = torch.randn(1, 14 * 14, 32, requires_grad=True)
    ref = resample_abs_pos(pos, hw)
    out = resample_abs_pos(pos, hw, separable=True)
    assert out.shape == ref.shape == (1, *hw, 32)
    assert (out - ref).abs().max() < 1e-5
    w = torch.randn_like(ref)
    g_ref, = torch.autograd.grad((ref * w).sum(), pos)
    g_out, = torch.autograd.grad((out * w).sum(), pos)
    assert (g_out - g_ref).abs().max() < 1e-4


@pytest.mark.parametrize("ckpt", [False, True])
def test_compiled_blocks_equal_the_reference(ckpt):
    """torch.compile'd blocks (with and without checkpointing) against the official computation."""
    fast, ref = _tiny_pair(window_size=2, window_block_indexes=[1])
    fast.set_compile(True)
    fast.set_grad_checkpointing(ckpt)
    assert_same_function(fast, ref, torch.randn(2, 3, 64, 64), atol=1e-4)


def test_runner_takes_module_methods_only():
    runner = BlockRunner(compile=True)
    blk = TransformerBlock(32, 2)
    with pytest.raises(TypeError, match="bound methods of nn.Module"):
        runner(lambda x: blk(x), torch.randn(1, 4, 32))
    with pytest.raises(TypeError, match="bound methods of nn.Module"):
        runner(blk, torch.randn(1, 4, 32))


def test_base_parameter_names_and_shapes_match_official_checkpoint():
    net = ConvViT(
        embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12,
        window_size=14, window_block_indexes=[0, 2, 3, 5, 6, 8, 9], use_rel_pos=True, rel_pos_grid=(64, 64),
    )
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items() if "rel_pos" not in k}
    assert ours == convmae_base_encoder_shapes()
    # ViTDet rel-pos tables: 2*14-1 for window blocks, 2*64-1 for the global ones
    assert net.blocks3[0].attn.rel_pos_h.shape == (27, 64)
    assert net.blocks3[1].attn.rel_pos_h.shape == (127, 64)


@pytest.mark.parametrize("cls", [ConvViT, ReferenceConvViT])
def test_activation_checkpointing_gives_same_gradients(cls):
    kw = tiny_convvit_kwargs(window_size=2, window_block_indexes=[1], use_rel_pos=True)
    a, b = randomize_(cls(**kw)), cls(**kw)
    b.set_grad_checkpointing(True)
    assert_same_function(a, b, torch.randn(2, 3, 64, 64), atol=1e-6)


def test_drop_path_is_stochastic_in_training_only():
    net = ConvViT(**tiny_convvit_kwargs(drop_path_rate=0.5))
    x = torch.randn(2, 3, 64, 64)
    net.train()
    assert not torch.allclose(net(x)["s16"], net(x)["s16"])
    net.eval()
    assert torch.equal(net(x)["s16"], net(x)["s16"])
