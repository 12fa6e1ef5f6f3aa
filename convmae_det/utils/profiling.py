"""Measuring blocks of work: time, peak memory, dispatched ops, the card's matmul peak, and the
table of rows that tools/benchmark.py prints (through :mod:`convmae_det.utils.benchmark_rows`).

A row is one way (``impl``) of running one piece of work (``name``) in one ``dtype``, with or
without activation checkpointing: the median of timed runs, the peak memory of one more run,
and, when its FLOPs are known, the achieved TFLOP/s. The variants of a row are timed in turn
(:func:`time_interleaved`) so that the ratios between them do not depend on when the machine
was busy. Nothing here knows about ConvMAE.
"""
import logging
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "PeakMemory",
    "LiveTensorBytes",
    "Rows",
    "sync",
    "time_interleaved",
    "dispatched_ops",
    "param_bytes",
    "device_bytes",
    "matmul_peak_tflops",
    "print_table",
    "verdicts",
    "machine",
]

logger = logging.getLogger("convmae_det.benchmark")


# ------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of one more run of a block of work, after its timed runs.

    GPU: torch.cuda.max_memory_allocated, less ``foreign_bytes`` (what other models that the
    run does not touch hold on the card meanwhile). CPU: the peak of the bytes held by the
    tensors the run creates (the storages of every op's outputs, counted until they are freed;
    gradients, activations saved for the backward and temporaries alike), plus the weights
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

    def measure(self, fn: Callable[[], None], resident_bytes: int, foreign_bytes: int = 0) -> Optional[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - foreign_bytes) / 2**30
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


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _held_tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, nn.Module):
        params = list(obj.parameters())
        return params + [p.grad for p in params if p.grad is not None] + list(obj.buffers())
    if isinstance(obj, torch.optim.Optimizer):
        return [t for state in obj.state.values() for t in state.values() if torch.is_tensor(t)]
    raise TypeError(f"device_bytes counts modules and optimizers, got {type(obj).__name__}")


def device_bytes(objects: Sequence[object]) -> int:
    """Bytes of GPU memory held by modules (weights, gradients, buffers) and optimizers (their
    state), each storage once."""
    storages = {}
    for obj in objects:
        for t in _held_tensors(obj):
            if t.is_cuda:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


# ------------------------------------------------------------------------------------------ time
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _nothing() -> None:
    pass


def time_interleaved(variants: Sequence[dict], device: torch.device, warmup: int, repeats: int,
                     mem: Optional[PeakMemory] = None, resident: int = 0,
                     present: Sequence[object] = ()) -> Tuple[List[List[float]], List[Optional[float]]]:
    """Times of variants timed in turn: ``repeats`` rounds of one run of each, after ``warmup``
    runs of each, so that a change in the machine's speed during the row reaches all variants
    alike (on the shared 2-core CPU a row's runs vary by 15%). Then the peak memory of one more
    run of each (None without ``mem``).

    A variant is a dict with ``fn`` (the timed work) and optionally ``prepare`` (switches the
    model to the variant, not timed) and ``owns`` (the modules and optimizers it runs). On the
    GPU a variant's peak leaves out the bytes of the other variants' modules and optimizers and
    of those in ``present`` (others on the card that no variant runs).
    """
    prepares = [v.get("prepare", _nothing) for v in variants]
    for prepare, v in zip(prepares, variants):
        prepare()
        for _ in range(warmup):
            v["fn"]()
    sync(device)
    times: List[List[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for prepare, v, out in zip(prepares, variants, times):
            prepare()
            sync(device)
            t = time.perf_counter()
            v["fn"]()
            sync(device)
            out.append(time.perf_counter() - t)
    peaks: List[Optional[float]] = []
    everything = [obj for v in variants for obj in v.get("owns", ())] + list(present)
    for prepare, v in zip(prepares, variants):
        prepare()
        if mem is None:
            peaks.append(None)
            continue
        foreign = device_bytes(everything) - device_bytes(v.get("owns", ())) if device.type == "cuda" else 0
        peaks.append(mem.measure(v["fn"], resident, foreign))
    return times, peaks


# ------------------------------------------------------------------------------------------ ops
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


def matmul_peak_tflops(device: torch.device) -> Optional[float]:
    """Measured bf16 matmul throughput of the card (8192^3, median of 20); None on the CPU."""
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


# ------------------------------------------------------------------------------------------ rows
class Rows:
    """The measured rows of a run and its named checks.

    ``warmup`` and ``repeats`` apply to every row; ``peak_tflops`` (the card's measured bf16
    matmul peak) adds each row's fraction of it.
    """

    def __init__(self, device: torch.device, warmup: int, repeats: int, peak_tflops: Optional[float] = None):
        self.device = device
        self.warmup, self.repeats = warmup, repeats
        self.peak = peak_tflops
        self.mem = PeakMemory(device)
        self.rows: List[Dict] = []
        self.checks: Dict[str, object] = {}

    def record(self, name: str, impl: str, dtype: str, act_ckpt: bool, batch: int, fn: Callable[[], None],
               resident: int, gmacs: Optional[float] = None, passes: int = 1, extra: Optional[dict] = None,
               memory: bool = True, present: Sequence[object] = ()) -> Dict:
        """The row of one variant, timed alone."""
        variant = dict(impl=impl, act_ckpt=act_ckpt, fn=fn, gmacs=gmacs, extra=extra)
        return self.record_interleaved(name, dtype, batch, [variant], resident, passes, memory, present)[0]

    def record_interleaved(self, name: str, dtype: str, batch: int, variants: List[dict], resident: int,
                           passes: int = 1, memory: bool = True, present: Sequence[object] = ()) -> List[Dict]:
        """Rows of variants timed in turn (see :func:`time_interleaved`). A variant is a dict with
        impl, act_ckpt, fn and optionally prepare, owns, gmacs (forward GMACs per image; the work
        is ``passes`` forward passes' worth: 3 for forward + backward) and extra (row fields)."""
        times, peaks = time_interleaved(variants, self.device, self.warmup, self.repeats,
                                        self.mem if memory else None, resident, present)
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
        logger.info(f"{name:<22} {impl:<8} {dtype:<5} ckpt={'on ' if act_ckpt else 'off'} {t * 1e3:9.1f} ms"
                    f"  peak {peak if peak is None else round(peak, 2)} GiB")
        return row

    def speedups(self, baseline: str = "eager") -> None:
        """Each row's ``speedup_vs_<baseline>``: the baseline row's time over its own, matched
        on name, dtype and checkpointing (None without such a row)."""
        index = {(r["name"], r["dtype"], r["act_ckpt"], r["impl"]): r for r in self.rows}
        for r in self.rows:
            if r["impl"] != baseline:
                b = index.get((r["name"], r["dtype"], r["act_ckpt"], baseline))
                r[f"speedup_vs_{baseline}"] = b["median_s"] / r["median_s"] if b else None


def print_table(rows: List[Dict]) -> None:
    head = (f"{'row':<24}{'impl':<10}{'dtype':<6}{'ckpt':<6}{'batch':>6}{'ms':>10}{'img/s':>9}{'peak GiB':>10}"
            f"{'GMAC/img':>10}{'TFLOP/s':>9}{'%peak':>7}{'x eager':>9}")
    print(head)
    print("-" * len(head))

    def fmt(v, spec):
        return format(v, spec) if v is not None else format("-", spec[0] + spec[1:].split(".")[0])

    for r in rows:
        print(f"{r['name']:<24}{r['impl']:<10}{r['dtype']:<6}{'on' if r['act_ckpt'] else 'off':<6}{r['batch']:>6}"
              f"{r['median_s'] * 1e3:>10.1f}{r['images_per_s']:>9.2f}{fmt(r['peak_gib'], '>10.2f')}"
              f"{fmt(r.get('gmacs_fwd_per_image'), '>10.1f')}{fmt(r.get('tflops'), '>9.3f')}"
              f"{fmt(r.get('fraction_of_bf16_peak') and 100 * r['fraction_of_bf16_peak'], '>7.1f')}"
              f"{fmt(r.get('speedup_vs_eager'), '>9.2f')}")


def verdicts(checks: Dict[str, object], targets: Dict[str, Dict[str, Optional[float]]]) -> Dict[str, dict]:
    """Print every check, with its target where ``targets`` ({"<=": {name: bound}, ">=": ...};
    a bound of None: no target here) has one, and return {name: dict(op, target, met)}."""
    bounds = {name: (op, bound) for op, named in targets.items() for name, bound in named.items()}
    out = {}
    for k, v in checks.items():
        line = f"{k:<45} {v:.4g}" if isinstance(v, float) else f"{k:<45} {v}"
        op, target = bounds.get(k, (None, None))
        if target is not None and isinstance(v, float):
            ok = v <= target if op == "<=" else v >= target
            line += f"   target {op} {target}: {'met' if ok else 'NOT met'}"
            out[k] = dict(op=op, target=target, met=ok)
        print(line)
    return out


def machine() -> Dict:
    """torch version, threads, CPU count, the CPU's model name and the GPU's, where there is one."""
    info = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return info
