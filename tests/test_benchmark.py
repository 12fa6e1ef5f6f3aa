"""tools/benchmark.py end to end on a tiny encoder (the Base numbers come from running the tool),
and the measuring it is built from (convmae_det.utils.profiling, convmae_det.utils.flops)."""
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from conftest import ROOT, tiny_mae_kwargs, tool
from convmae_det.utils.flops import gmacs, pretrain_step_gmacs
from convmae_det.utils.profiling import PeakMemory, time_interleaved

# every row and every check a CPU run of all three parts has (no compiled rows: --compile is
# off on the CPU); a row or check that disappears fails the test
CPU_ROWS = [
    ("backbone fwd", "fast", False), ("backbone fwd", "eager", False),
    ("backbone fwd+bwd", "fast", False), ("backbone fwd+bwd", "eager", False), ("backbone fwd+bwd", "fast", True),
    ("maskrcnn train iter", "fast", False), ("maskrcnn train iter", "eager", False),
    ("pretrain step", "fast", False), ("pretrain step", "eager", False), ("pretrain complementary", "fast", False),
]
CPU_CHECKS = {
    "backbone_fast_vs_eager_max_abs_diff", "backbone_fwd_bwd_ops_fast_fp32", "backbone_fwd_bwd_ops_eager_fp32",
    "pretrain_gmacs_ratio0", "pretrain_gmacs_sparse", "pretrain_gmacs_dense", "pretrain_sparse_flops_fraction",
    "pretrain_dense_flops_fraction", "pretrain_sparse_vs_dense_loss_abs_diff", "maskrcnn_train_speedup_fp32_fast",
    "pretrain_step_speedup_fp32_fast", "backbone_fwd_bwd_speedup_fp32", "act_ckpt_time_overhead_fp32",
    "act_ckpt_memory_cut_fp32",
}
CPU_TARGETS = {
    "backbone_fast_vs_eager_max_abs_diff", "backbone_fwd_bwd_speedup_fp32", "act_ckpt_time_overhead_fp32",
    "act_ckpt_memory_cut_fp32", "pretrain_sparse_flops_fraction", "pretrain_sparse_vs_dense_loss_abs_diff",
}


def test_benchmark_cli_writes_every_row_and_check(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([
        sys.executable, tool("benchmark.py"),
        "--device", "cpu", "--size", "tiny", "--img-size", "64", "--batch", "1", "--pretrain-batch", "4", "--pretrain-img-size", "64",
        "--repeats", "1", "--warmup", "1", "--rows", "backbone,maskrcnn,pretrain", "--output", str(out),
        # small heads: the row measures the same code path, the COCO heads would take minutes here
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_BOX_HEAD.NUM_CONV", "0",
        "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.CONVMAE.GLOBAL_ATTN_INDEXES", "[1, 3]",
    ], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert list(result) == ["machine", "args", "bf16_matmul_peak_tflops", "rows", "checks", "targets", "seconds"]
    assert [(r["name"], r["impl"], r["act_ckpt"]) for r in result["rows"]] == CPU_ROWS
    for r in result["rows"]:
        assert r["dtype"] == "fp32" and r["median_s"] > 0 and r["peak_gib"] > 0, r
        if r["name"] != "maskrcnn train iter":  # the detection heads' FLOPs are not counted
            assert r["gmacs_fwd_per_image"] > 0 and r["tflops"] > 0, r
        if r["impl"] == "fast" and r["name"] != "pretrain complementary" and not r["act_ckpt"]:
            assert r["speedup_vs_eager"] > 0  # every fast row has its eager twin
        # the printed table has the row
        assert f"{r['name']:<24}{r['impl']:<10}{'fp32':<6}{'on' if r['act_ckpt'] else 'off':<6}" in proc.stdout
    assert {r["conv_stages"] for r in result["rows"] if r["name"] == "pretrain step"} == {"sparse", "dense"}
    checks = result["checks"]
    assert set(checks) == CPU_CHECKS
    assert checks["backbone_fast_vs_eager_max_abs_diff"] < 1e-4
    assert checks["pretrain_sparse_vs_dense_loss_abs_diff"] < 1e-5
    assert checks["pretrain_sparse_flops_fraction"] < checks["pretrain_dense_flops_fraction"] < 1
    # the fast path dispatches fewer ops than the eager one (views excluded), and both some
    assert 0 < checks["backbone_fwd_bwd_ops_fast_fp32"] < checks["backbone_fwd_bwd_ops_eager_fp32"]
    # measured, not asserted: at this size the weights dominate and page granularity decides
    assert isinstance(checks["act_ckpt_memory_cut_fp32"], float)
    assert set(result["targets"]) == CPU_TARGETS
    assert result["targets"]["backbone_fast_vs_eager_max_abs_diff"] == dict(op="<=", target=1e-4, met=True)
    assert "backbone_fast_vs_eager_max_abs_diff" in proc.stdout and "target <= 0.0001: met" in proc.stdout


def test_variants_are_timed_in_turn_and_measured_after():
    calls = []
    variants = [dict(prepare=lambda n=n: calls.append(f"prepare {n}"), fn=lambda n=n: calls.append(n)) for n in "ab"]
    times, peaks = time_interleaved(variants, torch.device("cpu"), warmup=1, repeats=2, mem=PeakMemory(torch.device("cpu")))
    round_ = ["prepare a", "a", "prepare b", "b"]
    assert calls == round_ * 4  # warm-up, two timed rounds, the memory run
    assert [len(t) for t in times] == [2, 2] and all(p == 0 for p in peaks)


def test_cpu_peak_memory_counts_live_tensors_whatever_ran_before():
    mem = PeakMemory(torch.device("cpu"))

    def temporaries():
        a = torch.empty(2**20)  # 4 MiB, freed before the next two exist
        del a
        b = torch.ones(2**19)
        c = b + 1  # noqa: F841  2 + 2 MiB alive together: the peak
    assert mem.measure(temporaries, 0) * 2**30 == 4 * 2**20

    lin = torch.nn.Linear(256, 256)
    x = torch.randn(64, 256)

    def step():  # frees the previous run's gradients, as the benchmark's steps do
        lin.zero_grad(set_to_none=True)
        lin(x).square().sum().backward()

    step()
    readings = [mem.measure(step, 0) for _ in range(3)]
    # the profiler's memory events read every run after the first low by the gradients' size
    assert readings[0] == readings[1] == readings[2] > 0


class _Attention(torch.nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, q, k, v):
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v


def test_fused_attention_counts_as_its_two_matmuls():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 5)
    expected = 2 * 3 * 10 * 7 * (8 + 5) / 1e9  # q @ k^T, then attn @ v
    assert gmacs(_Attention(fused=True), (q, k, v)) == gmacs(_Attention(fused=False), (q, k, v)) == expected


def test_sparse_step_flops_are_counted_on_the_product_model_like_the_reference():
    from convmae_det.modeling.reference import ReferenceConvMAE
    from convmae_det.pretrain import ConvMAE, random_masking

    fast, reference = ConvMAE(**tiny_mae_kwargs()).eval(), ReferenceConvMAE(**tiny_mae_kwargs()).eval()
    imgs = torch.randn(1, 3, 64, 64)
    mask = random_masking(1, (4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    nothing = torch.zeros_like(mask)
    # unmasked, the two compute the same matmuls and convolutions: the same count
    assert pretrain_step_gmacs(fast, imgs, nothing) == pretrain_step_gmacs(reference, imgs, nothing)
    # masked, the product model's conv stages skip the masked patches, the reference's do not
    assert pretrain_step_gmacs(fast, imgs, mask) < pretrain_step_gmacs(reference, imgs, mask) < pretrain_step_gmacs(reference, imgs, nothing)
