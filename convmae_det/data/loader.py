"""A detection training stream that resumes at any iteration with the batches and augmentations
an uninterrupted run would have seen.

detectron2's training loader starts its sampler over in every process, and the augmentation
draws come from each worker's generator, seeded anew whenever the loader starts: a resumed run
sees other batches than the run it continues. Here

- the *order* is detectron2's own sampler (``DATALOADER.SAMPLER_TRAIN``, seeded by the run's data
  seed) and its batching (``DATALOADER.ASPECT_RATIO_GROUPING``: the two aspect-ratio buckets of
  ``AspectRatioGroupedDataset``, decided from the dataset dicts' width and height). Resuming at
  iteration i replays the index stream of the first i batches (integers only, no image is
  read; about a second for a million indices) and starts loading at batch i;
- each sample's random draws (flip, resize, crop) depend only on (data seed, rank, position in
  the stream), by seeding ``random``, NumPy and torch before the mapper runs, whichever worker
  maps it (:func:`sample_seed`), and restoring the generators after.

The model's own draws (RPN and ROI sampling, drop path) are seeded per iteration by the trainer
(:func:`iteration_seed`).
"""
import contextlib
import hashlib
import logging
import random
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import RandomSubsetTrainingSampler, RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset

__all__ = ["ResumableTrainLoader", "build_train_sampler", "iteration_seed", "sample_seed", "seed_everything"]

logger = logging.getLogger("convmae_det")


def _hash_seed(*parts) -> int:
    """A 31-bit seed from integers, the same in every process and Python run."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31)


def sample_seed(seed: int, rank: int, position: int) -> int:
    """Seed of the sample at ``position`` of the stream of process ``rank``."""
    return _hash_seed("sample", seed, rank, position)


def iteration_seed(seed: int, rank: int, iteration: int) -> int:
    """Seed of the model's random draws in ``iteration`` on process ``rank``."""
    return _hash_seed("iteration", seed, rank, iteration)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _seeded(seed: int):
    """The global generators seeded with ``seed`` inside, and as they were after: without
    workers the samples are mapped in the training process, whose own draws (the model's) must
    not depend on it."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_everything(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def build_train_sampler(cfg, dataset_dicts: Sequence[dict], seed: int):
    """detectron2's ``DATALOADER.SAMPLER_TRAIN`` for ``dataset_dicts``, with an explicit seed."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset_dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD)
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(
            len(dataset_dicts), cfg.DATALOADER.RANDOM_SUBSET_RATIO, seed_shuffle=seed, seed_subset=seed
        )
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN {name!r}: expected TrainingSampler, RepeatFactorTrainingSampler or RandomSubsetTrainingSampler"
    )


class _BatchKeys:
    """Batches of (position, index) of one process, as detectron2 groups them, from batch ``start`` on."""

    def __init__(self, sampler, buckets: bytes, batch_size: int, start: int):
        self.sampler, self.buckets, self.batch_size, self.start = sampler, buckets, batch_size, start

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        pending: List[List[Tuple[int, int]]] = [[], []]
        made = 0
        for position, index in enumerate(self.sampler):
            bucket = pending[self.buckets[index]]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                del bucket[:]
                if made >= self.start:
                    yield batch
                made += 1


class _SeededSamples(Dataset):
    """``mapper(dicts[index])`` with the generators seeded by the sample's stream position; an
    error names the image file."""

    def __init__(self, dicts: Sequence[dict], mapper: Callable, seed: int, rank: int):
        self.dicts, self.mapper, self.seed, self.rank = DatasetFromList(list(dicts), copy=False), mapper, seed, rank

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, key: Tuple[int, int]):
        position, index = key
        with _seeded(sample_seed(self.seed, self.rank, position)):
            return self._map(index)

    def _map(self, index: int):
        for attempt in range(len(self.dicts)):  # as detectron2's MapDataset: a None result takes another sample
            d = self.dicts[(index + attempt) % len(self.dicts)]
            try:
                out = self.mapper(d)
            except Exception as e:
                raise RuntimeError(f"training image {d.get('file_name')!r}: {type(e).__name__}: {e}") from e
            if out is not None:
                return out
            if attempt == 0:
                logger.warning(f"the mapper returned None for {d.get('file_name')!r}; taking the next image")
        raise RuntimeError("the mapper returned None for every image of the dataset")


class ResumableTrainLoader:
    """The training batches of ``dataset_dicts`` (lists of mapped dicts, ``batch_size`` per
    process), from iteration ``start`` on; iterate it like detectron2's train loader. The
    trainer sets ``seed`` and ``start`` when it resumes (:meth:`set_position`)."""

    def __init__(self, cfg, dataset_dicts: Sequence[dict], mapper: Callable, seed: int):
        world = comm.get_world_size()
        total = cfg.SOLVER.IMS_PER_BATCH
        if total <= 0 or total % world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH {total} must be a positive multiple of the {world} process(es)")
        self.cfg, self.dicts, self.mapper = cfg, dataset_dicts, mapper
        self.batch_size = total // world
        self.num_workers = cfg.DATALOADER.NUM_WORKERS
        grouping = cfg.DATALOADER.ASPECT_RATIO_GROUPING
        # AspectRatioGroupedDataset's buckets: 0 if wider than high, else 1
        self.buckets = bytes(0 if grouping and d.get("width", 0) > d.get("height", 0) else 1 for d in dataset_dicts)
        self.rank = comm.get_rank()
        self.seed, self.start = seed, 0

    def set_position(self, seed: int, start: int) -> None:
        self.seed, self.start = int(seed), int(start)

    def __iter__(self):
        return self._batches(self.seed, self.start)

    def _batches(self, seed: int, start: int):
        # a generator: nothing is built or read before the first batch is asked for
        sampler = build_train_sampler(self.cfg, self.dicts, seed)
        if start:
            logger.info(f"training data: skipping the {start} batches of the first {start} iterations (indices only)")
        loader = DataLoader(
            _SeededSamples(self.dicts, self.mapper, seed, self.rank),
            batch_sampler=_BatchKeys(sampler, self.buckets, self.batch_size, start),
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            generator=torch.Generator().manual_seed(seed),  # the global generator stays the model's
        )
        yield from loader
