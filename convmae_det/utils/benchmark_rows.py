"""The rows, checks and targets of tools/benchmark.py: this project's fast path against the
official computation, for the ConvMAE detection backbone, Mask R-CNN training and ConvMAE
pretraining (see the tool's docstring for what each row measures and ``run`` for the output).

Each comparison builds two models with the same weights: the fast one, as the configs build
it, and the reference one (``MODEL.CONVMAE.IMPL eager`` for detection, ``reference=True`` for
pretraining), loaded with the fast one's state dict. Checkpointing and torch.compile are
switched on the fast model through its setters. The measuring itself is
:mod:`convmae_det.utils.profiling`.
"""
import functools
import json
import logging
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from convmae_det.solver import build_optimizer, use_fused_optimizer
from convmae_det.utils.fileio import atomic_write
from convmae_det.utils.flops import gmacs as count_gmacs, pretrain_step_gmacs
from convmae_det.utils.profiling import (
    Rows, dispatched_ops, machine, matmul_peak_tflops, param_bytes, print_table, sync, verdicts,
)

__all__ = ["BACKBONE_CONFIG", "Bench", "build_backbones", "detection_cfg", "run", "synthetic_instances", "targets"]

BACKBONE_CONFIG = "COCO/mask_rcnn_convmae_base_25ep.yaml"  # a convmae_det.model_zoo name
logger = logging.getLogger("convmae_det.benchmark")


def targets(device: str) -> Dict[str, Dict[str, Optional[float]]]:
    """The promised bounds of the checks, {"<=": {check: bound}, ">=": {...}}; None: no target
    on this device (fp32 on a GPU is launch-bound and not what the GPU recipe runs)."""
    ckpt_rows = ("fp32", "bf16", "bf16_compiled")
    return {
        "<=": dict(backbone_fast_vs_eager_max_abs_diff=1e-4, pretrain_sparse_flops_fraction=0.45,
                   pretrain_sparse_vs_dense_loss_abs_diff=1e-5,
                   **{f"act_ckpt_time_overhead_{s}": 0.3 for s in ckpt_rows}),
        ">=": dict(backbone_fwd_bwd_speedup_fp32=1.2 if device == "cpu" else None, backbone_fwd_bwd_speedup_bf16=1.5,
                   backbone_fwd_bwd_speedup_bf16_compiled=1.8, maskrcnn_train_speedup_bf16_default=1.6,
                   pretrain_step_speedup_bf16_fast=2.0, pretrain_step_speedup_bf16_compiled=2.0,
                   **{f"act_ckpt_memory_cut_{s}": 0.4 for s in ckpt_rows}),
    }


# ------------------------------------------------------------------------------------------ builders
def detection_cfg(args, impl: str = "fast"):
    """The COCO Base config at ``args.img_size`` with ``args.opts``, on the CPU, without drop
    path, checkpointing or compiled blocks (the benchmark switches those itself)."""
    from convmae_det.engine import setup_cfg
    from convmae_det.model_zoo import get_config_file

    img_size = str(args.img_size)
    return setup_cfg(
        get_config_file(BACKBONE_CONFIG),
        ["MODEL.CONVMAE.SIZE", args.size, *args.opts,
         "MODEL.CONVMAE.SQUARE_PAD", img_size, "INPUT.LSJ.IMAGE_SIZE", img_size, "INPUT.MIN_SIZE_TEST", img_size,
         "INPUT.MAX_SIZE_TEST", img_size, "MODEL.CONVMAE.USE_ACT_CHECKPOINT", "False", "MODEL.CONVMAE.COMPILE", "False",
         "MODEL.CONVMAE.IMPL", impl, "MODEL.CONVMAE.DROP_PATH_RATE", "0.0", "MODEL.DEVICE", "cpu"],
    )


def build_backbones(args, device: torch.device):
    """(fast, eager) ConvViT + simple feature pyramid, the eager one with the fast one's weights."""
    from detectron2.layers import ShapeSpec

    from convmae_det.modeling.backbone import build_convmae_sfp_backbone

    torch.manual_seed(0)
    fast, eager = (build_convmae_sfp_backbone(detection_cfg(args, impl), ShapeSpec(channels=3)) for impl in ("fast", "eager"))
    eager.load_state_dict(fast.state_dict())
    return fast.to(device), eager.to(device)


def configure(net: nn.Module, act_ckpt: bool, compiled: Optional[bool] = None) -> None:
    """Activation checkpointing on or off, and (fast encoders only) torch.compile'd blocks."""
    net.set_grad_checkpointing(act_ckpt)
    if compiled is not None:
        net.set_compile(compiled)


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
class Bench(Rows):
    """The rows of one run; ``args`` as tools/benchmark.py parses them."""

    def __init__(self, args):
        device = torch.device(args.device)
        super().__init__(device, args.warmup, args.repeats, matmul_peak_tflops(device))
        self.args = args
        self.dtypes = args.dtypes.split(",") if args.dtypes else ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
        if not set(self.dtypes) <= {"fp32", "bf16"}:
            raise ValueError(f"--dtypes takes fp32 and/or bf16, got {args.dtypes!r}")
        self.full_matrix = device.type == "cuda"  # the CPU run is trimmed to fit 10 minutes

    def autocast(self, dtype: str):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def backbone(self):
        a = self.args
        fast, eager = build_backbones(a, self.device)
        nets = dict(fast=fast, eager=eager)
        x = torch.randn(a.batch, 3, a.img_size, a.img_size, device=self.device)
        resident = param_bytes(fast)
        gmacs = count_gmacs(eager.eval(), (x[:1],))
        # the same function: outputs of the two paths on the same input (fp32)
        with torch.no_grad():
            outs = {impl: net.eval()(x) for impl, net in nets.items()}
        self.checks["backbone_fast_vs_eager_max_abs_diff"] = max(
            (outs["fast"][k] - outs["eager"][k]).abs().max().item() for k in outs["fast"]
        )
        del outs
        for impl, net in nets.items():  # in the last dtype (bf16 on a GPU)
            self.checks[f"backbone_fwd_bwd_ops_{impl}_{self.dtypes[-1]}"] = dispatched_ops(
                self.backbone_step(net.train(), x, self.dtypes[-1])
            )
            net.zero_grad(set_to_none=True)

        def variant(impl: str, act_ckpt: bool, step: Callable) -> dict:
            net = nets[impl]
            return dict(impl=impl, act_ckpt=act_ckpt, fn=step(net), gmacs=gmacs, owns=[net],
                        prepare=functools.partial(configure, net.net, act_ckpt))

        for dtype in self.dtypes:

            def fwd(net):
                def run():
                    with torch.no_grad(), self.autocast(dtype):
                        net(x)
                return run

            self.record_interleaved("backbone fwd", dtype, a.batch,
                                    [variant(impl, False, fwd) for impl in nets], resident, 1)
            # checkpointing for the eager model too on a GPU (the CPU run is trimmed)
            pairs = [("fast", False), ("eager", False), ("fast", True)] + ([("eager", True)] if self.full_matrix else [])
            self.record_interleaved("backbone fwd+bwd", dtype, a.batch, [
                variant(impl, ckpt, functools.partial(self.backbone_step, x=x, dtype=dtype)) for impl, ckpt in pairs
            ], resident, 3)
            for net in nets.values():
                net.zero_grad(set_to_none=True)
        configure(fast.net, False)
        if a.compile:
            self.backbone_compiled(fast, x, resident, gmacs, present=[eager])

    def backbone_step(self, net, x, dtype: str) -> Callable[[], None]:
        """One forward+backward of the backbone (gradients of a loss over every output level)."""

        def fwd_bwd():
            net.zero_grad(set_to_none=True)
            with self.autocast(dtype):
                out = net(x)
            sum(v.float().square().mean() for v in out.values()).backward()

        return fwd_bwd

    def backbone_compiled(self, net, x, resident, gmacs, present=()):
        """fwd+bwd with torch.compile'd blocks, in the last dtype only (each dtype compiles anew)."""
        a, dtype = self.args, self.dtypes[-1]
        for act_ckpt in (False, True):
            configure(net.net, act_ckpt, compiled=True)
            fwd_bwd = self.backbone_step(net, x, dtype)
            try:
                t0 = time.perf_counter()
                fwd_bwd()  # compiles (or reuses the graphs compiled without checkpointing)
                sync(self.device)
                self.checks[f"backbone_compile_s_{dtype}{'_ckpt' if act_ckpt else ''}"] = time.perf_counter() - t0
                # no CPU peak: under the dispatch mode that counts it, torch.compile runs the eager code
                self.record("backbone fwd+bwd", "compiled", dtype, act_ckpt, a.batch, fwd_bwd, resident, gmacs, 3,
                            memory=self.device.type == "cuda", present=present)
            except Exception as e:  # a compiler failure must not cost the rest of the run
                logger.warning(f"backbone fwd+bwd compiled {dtype} ckpt={act_ckpt}: FAILED {type(e).__name__}: {str(e)[:300]}")
                self.checks[f"backbone_compiled_error_{dtype}"] = f"{type(e).__name__}: {str(e)[:300]}"
            net.zero_grad(set_to_none=True)
        configure(net.net, False, compiled=False)

    def maskrcnn(self):
        from detectron2.modeling import build_model
        from detectron2.utils.events import EventStorage

        a = self.args
        cfgs = {}
        for impl in ("fast", "eager"):
            cfgs[impl] = detection_cfg(a, impl)
            cfgs[impl].defrost()
            cfgs[impl].MODEL.DEVICE = a.device
        torch.manual_seed(0)
        fast, eager = build_model(cfgs["fast"]).train(), build_model(cfgs["eager"]).train()
        eager.load_state_dict(fast.state_dict())
        cfg = cfgs["fast"]
        cfg.SOLVER.FUSED = False  # the recipe's layer-decay groups, one kernel per op
        unfused, eager_opt = build_optimizer(cfg, fast), build_optimizer(cfg, eager)
        cfg.SOLVER.FUSED = True
        # the default training configuration on a GPU: compiled blocks and the fused optimizer
        default = a.compile and use_fused_optimizer(cfg, fast)
        fused = build_optimizer(cfg, fast) if default else None
        batch = [
            {"image": torch.randint(0, 255, (3, a.img_size, a.img_size), device=self.device).float(),
             "instances": synthetic_instances(a.img_size, self.device, seed=i), "height": a.img_size, "width": a.img_size}
            for i in range(a.batch)
        ]
        resident = param_bytes(fast) * 3  # weights + AdamW's two moments (the grads are in the peak)

        def step(model, opt, dtype):
            torch.manual_seed(0)  # the same proposal sampling in every run
            with EventStorage(0), self.autocast(dtype):
                losses = model(batch)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for act_ckpt in (False, True) if self.full_matrix else (False,):
            for dtype in self.dtypes:
                # "default": compiled blocks + fused AdamW (the COCO config on a GPU); only in
                # the last dtype, like the compiled backbone rows
                variants = [("fast", fast, unfused, False), ("eager", eager, eager_opt, None)]
                if default and dtype == self.dtypes[-1]:
                    variants.append(("default", fast, fused, True))
                # memory is measured after the timed runs, when AdamW's state exists
                self.record_interleaved("maskrcnn train iter", dtype, a.batch, [
                    dict(impl=name, act_ckpt=act_ckpt, fn=functools.partial(step, model, opt, dtype), owns=[model, opt],
                         prepare=functools.partial(configure, model.backbone.net, act_ckpt, compiled))
                    for name, model, opt, compiled in variants
                ], resident)
        configure(fast.backbone.net, False, compiled=False)

    def pretrain(self):
        from convmae_det.pretrain import convmae_pretrain, random_masking

        a = self.args
        torch.manual_seed(0)
        fast = convmae_pretrain(a.size, img_size=a.pretrain_img_size).to(self.device)
        reference = convmae_pretrain(a.size, reference=True, img_size=a.pretrain_img_size).to(self.device)
        reference.load_state_dict(fast.state_dict())
        grid = (a.pretrain_img_size // 16, a.pretrain_img_size // 16)
        B = a.pretrain_batch
        imgs = torch.randn(B, 3, a.pretrain_img_size, a.pretrain_img_size, device=self.device)
        mask = random_masking(B, grid, 0.75, generator=torch.Generator().manual_seed(0)).to(self.device)
        resident = param_bytes(fast)

        # FLOPs of one image's step: ratio 0.75 sparse (the fast model) and dense (the reference)
        # against ratio 0 (nothing masked)
        for model in (fast, reference):
            model.eval()
        one = imgs[:1]
        n_loss = min(B, 8)
        full = pretrain_step_gmacs(reference, one, torch.zeros_like(mask[:1]))
        sparse = pretrain_step_gmacs(fast, one, mask[:1])
        dense = pretrain_step_gmacs(reference, one, mask[:1])
        with torch.no_grad():  # this project's step against the official computation
            losses = [model(imgs[:n_loss], mask=mask[:n_loss])[0].item() for model in (fast, reference)]
        self.checks.update(
            pretrain_gmacs_ratio0=full, pretrain_gmacs_sparse=sparse, pretrain_gmacs_dense=dense,
            pretrain_sparse_flops_fraction=sparse / full, pretrain_dense_flops_fraction=dense / full,
            pretrain_sparse_vs_dense_loss_abs_diff=abs(losses[0] - losses[1]),
        )
        for model in (fast, reference):
            model.train()
        masked = int(mask[0].sum())

        def step(model, images, dtype, **kw):
            model.zero_grad(set_to_none=True)
            with self.autocast(dtype):
                loss = model(images, **kw)[0]
            loss.backward()

        def variant(impl: str, model: nn.Module, act_ckpt: bool, compiled: Optional[bool], dtype: str) -> dict:
            stages, gm = ("dense", dense) if model is reference else ("sparse", sparse)
            return dict(impl=impl, act_ckpt=act_ckpt, fn=functools.partial(step, model, imgs, dtype, mask=mask), owns=[model],
                        prepare=functools.partial(configure, model, act_ckpt, compiled), gmacs=gm, extra=dict(conv_stages=stages))

        for dtype in self.dtypes:
            variants = [("fast", fast, False, False), ("eager", reference, False, None)]
            if self.full_matrix:
                variants.append(("fast", fast, True, False))
            if a.compile and dtype == self.dtypes[-1]:  # torch.compile'd stage-3 and decoder blocks
                variants.append(("compiled", fast, False, True))
            variants = [variant(*v, dtype) for v in variants]
            for row in self.record_interleaved("pretrain step", dtype, B, variants, resident, 3):
                row["targets_per_s"] = B * masked / row["median_s"]
            # complementary masking: 4 disjoint views of B/4 images, the same encoder batch
            configure(fast, False, False)
            k = 4
            sub = imgs[: max(B // k, 1)]

            def comp_step():  # the same views in every run
                step(fast, sub, dtype, complementary=k, generator=torch.Generator().manual_seed(0))

            row = self.record("pretrain complementary", "fast", dtype, False, sub.shape[0], comp_step, resident,
                              sparse * k, 3, dict(conv_stages="sparse", views=k), present=[reference])
            row["targets_per_s"] = sub.shape[0] * k * masked / row["median_s"]

    def ratios(self):
        """fast / eager speed-up per row, matched on name, dtype and checkpointing, and the checks
        drawn from them."""
        self.speedups("eager")
        index = {(r["name"], r["dtype"], r["act_ckpt"], r["impl"]): r for r in self.rows}
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


def run(args) -> dict:
    """The whole benchmark for ``args`` (tools/benchmark.py's flags): prints the rows as they
    are measured, then the table and the checks with their targets, and writes the JSON
    (machine, args, bf16_matmul_peak_tflops, rows, checks, targets, seconds) to ``args.output``."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    bench = Bench(args)
    info = machine()
    logger.info(f"benchmark on {info.get('gpu') or info.get('cpu')} (torch {info['torch']}, {info['threads']} threads): "
                f"{args.img_size}px batch {args.batch}, pretraining {args.pretrain_img_size}px batch {args.pretrain_batch}, "
                f"median of {args.repeats} after {args.warmup} warm-up")
    if bench.peak:
        logger.info(f"measured bf16 matmul peak: {bench.peak:.1f} TFLOP/s")
    rows = args.rows.split(",")
    for part in ("backbone", "maskrcnn", "pretrain"):
        if part in rows:
            logger.info(f"[{part}]")
            getattr(bench, part)()
    bench.ratios()
    print()
    print_table(bench.rows)
    print()
    met = verdicts(bench.checks, targets(args.device))
    elapsed = time.time() - t0
    logger.info(f"total {elapsed:.0f} s")
    result = dict(machine=info, args=vars(args), bf16_matmul_peak_tflops=bench.peak, rows=bench.rows,
                  checks=bench.checks, targets=met, seconds=elapsed)
    with atomic_write(args.output, "w") as f:
        json.dump(result, f, indent=1)
    logger.info(f"wrote {args.output}")
    return result
