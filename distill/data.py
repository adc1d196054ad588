"""Training data: timm's training transform, a data order and augmentation that a resumed run replays exactly.

The order of epoch ``e`` is a permutation seeded by ``(seed, e)`` (torch's DistributedSampler, which also
shards it across ranks), and each sample's augmentation is seeded by ``(seed, e, index)``. Neither depends on
the process's global random state, the number of loader workers, or where a run was interrupted: resuming at
batch ``k`` of epoch ``e`` skips the first ``k`` batches and sees the very images the uninterrupted run saw.
"""
from __future__ import annotations

import copy
import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


def train_transform(model: nn.Module, img_size: int) -> Callable:
    """timm's training transform (random resized crop, flip, colour jitter) for ``model`` at ``img_size``.

    Mean, std and interpolation come from the model's ``pretrained_cfg``.
    """
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    return create_transform(**config, is_training=True)


def with_transform(dataset: Dataset, transform: Callable) -> Dataset:
    """``dataset`` under ``transform`` when it has none (``image_dataset(root)`` without one), else ``dataset``.

    ``dataset`` itself is never changed: an :class:`~pruning.data.ImageListDataset` gives a new view of its images
    (:meth:`~pruning.data.ImageListDataset.with_transform`), any other dataset with a ``transform`` attribute of
    None a shallow copy.
    """
    if getattr(dataset, "transform", "absent") is not None:
        return dataset
    if hasattr(dataset, "with_transform"):
        return dataset.with_transform(transform)
    dataset = copy.copy(dataset)
    dataset.transform = transform
    return dataset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class EpochSeededDataset(Dataset):
    """Wraps a dataset so each item's random augmentation is seeded by ``(seed, epoch, index)``.

    The global torch, numpy and python random states are saved and restored around each item, so loading
    data never perturbs the training process's random stream (dropout, drop path).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s augmentation seeds."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (shuffled per epoch by ``seed + epoch``, sharded, last partial batch dropped)
    that can start ``start`` samples into this rank's shard: the position of an interrupted epoch.

    With ``weights`` an epoch is instead ``len(dataset)`` draws with replacement in proportion to them (class- or
    source-balanced sampling), seeded the same way, so a resumed epoch still replays the same images.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int,
                 weights: torch.Tensor | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        if weights is not None and len(weights) != len(dataset):
            raise ValueError(f"{len(weights)} sampling weights for {len(dataset)} images")
        self.batch_size = batch_size
        self.weights = weights
        self.start = 0

    def batches_per_epoch(self) -> int:
        """Full batches of this rank's shard (every rank gets the same count)."""
        return self.num_samples // self.batch_size

    def set_position(self, epoch: int, batch: int) -> None:
        """Begin epoch ``epoch`` at its batch ``batch``."""
        self.set_epoch(epoch)
        self.start = batch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__()) if self.weights is None else self._weighted()
        return iter(indices[: self.batches_per_epoch() * self.batch_size][self.start:])

    def _weighted(self) -> list[int]:
        """This rank's share of the epoch's weighted draws (every rank draws the same list, then shards it)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator).tolist()
        return draws[self.rank:self.total_size:self.num_replicas]

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size - self.start


def train_loader(
    dataset: EpochSeededDataset, sampler: ResumableSampler, workers: int, pin_memory: bool
) -> DataLoader:
    """Full batches in the sampler's order; the loader's own seed generator keeps the global RNG untouched."""
    generator = torch.Generator().manual_seed(dataset.seed * 7919 + sampler.epoch)
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True, generator=generator)
