#!/usr/bin/env python
"""Speed and memory of the fast path against the official code's eager computation.

One process, one run: every row is timed (median of --repeats runs after --warmup) and its
peak memory recorded, for the fast and the eager implementation, fp32 and (GPU) bf16 autocast,
with and without activation checkpointing. The variants of a row (fast, eager, checkpointed)
are timed in turn, one run of each per round, so that the ratios between them do not depend on
when in the run the machine was busy:

  backbone fwd / fwd+bwd   ConvMAE-Base encoder + simple feature pyramid (COCO config)
  maskrcnn train iter      the whole Mask R-CNN: forward, backward, AdamW step (data on device)
  pretrain step            ConvMAE-Base MAE at 224, mask ratio 0.75: sparse (fast) vs the dense
                           conv stages with explicit attention (eager); complementary masking

On the CPU (2 cores here) the run is trimmed to fit 10 minutes: activation checkpointing only
for the fast backbone, no checkpointed pretraining row, and no Mask R-CNN rows unless asked for
with --rows (an iteration of the COCO heads takes about a minute on 2 cores).

Prints a table, the checks the project promises (output equality, speed-up, checkpointing's
memory cut, pretraining FLOPs), and writes everything as JSON. Among the checks, the number of
ATen ops (views excluded) one backbone fwd+bwd dispatches per path: on a GPU each is about a
kernel launch, and a path whose kernels are short is bound by their launches.

  python tools/benchmark.py --device cpu          # 512x512, batch 1 (fits 10 minutes on 2 cores)
  python tools/benchmark.py --device cuda         # 1024x1024, batch 2, plus the card's bf16 matmul peak

FLOPs are counted by fvcore on the eager path (fvcore sees explicit matmuls, not fused kernels)
and are reported as GMACs per image for the forward pass (fvcore's unit); achieved TFLOP/s
counts 2 FLOPs per MAC and a backward pass as twice the forward. Peak memory comes from one
more run after the timed ones: on the GPU torch.cuda.max_memory_allocated; on the CPU the peak
bytes of the tensors that run creates plus the weights.

--compile adds the backbone's fwd+bwd rows with torch.compile'd blocks (MODEL.CONVMAE.COMPILE),
in the last dtype only; the compile time is printed among the checks.
"""
import argparse
import functools
import json
import logging
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from convmae_det.solver import build_optimizer, use_fused_optimizer  # noqa: E402
from convmae_det.utils.flops import gmacs as count_gmacs, pretrain_step_gmacs  # noqa: E402

BACKBONE_CONFIG = "configs/COCO/mask_rcnn_convmae_base_25ep.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--img-size", type=int, default=None, help="backbone and Mask R-CNN input (default 1024 GPU, 512 CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per backbone / Mask R-CNN row (default 2 GPU, 1 CPU)")
    p.add_argument("--pretrain-batch", type=int, default=None, help="images per pretraining step (default 128 GPU, 4 CPU)")
    p.add_argument("--pretrain-img-size", type=int, default=224, help="pretraining image size (multiple of 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 10 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per row (default 3 GPU, 1 CPU)")
    p.add_argument("--size", default="base", choices=["tiny", "small", "base", "large"], help="encoder size (Base is the target)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add backbone rows with torch.compile'd blocks (default: on GPU only; compiling Base takes minutes on a small CPU)")
    p.add_argument("--rows", default=None,
                   help="comma-separated subset of backbone,maskrcnn,pretrain (default: all on GPU, backbone,pretrain on CPU)")
    p.add_argument("--dtypes", default=None, help="comma-separated fp32,bf16 (default: both on GPU, fp32 on CPU)")
    p.add_argument("--output", default=None, help="JSON file (default output/benchmark/<device>.json)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the detection config")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    for name, g, c in (("img_size", 1024, 512), ("batch", 2, 1), ("pretrain_batch", 128, 4), ("repeats", 10, 5), ("warmup", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, g if gpu else c)
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats {args.repeats} --warmup {args.warmup}: need at least one timed run and no negative warm-up")
    if args.img_size % 32:
        p.error(f"--img-size {args.img_size}: must be a multiple of 32 (the stride-32 pyramid level)")
    if args.pretrain_img_size % 16:
        p.error(f"--pretrain-img-size {args.pretrain_img_size}: must be a multiple of 16 (the patch size)")
    if args.compile is None:
        args.compile = gpu
    args.rows = args.rows or ("backbone,maskrcnn,pretrain" if gpu else "backbone,pretrain")
    unknown = set(args.rows.split(",")) - {"backbone", "maskrcnn", "pretrain"}
    if unknown:
        p.error(f"--rows: unknown {sorted(unknown)}")
    args.output = args.output or os.path.join("output", "benchmark", f"{args.device}.json")
    return args


# ------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of one more run of a block of work, after its timed runs.

    GPU: torch.cuda.max_memory_allocated. CPU: the peak of the bytes held by the tensors the
    run creates (the storages of every op's outputs, counted until they are freed; gradients,
    activations saved for the backward and temporaries alike), plus the weights
    (``resident_bytes``); buffers a kernel allocates inside itself are not seen. The process's
    resident set does not serve: glibc keeps freed memory, and forcing it to give memory back at
    once made every large allocation fault its pages in again, which slowed the CPU rows by up
    to 30%. Nor do the profiler's memory events: it remembers blocks from an earlier profiled
    run, so a run that freed an earlier measured run's gradients read low by their size
    (0.43 GiB for ConvMAE-B pretraining, depending on the order of the measurements). Under a
    dispatch mode torch.compile runs the eager code, so compiled rows get no CPU peak.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def measure(self, fn: Callable[[], None], resident_bytes: int) -> Optional[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        with LiveTensorBytes() as live:
            fn()
        return (live.peak + resident_bytes) / 2**30


class LiveTensorBytes(TorchDispatchMode):
    """While active: the peak bytes held at once by the storages that ops create."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, Tuple[StorageWeakRef, int]] = {}  # storage address -> (weak reference, bytes)
        self.held = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:  # freed since the last op
            self.held -= self.live.pop(ptr)[1]
        # outputs that alias an input (views, in-place and out= ops) hold no new memory
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.nbytes() and st.data_ptr() not in self.live and st.data_ptr() not in inputs:
                    self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
                    self.held += st.nbytes()
        self.peak = max(self.peak, self.held)
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(variants: List[Tuple[Callable[[], None], Callable[[], None]]], device: torch.device,
                     warmup: int, repeats: int, mem: Optional[PeakMemory], resident: int):
    """Times of variants (prepare, fn) timed in turn: ``repeats`` rounds of one run of each, after
    ``warmup`` runs of each, so that a change in the machine's speed during the row reaches all
    variants alike (on the shared 2-core CPU a row's runs vary by 15%). ``prepare`` switches the
    model to the variant and is not timed. Then the peak memory of one more run of each (None
    without ``mem``)."""
    for prepare, fn in variants:
        prepare()
        for _ in range(warmup):
            fn()
    sync(device)
    times: List[List[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for (prepare, fn), out in zip(variants, times):
            prepare()
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t)
    peaks = []
    for prepare, fn in variants:
        prepare()
        peaks.append(mem.measure(fn, resident) if mem is not None else None)
    return times, peaks


class _DispatchedOps(TorchDispatchMode):
    FREE = {"empty", "empty_strided", "detach", "lift_fresh", "alias", "_unsafe_view", "_local_scalar_dense"}
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in self.FREE:
            self.n += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], None]) -> int:
    """The number of ATen ops that ``fn`` dispatches, views excluded: on a GPU, about one kernel
    launch each, which bounds a step when the kernels are shorter than their launch."""
    with _DispatchedOps() as counter:
        fn()
    return counter.n


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def matmul_peak_tflops(device: torch.device) -> Optional[float]:
    """Measured bf16 matmul throughput of the card (8192^3, median of 20)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


# ------------------------------------------------------------------------------------------ builders
def detection_cfg(args, act_ckpt: bool):
    from convmae_det.engine import setup_cfg

    img_size = args.img_size
    return setup_cfg(
        BACKBONE_CONFIG,
        ["MODEL.CONVMAE.SIZE", args.size, *args.opts,
         "MODEL.CONVMAE.SQUARE_PAD", str(img_size), "INPUT.LSJ.IMAGE_SIZE", str(img_size),
         "INPUT.MIN_SIZE_TEST", str(img_size), "INPUT.MAX_SIZE_TEST", str(img_size), "MODEL.CONVMAE.USE_ACT_CHECKPOINT", str(act_ckpt),
         "MODEL.CONVMAE.DROP_PATH_RATE", "0.0", "MODEL.DEVICE", "cpu"],
    )


def build_backbone(args, device: torch.device):
    from detectron2.layers import ShapeSpec

    from convmae_det.modeling.backbone import build_convmae_sfp_backbone

    torch.manual_seed(0)
    return build_convmae_sfp_backbone(detection_cfg(args, False), ShapeSpec(channels=3)).to(device)


def set_impl(model: torch.nn.Module, impl: str, act_ckpt: bool) -> None:
    """impl: "fast", "eager" or "compiled" (the fast path with torch.compile'd blocks)."""
    from convmae_det.modeling import ConvViT

    for m in model.modules():
        if isinstance(m, ConvViT):
            m.set_impl("fast" if impl == "compiled" else impl)
            m.compile_blocks(impl == "compiled")
            m.use_act_checkpoint = act_ckpt


def synthetic_instances(img_size: int, device: torch.device, num: int = 6, seed: int = 0):
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * img_size * 0.7
    wh = img_size * (0.08 + 0.2 * torch.rand(num, 2, generator=g))
    boxes = torch.cat([xy, (xy + wh).clamp(max=img_size - 1)], dim=1)
    masks = torch.zeros(num, img_size, img_size, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[i, y0:y1, x0:x1] = True
    inst = Instances((img_size, img_size))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(0, 80, (num,), generator=g)
    inst.gt_masks = BitMasks(masks)
    return inst.to(device)


# ------------------------------------------------------------------------------------------ rows
class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.mem = PeakMemory(self.device)
        self.rows: List[Dict] = []
        self.checks: Dict[str, object] = {}
        self.dtypes = args.dtypes.split(",") if args.dtypes else ["fp32", "bf16"] if self.device.type == "cuda" else ["fp32"]
        if not set(self.dtypes) <= {"fp32", "bf16"}:
            raise ValueError(f"--dtypes takes fp32 and/or bf16, got {args.dtypes!r}")
        self.peak = matmul_peak_tflops(self.device)
        self.full_matrix = self.device.type == "cuda"  # the CPU run is trimmed to fit 10 minutes

    def autocast(self, dtype: str):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def record(self, name: str, impl: str, dtype: str, act_ckpt: bool, batch: int, fn, resident: int,
               gmacs: Optional[float] = None, passes: int = 1, extra: Optional[dict] = None,
               memory: bool = True) -> Dict:
        """The row of one variant, timed alone."""
        variant = dict(impl=impl, act_ckpt=act_ckpt, prepare=lambda: None, fn=fn, gmacs=gmacs, extra=extra)
        return self.record_interleaved(name, dtype, batch, [variant], resident, passes, memory)[0]

    def record_interleaved(self, name: str, dtype: str, batch: int, variants: List[dict], resident: int,
                           passes: int = 1, memory: bool = True) -> List[Dict]:
        """Rows of variants timed in turn (see time_interleaved). A variant is a dict with impl,
        act_ckpt, prepare, fn and optionally gmacs and extra."""
        times, peaks = time_interleaved([(v["prepare"], v["fn"]) for v in variants], self.device,
                                        self.args.warmup, self.args.repeats, self.mem if memory else None, resident)
        return [
            self.add_row(name, v["impl"], dtype, v["act_ckpt"], batch, t, peak, v.get("gmacs"), passes, v.get("extra"))
            for v, t, peak in zip(variants, times, peaks)
        ]

    def add_row(self, name: str, impl: str, dtype: str, act_ckpt: bool, batch: int, times: List[float],
                peak: Optional[float], gmacs: Optional[float] = None, passes: int = 1,
                extra: Optional[dict] = None) -> Dict:
        t = statistics.median(times)
        row = dict(name=name, impl=impl, dtype=dtype, act_ckpt=act_ckpt, batch=batch, median_s=t,
                   times_s=times, peak_gib=peak, images_per_s=batch / t, gmacs_fwd_per_image=gmacs)
        if gmacs is not None:
            row["tflops"] = 2 * gmacs * 1e9 * passes * batch / t / 1e12
            if self.peak:
                row["fraction_of_bf16_peak"] = row["tflops"] / self.peak
        row.update(extra or {})
        self.rows.append(row)
        print(f"  {name:<22} {impl:<8} {dtype:<5} ckpt={'on ' if act_ckpt else 'off'} {t * 1e3:9.1f} ms"
              f"  peak {peak if peak is None else round(peak, 2)} GiB", flush=True)
        return row

    def backbone(self):
        a = self.args
        net = build_backbone(a, self.device)
        x = torch.randn(a.batch, 3, a.img_size, a.img_size, device=self.device)
        resident = param_bytes(net)
        set_impl(net, "eager", False)
        net.eval()
        gmacs = count_gmacs(net, (x[:1],))
        # the same function: outputs and gradients of the two paths on the same input (fp32)
        with torch.no_grad():
            outs = {}
            for impl in ("fast", "eager"):
                set_impl(net, impl, False)
                outs[impl] = net(x)
        self.checks["backbone_fast_vs_eager_max_abs_diff"] = max(
            (outs["fast"][k] - outs["eager"][k]).abs().max().item() for k in outs["fast"]
        )
        del outs
        net.train()
        for impl in ("fast", "eager"):  # in the last dtype (bf16 on a GPU)
            set_impl(net, impl, False)
            self.checks[f"backbone_fwd_bwd_ops_{impl}_{self.dtypes[-1]}"] = dispatched_ops(
                self.backbone_step(net, x, self.dtypes[-1])
            )
        net.zero_grad(set_to_none=True)
        def variant(impl: str, act_ckpt: bool, fn: Callable[[], None]) -> dict:
            return dict(impl=impl, act_ckpt=act_ckpt, fn=fn, gmacs=gmacs,
                        prepare=lambda: set_impl(net, impl, act_ckpt))

        for dtype in self.dtypes:

            def fwd():
                with torch.no_grad(), self.autocast(dtype):
                    net(x)

            self.record_interleaved("backbone fwd", dtype, a.batch,
                                    [variant(impl, False, fwd) for impl in ("fast", "eager")], resident, 1)
            fwd_bwd = self.backbone_step(net, x, dtype)
            pairs = [(impl, ckpt) for ckpt in (False, True) for impl in ("fast", "eager")
                     if self.full_matrix or not ckpt or impl == "fast"]
            self.record_interleaved("backbone fwd+bwd", dtype, a.batch,
                                    [variant(impl, ckpt, fwd_bwd) for impl, ckpt in pairs], resident, 3)
            net.zero_grad(set_to_none=True)
        if a.compile:
            self.backbone_compiled(net, x, resident, gmacs)
        del net

    def backbone_step(self, net, x, dtype: str) -> Callable[[], None]:
        """One forward+backward of the backbone (gradients of a loss over every output level)."""

        def fwd_bwd():
            net.zero_grad(set_to_none=True)
            with self.autocast(dtype):
                out = net(x)
            sum(v.float().square().mean() for v in out.values()).backward()

        return fwd_bwd

    def backbone_compiled(self, net, x, resident, gmacs):
        """fwd+bwd with torch.compile'd blocks, in the last dtype only (each dtype compiles anew)."""
        a, dtype = self.args, self.dtypes[-1]
        for act_ckpt in (False, True):
            set_impl(net, "compiled", act_ckpt)
            fwd_bwd = self.backbone_step(net, x, dtype)
            try:
                t0 = time.perf_counter()
                fwd_bwd()  # compiles (or reuses the graphs compiled without checkpointing)
                sync(self.device)
                self.checks[f"backbone_compile_s_{dtype}{'_ckpt' if act_ckpt else ''}"] = time.perf_counter() - t0
                # no CPU peak: under the dispatch mode that counts it, torch.compile runs the eager code
                self.record("backbone fwd+bwd", "compiled", dtype, act_ckpt, a.batch, fwd_bwd, resident, gmacs, 3,
                            memory=self.device.type == "cuda")
            except Exception as e:  # a compiler failure must not cost the rest of the run
                print(f"  backbone fwd+bwd compiled {dtype} ckpt={act_ckpt}: FAILED {type(e).__name__}: {str(e)[:300]}")
                self.checks[f"backbone_compiled_error_{dtype}"] = f"{type(e).__name__}: {str(e)[:300]}"
            net.zero_grad(set_to_none=True)
        set_impl(net, "fast", False)

    def maskrcnn(self):
        from detectron2.modeling import build_model
        from detectron2.utils.events import EventStorage

        a = self.args
        for act_ckpt in (False, True) if self.full_matrix else (False,):
            cfg = detection_cfg(a, act_ckpt)
            cfg.defrost()
            cfg.MODEL.DEVICE = a.device
            torch.manual_seed(0)
            model = build_model(cfg).train()
            cfg.SOLVER.FUSED = False
            unfused = build_optimizer(cfg, model)  # the recipe's layer-decay groups, one kernel per op
            cfg.SOLVER.FUSED = True
            # the default training configuration on a GPU: compiled blocks and the fused optimizer
            default = a.compile and use_fused_optimizer(cfg, model)
            fused = build_optimizer(cfg, model) if default else None
            batch = [
                {"image": torch.randint(0, 255, (3, a.img_size, a.img_size), device=self.device).float(),
                 "instances": synthetic_instances(a.img_size, self.device, seed=i), "height": a.img_size, "width": a.img_size}
                for i in range(a.batch)
            ]
            resident = param_bytes(model) * 3  # weights + AdamW's two moments (the grads are in the peak)
            for dtype in self.dtypes:

                def step(opt):
                    torch.manual_seed(0)  # the same proposal sampling in every run
                    with EventStorage(0), self.autocast(dtype):
                        losses = model(batch)
                    loss = sum(losses.values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                # "default": compiled blocks + fused AdamW (the COCO config on a GPU); only in
                # the last dtype, like the compiled backbone rows
                variants = [("fast", "fast", unfused), ("eager", "eager", unfused)]
                if default and dtype == self.dtypes[-1]:
                    variants.append(("default", "compiled", fused))
                # memory is measured after the timed runs, when AdamW's state exists
                self.record_interleaved("maskrcnn train iter", dtype, a.batch, [
                    dict(impl=name, act_ckpt=act_ckpt, fn=functools.partial(step, opt),
                         prepare=lambda impl=impl: set_impl(model, impl, act_ckpt))
                    for name, impl, opt in variants
                ], resident)
            set_impl(model, "fast", False)
            del model, unfused, fused

    def pretrain(self):
        from convmae_det.pretrain import convmae_pretrain, random_masking

        a = self.args
        torch.manual_seed(0)
        model = convmae_pretrain(a.size, img_size=a.pretrain_img_size).to(self.device)
        grid = (a.pretrain_img_size // 16, a.pretrain_img_size // 16)
        B = a.pretrain_batch
        imgs = torch.randn(B, 3, a.pretrain_img_size, a.pretrain_img_size, device=self.device)
        mask = random_masking(B, grid, 0.75, generator=torch.Generator().manual_seed(0)).to(self.device)
        resident = param_bytes(model)

        # FLOPs of one image's step: ratio 0.75 sparse and dense against ratio 0 (nothing masked)
        model.eval()
        model.set_impl("eager")
        one = imgs[:1]
        n_loss = min(B, 8)
        model.sparse = True
        full = pretrain_step_gmacs(model, one, torch.zeros_like(mask[:1]))
        sparse = pretrain_step_gmacs(model, one, mask[:1])
        model.sparse = False
        dense = pretrain_step_gmacs(model, one, mask[:1])
        losses = {}
        with torch.no_grad():
            for sparse_mode in (True, False):  # this project's step against the official computation
                model.sparse = sparse_mode
                model.set_impl("fast" if sparse_mode else "eager")
                losses[sparse_mode] = model(imgs[:n_loss], mask=mask[:n_loss])[0].item()
        self.checks.update(
            pretrain_gmacs_ratio0=full, pretrain_gmacs_sparse=sparse, pretrain_gmacs_dense=dense,
            pretrain_sparse_flops_fraction=sparse / full, pretrain_dense_flops_fraction=dense / full,
            pretrain_sparse_vs_dense_loss_abs_diff=abs(losses[True] - losses[False]),
        )
        model.train()
        masked = int(mask[0].sum())
        for dtype in self.dtypes:
            variants = [("fast", True, False), ("eager", False, False)] + ([("fast", True, True)] if self.full_matrix else [])
            if a.compile and dtype == self.dtypes[-1]:
                variants.append(("compiled", True, False))  # torch.compile'd stage-3 and decoder blocks

            def step():
                model.zero_grad(set_to_none=True)
                with self.autocast(dtype):
                    loss = model(imgs, mask=mask)[0]
                loss.backward()

            def prepare(impl: str, sparse_mode: bool, ckpt: bool) -> None:
                model.set_impl("fast" if impl == "compiled" else impl)
                model.compile_blocks(impl == "compiled")
                model.sparse = sparse_mode
                model.use_act_checkpoint = ckpt

            rows = self.record_interleaved("pretrain step", dtype, B, [
                dict(impl=impl, act_ckpt=ckpt, fn=step, prepare=functools.partial(prepare, impl, sparse_mode, ckpt),
                     gmacs=sparse if sparse_mode else dense, extra=dict(conv_stages="sparse" if sparse_mode else "dense"))
                for impl, sparse_mode, ckpt in variants
            ], resident, 3)
            for row in rows:
                row["targets_per_s"] = B * masked / row["median_s"]
            # complementary masking: 4 disjoint views of B/4 images, the same encoder batch
            model.set_impl("fast")
            model.compile_blocks(False)
            model.sparse, model.use_act_checkpoint = True, False
            k = 4
            sub = imgs[: max(B // k, 1)]

            def comp_step():
                model.zero_grad(set_to_none=True)
                with self.autocast(dtype):
                    loss = model(sub, complementary=k, generator=torch.Generator().manual_seed(0))[0]
                loss.backward()

            row = self.record("pretrain complementary", "fast", dtype, False, sub.shape[0], comp_step, resident,
                              sparse * k, 3, dict(conv_stages="sparse", views=k))
            row["targets_per_s"] = sub.shape[0] * k * masked / row["median_s"]
        del model

    def ratios(self):
        """fast / eager speed-up per row, matched on name, dtype and checkpointing."""
        index = {(r["name"], r["dtype"], r["act_ckpt"], r["impl"]): r for r in self.rows}
        for r in self.rows:
            if r["impl"] != "eager":
                e = index.get((r["name"], r["dtype"], r["act_ckpt"], "eager"))
                r["speedup_vs_eager"] = e["median_s"] / r["median_s"] if e else None
        for dtype in self.dtypes:
            for name, check in (("maskrcnn train iter", "maskrcnn_train_speedup"), ("pretrain step", "pretrain_step_speedup")):
                for impl in ("fast", "default", "compiled"):
                    r = index.get((name, dtype, False, impl))
                    if r and r.get("speedup_vs_eager"):
                        self.checks[f"{check}_{dtype}_{impl}"] = r["speedup_vs_eager"]
            for impl, suffix in (("fast", ""), ("compiled", "_compiled")):
                f = index.get(("backbone fwd+bwd", dtype, False, impl))
                c = index.get(("backbone fwd+bwd", dtype, True, impl))
                if f:
                    self.checks[f"backbone_fwd_bwd_speedup_{dtype}{suffix}"] = f["speedup_vs_eager"]
                if f and c:
                    self.checks[f"act_ckpt_time_overhead_{dtype}{suffix}"] = c["median_s"] / f["median_s"] - 1
                    if f["peak_gib"] and c["peak_gib"]:
                        self.checks[f"act_ckpt_memory_cut_{dtype}{suffix}"] = 1 - c["peak_gib"] / f["peak_gib"]


def print_table(rows: List[Dict]) -> None:
    head = f"{'row':<24}{'impl':<10}{'dtype':<6}{'ckpt':<6}{'batch':>6}{'ms':>10}{'img/s':>9}{'peak GiB':>10}{'GMAC/img':>10}{'TFLOP/s':>9}{'%peak':>7}{'x eager':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        def fmt(v, spec):
            return format(v, spec) if v is not None else format("-", spec[0] + spec[1:].split(".")[0])

        print(f"{r['name']:<24}{r['impl']:<10}{r['dtype']:<6}{'on' if r['act_ckpt'] else 'off':<6}{r['batch']:>6}"
              f"{r['median_s'] * 1e3:>10.1f}{r['images_per_s']:>9.2f}{fmt(r['peak_gib'], '>10.2f')}"
              f"{fmt(r.get('gmacs_fwd_per_image'), '>10.1f')}{fmt(r.get('tflops'), '>9.3f')}"
              f"{fmt(r.get('fraction_of_bf16_peak') and 100 * r['fraction_of_bf16_peak'], '>7.1f')}"
              f"{fmt(r.get('speedup_vs_eager'), '>9.2f')}")


def machine() -> Dict:
    info = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return info


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    bench = Bench(args)
    info = machine()
    print(f"benchmark on {info.get('gpu') or info.get('cpu')} (torch {info['torch']}, {info['threads']} threads): "
          f"{args.img_size}px batch {args.batch}, pretraining {args.pretrain_img_size}px batch {args.pretrain_batch}, "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)
    if bench.peak:
        print(f"measured bf16 matmul peak: {bench.peak:.1f} TFLOP/s")
    rows = args.rows.split(",")
    for part in ("backbone", "maskrcnn", "pretrain"):
        if part in rows:
            print(f"[{part}]", flush=True)
            getattr(bench, part)()
    bench.ratios()
    print()
    print_table(bench.rows)
    print()
    targets = {
        "backbone_fast_vs_eager_max_abs_diff": ("<=", 1e-4),
        "backbone_fwd_bwd_speedup_fp32": (">=", 1.2 if args.device == "cpu" else None),
        "backbone_fwd_bwd_speedup_bf16": (">=", 1.5),
        "backbone_fwd_bwd_speedup_bf16_compiled": (">=", 1.8),
        "maskrcnn_train_speedup_bf16_default": (">=", 1.6),
        "pretrain_step_speedup_bf16_fast": (">=", 2.0),
        "pretrain_step_speedup_bf16_compiled": (">=", 2.0),
        "act_ckpt_memory_cut_bf16_compiled": (">=", 0.4),
        "act_ckpt_time_overhead_bf16_compiled": ("<=", 0.3),
        "act_ckpt_memory_cut_fp32": (">=", 0.4),
        "act_ckpt_memory_cut_bf16": (">=", 0.4),
        "act_ckpt_time_overhead_fp32": ("<=", 0.3),
        "act_ckpt_time_overhead_bf16": ("<=", 0.3),
        "pretrain_sparse_flops_fraction": ("<=", 0.45),
        "pretrain_sparse_vs_dense_loss_abs_diff": ("<=", 1e-5),
    }
    verdicts = {}
    for k, v in bench.checks.items():
        line = f"{k:<45} {v:.4g}" if isinstance(v, float) else f"{k:<45} {v}"
        op, target = targets.get(k, (None, None))
        if target is not None and isinstance(v, float):
            ok = v <= target if op == "<=" else v >= target
            line += f"   target {op} {target}: {'met' if ok else 'NOT met'}"
            verdicts[k] = dict(op=op, target=target, met=ok)
        print(line)
    elapsed = time.time() - t0
    print(f"total {elapsed:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    result = dict(machine=info, args=vars(args), bf16_matmul_peak_tflops=bench.peak, rows=bench.rows,
                  checks=bench.checks, targets=verdicts, seconds=elapsed)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
