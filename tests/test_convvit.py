import pytest
import torch

from conftest import tiny_convvit_kwargs
from convmae_det.modeling import ConvViT, TransformerBlock
from convmae_det.modeling.layers import get_rel_pos, resample_abs_pos, window_partition, window_unpartition
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


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_window_attention_equals_global_when_one_window_covers_grid(impl):
    torch.manual_seed(1)
    glob = TransformerBlock(32, 4, use_rel_pos=True, rel_pos_size=(6, 6), attn_impl=impl)
    win = TransformerBlock(32, 4, use_rel_pos=True, window_size=6, attn_impl=impl)
    with torch.no_grad():
        for p in glob.parameters():
            p.normal_(0, 0.2)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(2, 6, 6, 32)
    a, b = glob(x), win(x)
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_window_block_differs_from_global_when_windows_split_grid():
    glob = TransformerBlock(32, 4)
    win = TransformerBlock(32, 4, window_size=3)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 6, 6, 32)
    assert not torch.allclose(glob(x), win(x), atol=1e-4)


def _net_with_random_rel_pos(**overrides):
    net = ConvViT(
        **tiny_convvit_kwargs(
            window_size=3, window_block_indexes=[0], use_rel_pos=True, rel_pos_grid=(4, 4), **overrides
        )
    )
    with torch.no_grad():
        for blk in net.blocks3:
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
    return net


@pytest.mark.parametrize("hw", [(64, 64), (96, 64)])
def test_fast_equals_eager_forward_and_gradients(hw):
    net = _net_with_random_rel_pos()
    x = torch.randn(2, 3, *hw)
    outs, grads = {}, {}
    for impl in ("fast", "eager"):
        net.set_impl(impl)
        net.zero_grad()
        out = net(x)
        sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in out.values()).backward()
        outs[impl] = {k: v.detach() for k, v in out.items()}
        grads[impl] = {n: p.grad.clone() for n, p in net.named_parameters()}
    for k in outs["fast"]:
        diff = (outs["fast"][k] - outs["eager"][k]).abs().max().item()
        assert diff < 1e-5, f"{k}: fast and eager differ by {diff}"
    for n, g in grads["fast"].items():
        scale = grads["eager"][n].abs().max().item() + 1e-6
        diff = (g - grads["eager"][n]).abs().max().item()
        assert diff / scale < 1e-4, f"grad of {n}: fast and eager differ by {diff} (max {scale})"


@pytest.mark.parametrize("hw", [(1, 1), (2, 5), (7, 3), (6, 6)])
@pytest.mark.parametrize("dim,heads", [(36, 3), (64, 1)])
def test_fused_rel_pos_attention_equals_explicit_bias(hw, dim, heads):
    """The relative shift of the fused path against the official explicit N x N bias, on grids
    from 1x1 up, non-square, with tables sized for another grid (resized) and head widths
    whose channel padding differs."""
    from convmae_det.modeling.convvit import Attention

    torch.manual_seed(0)
    attn = Attention(dim, heads, use_rel_pos=True, rel_pos_size=(4, 5))
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, hw[0] * hw[1], dim, requires_grad=True)
    results = {}
    for impl in ("sdpa", "eager"):
        attn.attn_impl = impl
        attn.zero_grad()
        x.grad = None
        out = attn(x, hw)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[impl] = [out.detach(), x.grad, attn.rel_pos_h.grad, attn.rel_pos_w.grad]
    for name, a, b in zip(("out", "x.grad", "rel_pos_h.grad", "rel_pos_w.grad"), *results.values()):
        assert (a - b).abs().max() < 1e-5 * (1 + b.abs().max()), name


def test_rel_pos_attention_compiles_to_one_graph():
    """torch.compile traces the fused relative-position attention whole (reading a tensor's
    storage offset in it split the graph into 9 pieces)."""
    import torch._dynamo
    from convmae_det.modeling.convvit import Attention

    attn = Attention(36, 3, use_rel_pos=True, rel_pos_size=(4, 5))
    explained = torch._dynamo.explain(lambda x: attn(x, (4, 5)))(torch.randn(2, 20, 36))
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


def test_fast_conv_stages_keep_channels_last_without_copies():
    net = ConvViT(**tiny_convvit_kwargs()).eval()
    s4, s8, tokens = net.forward_conv_stages(torch.randn(1, 3, 64, 64))
    for t in (s4, s8):  # NCHW views of B H W C memory
        assert t.is_contiguous(memory_format=torch.channels_last) and t.permute(0, 2, 3, 1).is_contiguous()
    assert tokens.is_contiguous()


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl must be one of"):
        ConvViT(**tiny_convvit_kwargs(), impl="flash")


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


def test_compiled_blocks_compute_the_same_as_eager():
    """torch.compile'd blocks (with and without checkpointing) against the eager implementation."""
    kw = tiny_convvit_kwargs(window_size=2, window_block_indexes=[1], use_rel_pos=True)
    ref = ConvViT(**kw, impl="eager")
    x = torch.randn(2, 3, 64, 64)
    sum(v.square().mean() for v in ref(x).values()).backward()
    for ckpt in (False, True):
        net = ConvViT(**kw, compile_blocks=True, use_act_checkpoint=ckpt)
        net.load_state_dict(ref.state_dict())
        out = net(x)
        sum(v.square().mean() for v in out.values()).backward()
        with torch.no_grad():
            ref_out = ref(x)
        for k in out:
            assert (out[k] - ref_out[k]).abs().max() < 1e-5, k
        for (n, p), q in zip(ref.named_parameters(), net.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), (ckpt, n)


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


@pytest.mark.parametrize("impl", ["fast", "eager"])
def test_activation_checkpointing_gives_same_gradients(impl):
    kw = tiny_convvit_kwargs(window_size=2, window_block_indexes=[1], use_rel_pos=True, impl=impl)
    a, b = ConvViT(**kw), ConvViT(**kw, use_act_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for net in (a, b):
        sum(v.square().mean() for v in net(x).values()).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_drop_path_is_stochastic_in_training_only():
    net = ConvViT(**tiny_convvit_kwargs(drop_path_rate=0.5))
    x = torch.randn(2, 3, 64, 64)
    net.train()
    assert not torch.allclose(net(x)["s16"], net(x)["s16"])
    net.eval()
    assert torch.equal(net(x)["s16"], net(x)["s16"])
