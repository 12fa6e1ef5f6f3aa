"""A cheap probe of what pretraining learned: frozen encoder features at object boxes, classified.

A finetune grid costs minutes per cell and seeds move it by several AP; this probe costs seconds
and is deterministic, so pretraining recipes and checkpoints can be compared along a run.

The task: the class of the object in a box, from a COCO-format instance dataset (the built-in
shapes dataset: circle, triangle, square, star, cross). For every annotated box of the first
``num_train`` images of the training split and of the first ``num_test`` validation images:

1. the encoder runs densely on the whole image, in eval mode, without gradients:
   :meth:`ConvViTBase.forward_stages` gives s4, s8, s16 (the maps the detection pyramid reads);
2. each map is ROI-aligned at the box to ``pool`` x ``pool`` cells (torchvision ``roi_align``,
   ``aligned=True``) and the cells of all maps are concatenated: one vector per box (D =
   (C1 + C2 + C3) * pool * pool);
3. the vectors are standardised with the training boxes' per-dimension mean and std (the MAE
   linear probe's BatchNorm without affine parameters), then
   - ``linear``: multinomial logistic regression (L2 ``weight_decay``), full batch, L-BFGS, fit
     on the training boxes, top-1 accuracy on the validation boxes;
   - ``knn``: the majority class of the ``k`` training boxes of highest cosine similarity.

Both numbers are accuracies in percent (chance: 100 / number of classes). Everything is
deterministic: the same encoder weights give the same numbers.
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from .data import IMAGENET_MEAN, IMAGENET_STD, to_rgb

__all__ = [
    "ProbeData",
    "load_probe_data",
    "load_shapes_probe",
    "box_features",
    "linear_probe",
    "knn_probe",
    "run_probe",
    "read_probe_log",
    "plot_probe",
]

STRIDES = {"s4": 4, "s8": 8, "s16": 16}


@dataclass
class ProbeData:
    """Images of one split (N 3 H W, ImageNet-normalised), their boxes (one (n_i, 4) XYXY float
    tensor per image) and the boxes' class indices (one (n_i,) long tensor per image)."""

    images: torch.Tensor
    boxes: List[torch.Tensor]
    labels: List[torch.Tensor]
    num_classes: int

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self.boxes)


def load_probe_data(json_file: str, image_root: str, num_images: int) -> ProbeData:
    """The first ``num_images`` images (by id) of a COCO instances json that have at least one
    box, with their boxes and contiguous class indices (by sorted category id). Images must
    share one size (the probe batches them). Errors name the file."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"probe annotations {json_file} do not exist (write the shapes dataset first)")
    with open(json_file) as f:
        coco = json.load(f)
    cat_ids = sorted(c["id"] for c in coco["categories"])
    index = {c: i for i, c in enumerate(cat_ids)}
    per_image: Dict[int, list] = {}
    for a in coco["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    images, boxes, labels = [], [], []
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    for im in sorted(coco["images"], key=lambda im: im["id"]):
        anns = per_image.get(im["id"])
        if not anns:
            continue
        path = os.path.join(image_root, im["file_name"])
        with Image.open(path) as pil:
            arr = np.asarray(to_rgb(pil), dtype=np.float32) / 255.0
        images.append((torch.from_numpy(arr).permute(2, 0, 1) - mean) / std)  # H W 3 -> 3 H W
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes.append(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))  # XYWH -> XYXY
        labels.append(torch.tensor([index[a["category_id"]] for a in anns]))
        if len(images) == num_images:
            break
    sizes = {tuple(t.shape) for t in images}
    if len(sizes) != 1:
        raise ValueError(f"{json_file}: the probe needs images of one size, found {sorted(sizes)}")
    return ProbeData(torch.stack(images), boxes, labels, len(cat_ids))


@torch.no_grad()
def box_features(encoder: nn.Module, data: ProbeData, pool: int = 2, batch_size: int = 32,
                 stages: Sequence[str] = ("s4", "s8", "s16")) -> torch.Tensor:
    """(num_boxes, D) features of ``data``'s boxes from a frozen ConvViT (or ConvMAE) encoder:
    ``forward_stages`` in eval mode, each of ``stages`` ROI-aligned at the boxes to ``pool`` x
    ``pool`` cells, concatenated. The encoder's train/eval mode is restored."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    try:
        for start in range(0, len(data.images), batch_size):
            imgs = data.images[start:start + batch_size].to(device)
            maps = dict(zip(("s4", "s8", "s16"), encoder.forward_stages(imgs)))
            rois = [b.to(device) for b in data.boxes[start:start + batch_size]]
            per_stage = [
                roi_align(maps[s].float(), rois, pool, spatial_scale=1.0 / STRIDES[s], sampling_ratio=2, aligned=True)
                .flatten(1)  # (boxes, C, pool, pool) -> (boxes, C * pool * pool)
                for s in stages
            ]
            out.append(torch.cat(per_stage, dim=1).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def _standardise(train: torch.Tensor, test: torch.Tensor):
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, weight_decay: float = 1e-2, max_iter: int = 200) -> float:
    """Top-1 accuracy (percent) on the test boxes of a multinomial logistic regression fit with
    full-batch L-BFGS on the standardised training boxes (deterministic: zero initialisation)."""
    train_x, test_x = _standardise(train_x.double(), test_x.double())
    head = nn.Linear(train_x.shape[1], num_classes).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return 100.0 * (head(test_x).argmax(1) == test_y).double().mean().item()


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              num_classes: int, k: int = 10) -> float:
    """Top-1 accuracy (percent) of a majority vote of the ``k`` most cosine-similar standardised
    training boxes (ties go to the lower class index)."""
    train_x, test_x = _standardise(train_x, test_x)
    sim = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T  # test x train
    nearest = sim.topk(min(k, len(train_x)), dim=1).indices
    votes = F.one_hot(train_y[nearest], num_classes).sum(1)
    return 100.0 * (votes.argmax(1) == test_y).float().mean().item()


def run_probe(encoder: nn.Module, train: ProbeData, test: ProbeData, pool: int = 2) -> Dict[str, float]:
    """``{"linear": accuracy, "knn": accuracy}`` (percent) of ``encoder``'s frozen box features."""
    train_x, test_x = box_features(encoder, train, pool), box_features(encoder, test, pool)
    train_y, test_y = torch.cat(train.labels), torch.cat(test.labels)
    return {
        "linear": linear_probe(train_x, train_y, test_x, test_y, train.num_classes),
        "knn": knn_probe(train_x, train_y, test_x, test_y, train.num_classes),
    }


def load_shapes_probe(root: str, num_images: int = 300):
    """(train, test) :class:`ProbeData` of a dataset in the built-in shapes layout
    (``root/annotations/instances_{train,val}.json``, images in ``root/{train,val}``): the first
    ``num_images`` training and validation images."""
    return tuple(
        load_probe_data(os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split), num_images)
        for split in ("train", "val")
    )


def read_probe_log(path: str) -> List[dict]:
    """The rows ({"step", "linear", "knn"}) of a pretraining run's ``probe.jsonl``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_probe(rows: Sequence[dict], path: str, title: str = "", chance: float = None) -> str:
    """PNG of probe accuracy against pretraining step (one line per classifier); step 0 is the
    random initialisation. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["step"])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label in (("linear", "linear probe"), ("knn", "kNN (k=10)")):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("pretraining step (0 = random initialisation)")
    ax.set_ylabel("val box classification accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
