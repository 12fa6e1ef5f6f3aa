"""Finetune grids over initialisations, labeled-split sizes and seeds: a table and a plot.

One seeded finetune is not a measurement of a recipe (kernel-level changes alone moved a
shapes run by 3 box AP), so initialisations are compared as mean +- std over seeds:

  convmae-seed-grid --out output/grid --labeled 100 300 --seeds 0 1 2 \\
      --init scratch=configs/Shapes/mask_rcnn_convmae_tiny_shapes_100.yaml \\
      --init pretrained=configs/Shapes/mask_rcnn_convmae_tiny_shapes_100_pretrained.yaml:output/demo/pretrain/convmae_tiny_d2.pth

Each cell runs ``python -m convmae_det.cli.train_net --config-file CONFIG DATASETS.TRAIN
("convmae_shapes_train_N",) SEED S OUTPUT_DIR OUT/INIT_nN_sS [MODEL.WEIGHTS W] [--opts ...]``
(convmae-train, with this convmae_det, in the current folder) and reads the final bbox and segm
AP from that run's metrics.json. Without ``--labeled`` a cell trains on its config's
DATASETS.TRAIN. ``--task sem_seg`` reads mIoU, fwIoU, mACC and pACC instead, for semantic
segmentation configs:

  convmae-seed-grid --task sem_seg --out output/semseg_seeds --seeds 0 1 2 \\
      --init random=configs/Shapes/sem_seg_convmae_tiny_shapes.yaml \\
      --init pretrained=configs/Shapes/sem_seg_convmae_tiny_shapes_pretrained.yaml
 A cell whose ``result.json`` was written by the same
command (same config file contents, same weights file size and time) is read instead of run
again, and the table says which rows were run now and which were read. Writes OUT/grid.json,
OUT/grid.md (the table) and OUT/grid.png (AP against labeled images, one line per
initialisation, error bars = std over seeds). Trailing ``--opts KEY VALUE ...`` go to every run.
"""
import argparse
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from .fileio import atomic_write

__all__ = ["main", "final_metrics", "summarize", "markdown", "plot"]

# per task: the metrics.json keys read from each run, and their column names
TASKS = {
    "instances": (("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50"), ("box AP", "box AP50", "mask AP", "mask AP50")),
    "sem_seg": (("sem_seg/mIoU", "sem_seg/fwIoU", "sem_seg/mACC", "sem_seg/pACC"), ("mIoU", "fwIoU", "mACC", "pACC")),
}
METRICS = TASKS["instances"][0]
TRAIN_NET = "convmae_det.cli.train_net"
logger = logging.getLogger("convmae_det.seed_grid")


def parse_init(text: str):
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--init takes NAME=CONFIG[:WEIGHTS], got {text!r}")
    config, _, weights = rest.partition(":")
    return name, config, weights or None


def positive(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs, grid.json, grid.md and grid.png")
    p.add_argument("--init", action="append", type=parse_init, required=True, metavar="NAME=CONFIG[:WEIGHTS]")
    p.add_argument("--labeled", type=positive, nargs="+", default=[None],
                   help="sizes of the labeled training split (convmae_shapes_train_N); default: the config's DATASETS.TRAIN")
    p.add_argument("--task", choices=sorted(TASKS), default="instances",
                   help="what the runs report: box and mask AP (instances) or mIoU, fwIoU, mACC, pACC (sem_seg)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rerun", action="store_true", help="run every cell, even those with a matching result")
    p.add_argument("--title", default="finetune on the first N shapes training images")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for every run")
    args = p.parse_args(argv)
    names = [n for n, _, _ in args.init]
    if len(set(names)) != len(names):
        p.error(f"--init names must differ, got {names}")
    for _, config, weights in args.init:
        if not os.path.isfile(config):
            p.error(f"config {config!r} does not exist")
        if weights and not os.path.isfile(weights):
            p.error(f"weights {weights!r} do not exist")
    if len(args.opts) % 2:
        p.error(f"--opts takes KEY VALUE pairs, got {args.opts}")
    return args


def _fingerprint(cmd: List[str], config: str, weights: str) -> str:
    h = hashlib.sha256(json.dumps(cmd).encode())
    with open(config, "rb") as f:
        h.update(f.read())
    if weights:
        st = os.stat(weights)
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def final_metrics(metrics_file: str, metrics=METRICS) -> Dict[str, float]:
    """The last value of each of ``metrics`` in a detectron2 metrics.json (one JSON object a line)."""
    found = {}
    with open(metrics_file) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a partial last line of an interrupted run
            found.update({k: row[k] for k in metrics if k in row})
    missing = [k for k in metrics if k not in found]
    if missing:
        raise RuntimeError(f"{metrics_file} has no {missing}: did the run evaluate?")
    return found


def _cell(name: str, labeled, seed: int) -> str:
    return f"{name} seed={seed}" if labeled is None else f"{name} n={labeled} seed={seed}"


def echo_copypaste(name: str, labeled: int, seed: int, out: str) -> None:
    """Repeat the run's detectron2 "copypaste:" lines (they are in its stdout.log)."""
    try:
        with open(os.path.join(out, "stdout.log")) as f:
            lines = [line.rstrip() for line in f if "copypaste:" in line]
    except OSError:
        return
    for line in lines:
        logger.info(f"[{_cell(name, labeled, seed)}] {line[line.index('copypaste:'):]}")


def _child_env() -> Dict[str, str]:
    """The environment of a cell: this process's, with the folder holding this convmae_det in
    front of PYTHONPATH unless it is a site folder (a clone), so the cell runs the same code."""
    import site

    import convmae_det

    env = dict(os.environ)
    parent = os.path.dirname(os.path.dirname(os.path.abspath(convmae_det.__file__)))
    sites = {os.path.abspath(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
    if parent not in sites:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (parent, env.get("PYTHONPATH")) if p)
    return env


def run_cell(args, name: str, config: str, weights: str, labeled: int, seed: int) -> Dict:
    out = os.path.join(args.out, f"{name}_s{seed}" if labeled is None else f"{name}_n{labeled}_s{seed}")
    # --overwrite: a stale cell is started over (train_net refuses a used OUTPUT_DIR); before the
    # KEY VALUE overrides, which take the rest of the command line
    cmd = [sys.executable, "-m", TRAIN_NET, "--config-file", config, "--overwrite"]
    if labeled is not None:
        cmd += ["DATASETS.TRAIN", f'("convmae_shapes_train_{labeled}",)']
    cmd += ["SEED", str(seed), "OUTPUT_DIR", out]
    if weights:
        cmd += ["MODEL.WEIGHTS", weights]
    cmd += list(args.opts)
    key = _fingerprint(cmd[1:], config, weights)
    result_file = os.path.join(out, "result.json")
    if not args.rerun and os.path.isfile(result_file):
        with open(result_file) as f:
            old = json.load(f)
        if old.get("fingerprint") == key:
            echo_copypaste(name, labeled, seed, out)
            return dict(old, how=f"read from {result_file} (run {old['finished']})")
    if os.path.exists(result_file):  # a stale cell: train_net's --overwrite removes the rest of it
        os.remove(result_file)
    os.makedirs(out, exist_ok=True)
    logger.info(f"{_cell(name, labeled, seed)}: {' '.join(cmd[1:])}")
    t0 = time.time()
    with open(os.path.join(out, "stdout.log"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
    if rc != 0:
        raise RuntimeError(f"finetune {_cell(name, labeled, seed)} failed (exit {rc}); see {out}/stdout.log")
    result = dict(init=name, config=config, weights=weights, labeled=labeled, seed=seed, command=cmd[1:],
                  fingerprint=key, seconds=round(time.time() - t0, 1),
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                  **final_metrics(os.path.join(out, "metrics.json"), TASKS[args.task][0]))
    with atomic_write(result_file) as f:
        json.dump(result, f, indent=1)
    echo_copypaste(name, labeled, seed, out)
    return dict(result, how="run now")


def summarize(cells: List[Dict], inits: List[str], sizes: List[int], metrics=METRICS) -> List[Dict]:
    rows = []
    for name in inits:
        for n in sizes:
            mine = [c for c in cells if c["init"] == name and c["labeled"] == n]
            row = dict(init=name, labeled=n, seeds=[c["seed"] for c in mine], how=sorted({c["how"].split(" (")[0] for c in mine}))
            for k in metrics:
                vals = [c[k] for c in mine]
                row[k] = vals
                row[k + " mean"] = statistics.mean(vals)
                row[k + " std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            rows.append(row)
    return rows


def markdown(rows: List[Dict], cells: List[Dict], task: str = "instances") -> str:
    metrics, labels = TASKS[task]
    lines = [f"| init | labeled images | seeds | {' | '.join(labels)} | {labels[0]} per seed | how |",
             "|---" * (len(labels) + 5) + "|"]
    for r in rows:
        if len(r["seeds"]) > 1:
            stats = " | ".join(f"{r[k + ' mean']:.2f} ± {r[k + ' std']:.2f}" for k in metrics)
        else:  # one seed: a value, no spread
            stats = " | ".join(f"{r[k + ' mean']:.2f}" for k in metrics)
        per_seed = ", ".join(f"{v:.2f}" for v in r[metrics[0]])
        labeled = "all (config)" if r["labeled"] is None else r["labeled"]
        lines.append(f"| {r['init']} | {labeled} | {len(r['seeds'])} | {stats} | {per_seed} | {', '.join(r['how'])} |")
    sources = sorted({c["how"] for c in cells if c["how"] != "run now"})
    if sources:
        lines += ["", "Rows not run now were " + "; ".join(sources) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], inits: List[str], path: str, title: str, task: str = "instances") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    metrics, labels = TASKS[task]
    for ax, metric, label in zip(axes, metrics[::2], labels[::2]):
        for name in inits:
            mine = sorted((r for r in rows if r["init"] == name), key=lambda r: r["labeled"])
            ax.errorbar([r["labeled"] for r in mine], [r[metric + " mean"] for r in mine],
                        yerr=[r[metric + " std"] for r in mine], marker="o", capsize=4, label=name)
        ax.set_xlabel("labeled training images")
        ax.set_ylabel(f"{label} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Run the grid (``argv`` as on the command line); prints the table and returns its rows."""
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    inits = [n for n, _, _ in args.init]
    cells = [run_cell(args, name, config, weights, n, s)
             for name, config, weights in args.init for n in args.labeled for s in args.seeds]
    rows = summarize(cells, inits, args.labeled, TASKS[args.task][0])
    table = markdown(rows, cells, args.task)
    with open(os.path.join(args.out, "grid.json"), "w") as f:
        json.dump(dict(rows=rows, cells=cells, args=dict(vars(args), init=[list(i) for i in args.init])), f, indent=1)
    with open(os.path.join(args.out, "grid.md"), "w") as f:
        f.write(table)
    if args.labeled != [None] and (len(args.labeled) > 1 or len(args.seeds) > 1):
        plot(rows, inits, os.path.join(args.out, "grid.png"), args.title, args.task)
    print(table, end="")
    return rows

