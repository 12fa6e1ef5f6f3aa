"""Unlabelled image folders for pretraining, with deterministic per-sample augmentation."""
import logging
import os
from typing import Iterator, List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

__all__ = ["IMAGE_EXTENSIONS", "list_images", "to_rgb", "ImageFolderDataset", "ResumableSampler", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
logger = logging.getLogger("convmae_det.pretrain")


def list_images(root: str) -> List[str]:
    """Every image file under ``root``, recursively, sorted (an ImageFolder layout works too)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    files = []
    for dirpath, _, names in os.walk(root, followlinks=True):
        files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    return sorted(files)


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any PIL image. 16-bit grayscale (modes ``I;16*``, and ``I``, which
    is how PIL opens 16-bit PNGs and TIFFs) is scaled from 0-65535 to 0-255, where PIL's
    ``convert`` clips it (everything above 255 turns white); palette images go through their
    palette (with transparency: through RGBA), and alpha is dropped."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        values = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


class ImageFolderDataset(Dataset):
    """Images of a folder tree, no labels.

    Items are addressed by a *key* = epoch * len + index, so that the augmentation of every
    sample is seeded by (seed, key) alone: the same run resumed at any step sees the same
    crops. An unreadable or corrupt file is reported by path (once) and replaced by the next
    readable one.
    """

    def __init__(self, root: str, transform, seed: int = 0, files: Optional[List[str]] = None):
        self.files = files if files is not None else list_images(root)
        self.transform = transform
        self.seed = seed
        self._reported = set()

    def __len__(self) -> int:
        return len(self.files)

    def _open(self, path: str):
        try:
            with Image.open(path) as im:
                return to_rgb(im)
        except Exception as e:  # PIL raises many types for corrupt files
            if path not in self._reported:
                self._reported.add(path)
                logger.warning(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
            return None

    def __getitem__(self, key: int) -> torch.Tensor:
        n = len(self.files)
        for attempt in range(min(n, 50)):
            img = self._open(self.files[(key + attempt) % n])
            if img is not None:
                torch.manual_seed(self.seed * 1_000_003 + key)  # per-sample augmentation seed
                return self.transform(img)
        raise RuntimeError(f"50 consecutive images from {self.files[key % n]} are unreadable")


class ResumableSampler(Sampler):
    """Yields keys (epoch * N + index) in a per-epoch shuffled order, seeded by (seed, epoch),
    starting at any position; with ``num_replicas`` > 1 each rank takes its strided share."""

    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, num_replicas: int = 1):
        self.n, self.seed, self.start, self.rank, self.num_replicas = n, seed, start, rank, num_replicas

    def per_epoch(self) -> int:
        return self.n // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        pos = self.start
        while True:
            epoch, offset = divmod(pos, self.per_epoch())
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g)[self.rank :: self.num_replicas][: self.per_epoch()]
            for i in order[offset:].tolist():
                yield epoch * self.n + i
            pos = (epoch + 1) * self.per_epoch()

    def __len__(self) -> int:  # infinite; the training loop counts steps
        return 2**62
