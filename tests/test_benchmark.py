"""tools/benchmark.py end to end on a tiny encoder (the Base numbers come from running the tool)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def test_benchmark_writes_every_row_and_check(tmp_path):
    import benchmark

    out = tmp_path / "bench.json"
    benchmark.main([
        "--device", "cpu", "--size", "tiny", "--img-size", "64", "--batch", "1", "--pretrain-batch", "4", "--pretrain-img-size", "64",
        "--repeats", "1", "--warmup", "1", "--rows", "backbone,maskrcnn,pretrain", "--output", str(out),
        # small heads: the row measures the same code path, the COCO heads would take minutes here
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_BOX_HEAD.NUM_CONV", "0",
        "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.CONVMAE.GLOBAL_ATTN_INDEXES", "[1, 3]",
    ])
    result = json.loads(out.read_text())
    names = {(r["name"], r["impl"], r["act_ckpt"]) for r in result["rows"]}
    assert {
        ("backbone fwd", "fast", False), ("backbone fwd", "eager", False),
        ("backbone fwd+bwd", "fast", False), ("backbone fwd+bwd", "eager", False), ("backbone fwd+bwd", "fast", True),
        ("maskrcnn train iter", "fast", False), ("maskrcnn train iter", "eager", False),
        ("pretrain step", "fast", False), ("pretrain step", "eager", False), ("pretrain complementary", "fast", False),
    } <= names
    for r in result["rows"]:
        assert r["median_s"] > 0 and r["peak_gib"] > 0, r
        if r["impl"] == "fast" and r["name"] != "pretrain complementary" and not r["act_ckpt"]:
            assert r["speedup_vs_eager"] > 0  # every fast row has its eager twin
    checks = result["checks"]
    assert checks["backbone_fast_vs_eager_max_abs_diff"] < 1e-4
    assert checks["pretrain_sparse_vs_dense_loss_abs_diff"] < 1e-5
    assert checks["pretrain_sparse_flops_fraction"] < checks["pretrain_dense_flops_fraction"] < 1
    # the fast path dispatches fewer ops than the eager one (views excluded), and both some
    assert 0 < checks["backbone_fwd_bwd_ops_fast_fp32"] < checks["backbone_fwd_bwd_ops_eager_fp32"]
    # measured, not asserted: at this size the weights dominate and page granularity decides
    assert isinstance(checks["act_ckpt_memory_cut_fp32"], float)
    assert result["targets"]["backbone_fast_vs_eager_max_abs_diff"]["met"]


def test_cpu_peak_memory_counts_live_tensors_whatever_ran_before():
    import torch

    import benchmark

    mem = benchmark.PeakMemory(torch.device("cpu"))

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
