"""Image datasets with ImageNet-1k labels, and timm's evaluation transform.

Two layouts are read:

* a folder of class folders named by WordNet synset (ImageNet's ``train/`` or ``val/``, Imagenette): labels
  are ImageNet-1k indices (the sorted-synset order timm and torchvision use), whatever subset of classes the
  folder holds;
* a folder with ``labels.csv`` (columns ``file`` and ``label_index``), like ``imagenet-val-1300``; label -1
  marks an image without an ImageNet-1k class (``caltech101-30``), used through the teacher only.

A folder that cannot be read as one of these (no images, an empty class folder, a ``labels.csv`` with missing
columns, values or files, or labels outside -1..999) is refused with a :class:`~pruning.errors.UserInputError`
naming the folder, the line or the files, and the fix. An image that cannot be decoded is another matter: the
pipeline's preflight finds and drops such images (:func:`pruning.pools.readable_images`), and
:class:`ImageListDataset` puts a readable image in the place of one that breaks later.
"""
from __future__ import annotations

import csv
import logging
import os
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import distributed as D
from .errors import MissingInputError, UserInputError

log = logging.getLogger("pruning")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# what PIL raises for a truncated, corrupt or vanished image file (UnidentifiedImageError is an OSError)
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)
_SUBSTITUTE_TRIES = 16


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synsets in label-index order."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def load_rgb(path: str) -> Image.Image:
    """The image at ``path``, decoded and converted to RGB (raises one of :data:`DECODE_ERRORS` if it cannot be)."""
    with Image.open(path) as img:
        return img.convert("RGB")


class ImageListDataset(Dataset):
    """``(image, label)`` pairs from a list of ``(path, label)``; images are converted to RGB.

    An image that cannot be decoded is replaced by the next readable sample (image and label), the same one
    every time, and its path is logged once per process. The preflight scan has already dropped the images
    that were unreadable when the run started (:func:`pruning.pools.readable_images`, counted in the report),
    so this only covers a file that breaks or vanishes during a long run: better one image seen twice than a
    fine-tuning run lost hours in.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.replaced: set[str] = set()  # paths replaced in this process

    def with_transform(self, transform: Callable | None) -> ImageListDataset:
        """The same images under ``transform``: a new dataset, this one left as it is (shared datasets keep theirs)."""
        return ImageListDataset(self.samples, transform)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img, label = self._readable(i)
        return (self.transform(img) if self.transform else img), label

    def _readable(self, i: int) -> tuple[Image.Image, int]:
        """Sample ``i``'s image and label, or those of the next readable sample when it cannot be decoded."""
        for j in range(i, i + min(_SUBSTITUTE_TRIES, len(self.samples))):
            path, label = self.samples[j % len(self.samples)]
            try:
                return load_rgb(path), label
            except DECODE_ERRORS as e:
                self._report(path, e)
        raise UserInputError(f"{_SUBSTITUTE_TRIES} images in a row from {self.samples[i][0]!r} on cannot be decoded; "
                             "check that the data folder is mounted and readable, then rerun (the run resumes)")

    def _report(self, path: str, error: BaseException) -> None:
        if path not in self.replaced:
            self.replaced.add(path)
            log.warning("image %r cannot be decoded (%s: %s); a readable image of the dataset takes its place. "
                        "Remove or replace the file", path, type(error).__name__, error)


def _csv_samples(root: str) -> list[tuple[str, int]]:
    """The rows of ``root/labels.csv`` as ``(path, label)``; every row must name an existing file and a label."""
    csv_path = os.path.join(root, "labels.csv")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        if not {"file", "label_index"} <= set(columns):
            raise UserInputError(f"{csv_path} needs the columns 'file' and 'label_index' (a header line "
                                 f"'file,label_index'), has {columns}; fix its header")
        samples = [_csv_row(row, root, n) for n, row in enumerate(reader, 2)]
    _check_files_exist(samples, csv_path)
    return samples


def _csv_row(row: dict, root: str, line: int) -> tuple[str, int]:
    """One labels.csv row as ``(path, label)``, refusing a row without a file name or a label."""
    file = (row.get("file") or "").strip()
    if not file:
        raise UserInputError(f"{root}/labels.csv line {line}: no file name in column 'file' ({row}); fix the file")
    return os.path.join(root, file), _label(row.get("label_index"), root, line)


def _check_files_exist(samples: list[tuple[str, int]], csv_path: str) -> None:
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if missing:
        raise UserInputError(
            f"{csv_path} lists {len(missing)} files that do not exist, e.g. {missing[:3]}; its 'file' column holds "
            "paths relative to the folder of labels.csv: fix the paths or restore the files"
        )


def _label(value: str | None, root: str, line: int) -> int:
    """An ImageNet-1k index 0..999, or -1 for an image without one (learned from through the teacher only)."""
    try:
        label = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        label = None
    if label is None or not -1 <= label <= 999:
        raise UserInputError(f"{root}/labels.csv line {line}: label_index {value!r} is not an ImageNet-1k index "
                             "0..999 or -1 (no ImageNet class); fix the file")
    return label


def _synset_folder_samples(root: str) -> list[tuple[str, int]]:
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    folders = sorted(d.name for d in os.scandir(root) if d.is_dir())
    unknown = [d for d in folders if d not in index]
    if unknown:
        raise UserInputError(
            f"data folder {root!r} has class folders that are not ImageNet-1k synsets, e.g. {unknown[:3]}; "
            "name class folders by synset (n01440764, ...) or give a folder with labels.csv (file,label_index)"
        )
    per_class = {d: _folder_images(os.path.join(root, d)) for d in folders}
    empty = [d for d, paths in per_class.items() if not paths]
    if empty and len(empty) < len(folders):  # all empty: image_dataset says the folder holds no images
        raise UserInputError(
            f"data folder {root!r} has {len(empty)} empty class folders (no {'/'.join(IMG_EXTENSIONS)} files), e.g. "
            f"{empty[:3]}: their classes would silently be missing. Restore their images, or delete the empty folders"
        )
    return [(p, index[d]) for d, paths in per_class.items() for p in paths]


def _folder_images(folder: str) -> list[str]:
    """The image files under ``folder`` (recursively), in a stable order."""
    paths = []
    for dirpath, _, files in sorted(os.walk(folder)):
        paths += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return paths


def image_dataset(root: str, transform: Callable | None = None) -> ImageListDataset:
    """The labelled images under ``root`` (synset folders or ``labels.csv``).

    Raises:
        MissingInputError: ``root`` does not exist.
        UserInputError: no images, an empty class folder, or a bad ``labels.csv`` (see the module doc).
    """
    if not os.path.isdir(root):
        raise MissingInputError(f"data root {root!r} does not exist; point data.root at an image folder")
    has_csv = os.path.isfile(os.path.join(root, "labels.csv"))
    samples = _csv_samples(root) if has_csv else _synset_folder_samples(root)
    if not samples:
        raise UserInputError(
            f"data root {root!r} holds no images: expected class folders named by synset or a labels.csv"
        )
    return ImageListDataset(samples, transform)


def eval_transform(model: nn.Module, img_size: int) -> Callable:
    """timm's evaluation transform for ``model`` at ``img_size`` (resize, center crop, its mean/std)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    return create_transform(**config)


def random_indices(length: int, n: int, seed: int) -> list[int]:
    """``n`` of ``range(length)`` drawn without repeats by a permutation seeded with ``seed``, in increasing order:
    the samples :func:`subset` keeps, and the images the pipeline holds out for validation."""
    return sorted(torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def subset(dataset: ImageListDataset, n: int | None, seed: int = 0) -> ImageListDataset:
    """A deterministic random subset of ``n`` samples (all when ``n`` is None or too large)."""
    if n is None or n >= len(dataset):
        return dataset
    return ImageListDataset([dataset.samples[i] for i in random_indices(len(dataset), n, seed)], dataset.transform)


def take_images(batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], num_images: int, desc: str,
                progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The first ``num_images`` images of ``batches``, with a progress bar.

    Yields ``(images, labels)`` batches as they come, the last one cut to ``num_images`` in all, and stops there
    without drawing another batch.

    Args:
        batches: ``(images, labels)`` batches (a data loader); labels may be None.
        num_images: how many images to take.
        desc: the progress bar's label.
        progress: show the progress bar.
    """
    seen = 0
    with tqdm(total=num_images, desc=desc, unit="img", disable=not progress) as bar:
        for images, labels in batches:
            left = num_images - seen
            images, labels = images[:left], (labels[:left] if labels is not None else None)
            yield images, labels
            seen += len(images)
            bar.update(len(images))
            if seen >= num_images:
                break


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
                pin_memory: bool = False, shard: bool = False, transform: Callable | None = None) -> DataLoader:
    """A loader without augmentation over ``dataset``, or over this process's share of it.

    Args:
        dataset: ``(image, label)`` pairs; with ``transform``, an :class:`ImageListDataset`.
        shuffle_seed: visit the images in a seeded random order (so the first N are a random sample of
            classes, not the first classes); None keeps the dataset order.
        pin_memory: pin host memory for faster copies to a GPU.
        shard: in a distributed run, give each process its own share (the caller then reduces across
            processes); False: every process sees all of ``dataset``. A single process always sees all of it.
        transform: load the images under this transform (:meth:`ImageListDataset.with_transform`: ``dataset``
            itself is left unchanged); None: as ``dataset`` gives them.
    """
    if transform is not None:
        dataset = dataset.with_transform(transform)
    world, rank = (D.world_size(), D.rank()) if shard else (1, 0)
    sampler = ShardSampler(len(dataset), world, rank, shuffle_seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory)
