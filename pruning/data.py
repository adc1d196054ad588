"""Image datasets with ImageNet-1k labels, and timm's evaluation transform.

Two layouts are read:

* a folder of class folders named by WordNet synset (ImageNet's ``train/`` or ``val/``, Imagenette): labels
  are ImageNet-1k indices (the sorted-synset order timm and torchvision use), whatever subset of classes the
  folder holds;
* a folder with ``labels.csv`` (columns ``file`` and ``label_index``), like ``imagenet-val-1300``; label -1
  marks an image without an ImageNet-1k class (``caltech101-30``), used through the teacher only.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import distributed as D

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synsets in label-index order."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


class ImageListDataset(Dataset):
    """``(image, label)`` pairs from a list of ``(path, label)``; images are converted to RGB."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), label


def _csv_samples(root: str) -> list[tuple[str, int]]:
    with open(os.path.join(root, "labels.csv")) as f:
        rows = list(csv.DictReader(f))
    if rows and not {"file", "label_index"} <= set(rows[0]):
        raise ValueError(f"{root}/labels.csv needs the columns 'file' and 'label_index', has {list(rows[0])}")
    return [(os.path.join(root, r["file"]), _label(r["label_index"], root, n)) for n, r in enumerate(rows, 2)]


def _label(value: str, root: str, line: int) -> int:
    """An ImageNet-1k index 0..999, or -1 for an image without one (learned from through the teacher only)."""
    try:
        label = int(value)
    except ValueError:
        label = None
    if label is None or not -1 <= label <= 999:
        raise ValueError(f"{root}/labels.csv line {line}: label_index {value!r} is not an ImageNet-1k index 0..999 "
                         "or -1 (no ImageNet class); fix the file")
    return label


def _synset_folder_samples(root: str) -> list[tuple[str, int]]:
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    folders = sorted(d.name for d in os.scandir(root) if d.is_dir())
    unknown = [d for d in folders if d not in index]
    if unknown:
        raise ValueError(
            f"data folder {root!r} has class folders that are not ImageNet-1k synsets, e.g. {unknown[:3]}; "
            "name class folders by synset (n01440764, ...) or give a folder with labels.csv (file,label_index)"
        )
    samples = []
    for d in folders:
        for dirpath, _, files in sorted(os.walk(os.path.join(root, d))):
            samples += [(os.path.join(dirpath, f), index[d]) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return samples


def image_dataset(root: str, transform: Callable | None = None) -> ImageListDataset:
    """The labelled images under ``root`` (synset folders or ``labels.csv``), with a clear error if none."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root!r} does not exist; point data.root at an image folder")
    has_csv = os.path.isfile(os.path.join(root, "labels.csv"))
    samples = _csv_samples(root) if has_csv else _synset_folder_samples(root)
    if not samples:
        raise ValueError(
            f"data root {root!r} holds no images: expected class folders named by synset or a labels.csv"
        )
    return ImageListDataset(samples, transform)


def eval_transform(model: nn.Module, img_size: int) -> Callable:
    """timm's evaluation transform for ``model`` at ``img_size`` (resize, center crop, its mean/std)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    return create_transform(**config)


def subset(dataset: ImageListDataset, n: int | None, seed: int = 0) -> ImageListDataset:
    """A deterministic random subset of ``n`` samples (all when ``n`` is None or too large)."""
    if n is None or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ImageListDataset([dataset.samples[i] for i in order], dataset.transform)


class ShardSampler(Sampler[int]):
    """This rank's share of the indices, ``order[rank::world]``: every sample on exactly one rank, none repeated.

    Unlike ``DistributedSampler`` nothing is padded, so metrics and statistics over the shards are exact.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, shuffle_seed: int | None = None) -> None:
        order = range(length)
        if shuffle_seed is not None:  # the permutation RandomSampler draws from the same seed
            order = torch.randperm(length, generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        self.indices = order[rank::num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: Dataset, batch_size: int = 32, workers: int = 2, shuffle_seed: int | None = None,
                pin_memory: bool = False) -> DataLoader:
    """A loader without augmentation over this rank's share of ``dataset`` (all of it in a single process).

    Args:
        shuffle_seed: visit the images in a seeded random order (so the first N are a random sample of
            classes, not the first classes); None keeps the dataset order.
        pin_memory: pin host memory for faster copies to a GPU.
    """
    sampler = ShardSampler(len(dataset), D.world_size(), D.rank(), shuffle_seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory)
