#!/usr/bin/env bash
# The GPU report of one card, in one run (about 8 minutes on an H100/H200):
#   1. tools/benchmark.py (--device cuda): the ConvMAE-B backbone at 1024 (fast vs eager, fp32 and
#      bf16, activation checkpointing, torch.compile'd blocks), a Mask R-CNN training iteration
#      and a pretraining step;
#   2. tools/train_net.py with the Base COCO recipe's model (configs/COCO/mask_rcnn_convmae_base_25ep.yaml)
#      on the built-in shapes dataset at 1024 (LSJ), AMP on, for TRAIN_ITERS iterations on one GPU,
#      then box and mask AP on the shapes val split, and a summary (iteration time, images/s,
#      peak memory, whether the losses stayed finite) in train_summary.json;
#   3. with TRAIN_EAGER=1, the same training in the eager configuration (MODEL.CONVMAE.IMPL eager,
#      COMPILE False, SOLVER.FUSED False; no evaluation), summarised in train_eager_summary.json.
# The training runs use the config's defaults: on a GPU, compiled blocks and the fused optimizer.
# With BASELINE=DIR (another checkout, e.g. `git worktree add DIR <commit>`), DIR's benchmark runs
# after the training run, with BASELINE_BENCH_ARGS (default BENCH_ARGS), into baseline.json, so
# that both codes are measured on one card in one run.
#
#   bash tools/gpu_check.sh [OUT_DIR]        (default output/gpu_check)
# Environment: PYTHON (python), BENCH_ARGS (extra benchmark arguments), BENCH_TIMEOUT (s, 300),
#   TRAIN_ITERS (200), TRAIN_BATCH (4), TRAIN_TIMEOUT (s, 300), TRAIN_WORKDIR (checkpoints and
#   metrics, kept out of OUT_DIR), TRAIN_OPTS (extra KEY VALUE overrides), TRAIN_EVAL (1: evaluate
#   on the shapes val split), TRAIN_EAGER (0), BASELINE (none).
# Each step runs even if an earlier one failed; the exit status is the first failure's.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-output/gpu_check}
PY=${PYTHON:-python}
ITERS=${TRAIN_ITERS:-200}
BATCH=${TRAIN_BATCH:-4}
WORK=${TRAIN_WORKDIR:-output/gpu_check_train}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
OUT_ABS=$(cd "$OUT" && pwd)
status=0
step() {  # step NAME LOG TIMEOUT CMD...: run, log to LOG, remember the first failure
    local name=$1 log=$2 limit=$3
    shift 3
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    if [ "$rc" != 0 ] && [ "$status" = 0 ]; then status=$rc; fi
}

summarize() {  # summarize METRICS_JSON TRAIN_LOG: the training report, as JSON
    $PY - "$1" "$2" "$BATCH" "$ITERS" <<'EOF'
import json, math, os, re, statistics, sys
path, log, batch, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(log).read() if os.path.exists(log) else ""
mem = [int(m) for m in re.findall(r"max_mem: (\d+)M", text)]
try:
    lines = [json.loads(l) for l in open(path) if l.strip()]
except OSError as e:
    print(json.dumps({"error": f"no training metrics: {e}"}))
    sys.exit(0)
train = [l for l in lines if "total_loss" in l]  # one line per 20 iterations
losses = [v for l in train for k, v in l.items() if "loss" in k]
late = [l["time"] for l in train if "time" in l and l["iteration"] >= min(50, iters // 2)]
ap = {k: v for l in lines for k, v in l.items() if k in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")}
t = statistics.median(late) if late else None
print(json.dumps(dict(
    iterations_logged=train[-1]["iteration"] + 1 if train else 0, batch=batch,
    median_iter_s_after_warmup=t, images_per_s=batch / t if t else None,
    max_mem_mib=max(mem, default=None),
    losses_finite=bool(losses) and all(math.isfinite(v) for v in losses),
    total_loss_first=train[0]["total_loss"] if train else None, total_loss_last=train[-1]["total_loss"] if train else None,
    copypaste=re.findall(r"copypaste: (.*)", text)[-4:], **ap), indent=1))
EOF
}

train() {  # train NAME WORKDIR KEY VALUE...: the Base recipe's model on the shapes dataset at 1024
    local name=$1 work=$2
    shift 2
    # shellcheck disable=SC2086
    step "$name" "$OUT/$name.log" "${TRAIN_TIMEOUT:-300}" $PY tools/train_net.py --overwrite \
        --config-file configs/COCO/mask_rcnn_convmae_base_25ep.yaml \
        DATASETS.TRAIN '("convmae_shapes_train",)' DATASETS.TEST '("convmae_shapes_val",)' \
        MODEL.ROI_HEADS.NUM_CLASSES 5 SOLVER.IMS_PER_BATCH "$BATCH" SOLVER.MAX_ITER "$ITERS" \
        SOLVER.STEPS "($((ITERS * 9 / 10)),)" SOLVER.WARMUP_ITERS $((ITERS / 4)) SOLVER.CHECKPOINT_PERIOD 1000000 \
        DATALOADER.NUM_WORKERS 8 SEED 0 OUTPUT_DIR "$work" ${TRAIN_OPTS:-} "$@"
    summarize "$work/metrics.json" "$OUT/$name.log" 2>&1 | tee "$OUT/${name}_summary.json"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    $PY -c "import torch, detectron2, fvcore, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'detectron2', detectron2.__version__, 'timm', timm.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} 2>&1 | tee "$OUT/env.txt"

step "shapes dataset" "$WORK/dataset.log" 120 $PY tools/make_shapes_dataset.py
# shellcheck disable=SC2086
step "benchmark" "$OUT/benchmark.log" "${BENCH_TIMEOUT:-300}" $PY tools/benchmark.py --output "$OUT/benchmark.json" ${BENCH_ARGS:-}
if [ "${TRAIN_EVAL:-1}" = 1 ]; then
    train train "$WORK"
else
    train train "$WORK" DATASETS.TEST '()'
fi
if [ -n "${BASELINE:-}" ]; then
    # shellcheck disable=SC2086
    step "baseline benchmark ($BASELINE)" "$OUT/baseline.log" "${BENCH_TIMEOUT:-300}" \
        bash -c "cd '$BASELINE' && exec $PY tools/benchmark.py --output '$OUT_ABS/baseline.json' ${BASELINE_BENCH_ARGS:-${BENCH_ARGS:-}}"
fi
if [ "${TRAIN_EAGER:-0}" = 1 ]; then
    train train_eager "$WORK/eager" MODEL.CONVMAE.IMPL eager MODEL.CONVMAE.COMPILE False SOLVER.FUSED False DATASETS.TEST '()'
fi
exit $status
