"""Training pools: images from several folders, with every copy of a validation image taken out.

A pool is what the importance, BN-recalibration and fine-tuning stages draw from. It joins any number of
folders (``data.train_roots``), each either synset class folders or a ``labels.csv``; label ``-1`` marks an
image without an ImageNet-1k class, which is learned from through the teacher only.

A pool must never hold an image the run validates on. Copies are found by content, not by name: the same
photo resized, squashed to a square or re-encoded as JPEG (``imagenet-val-1300`` holds ILSVRC2012 val images
squashed to 227x227; Imagenette holds 9 of them with their aspect ratio kept and the shorter side at 224) has
almost the same 16x16 grey thumbnail of its whole frame. Two images are the same photo when the correlation of
their thumbnails is at least :data:`DUPLICATE_CORRELATION`. On the real data the 9 known copies correlate at
0.997 or more, and the closest distinct photos of 5000 Imagenette images against the 1300 val images at 0.958.
Crops of a photo are not caught.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ._io import atomic_write
from .data import ImageListDataset, image_dataset

DUPLICATE_CORRELATION = 0.99
THUMBNAIL = 16
BALANCE = (None, "class", "source")


@dataclass
class TrainingPool:
    """The images a run trains, calibrates and scores on.

    Attributes:
        dataset: the pooled ``(path, label)`` samples (label -1: no ImageNet class), without transform.
        sources: for every sample, the index of the folder in ``roots`` it came from.
        roots: the folders, in the order given.
        excluded: ``(pool image, validation image)`` for every pool image dropped as a copy of a
            validation image.
    """

    dataset: ImageListDataset
    sources: list[int]
    roots: list[str]
    excluded: list[tuple[str, str]] = field(default_factory=list)

    def labels(self) -> list[int]:
        """The label of every sample, -1 where it has no ImageNet class."""
        return [label for _, label in self.dataset.samples]

    def summary(self) -> dict:
        """Per-folder counts, labelled share, classes and the excluded copies (what the report records)."""
        per_root = Counter(self.sources)
        labelled = [label for label in self.labels() if label >= 0]
        return {"roots": [{"root": r, "images": per_root.get(i, 0)} for i, r in enumerate(self.roots)],
                "images": len(self.dataset), "labelled": len(labelled), "classes": len(set(labelled)),
                "excluded_val_copies": len(self.excluded),
                "excluded": [{"pool": p, "val": v} for p, v in self.excluded[:20]]}


def training_pool(roots: list[str], exclude: ImageListDataset | None = None, cache_dir: str | None = None,
                  progress: bool = True) -> TrainingPool:
    """The images of ``roots``, less every copy of an image in ``exclude`` (the validation set).

    Args:
        roots: folders of synset class folders or with a ``labels.csv`` (labels -1..999).
        exclude: images that must not be trained on; None excludes nothing.
        cache_dir: where thumbnails are cached between runs (keyed by path, size and mtime); None = no cache.
        progress: show a progress bar while thumbnails are computed.
    """
    if not roots:
        raise ValueError("data.train_roots is empty; give a list of image folders, e.g. data.train_roots=[a,b]")
    samples, sources = [], []
    for i, root in enumerate(roots):
        found = image_dataset(root).samples
        samples += found
        sources += [i] * len(found)
    pool = TrainingPool(ImageListDataset(samples), sources, list(roots))
    return pool if exclude is None else _without_copies(pool, exclude, cache_dir, progress)


def _without_copies(pool: TrainingPool, exclude: ImageListDataset, cache_dir: str | None, progress: bool) -> TrainingPool:
    paths = [p for p, _ in pool.dataset.samples]
    val_paths = [p for p, _ in exclude.samples]
    pairs = find_copies(paths, val_paths, cache_dir, progress)
    drop = {i for i, _ in pairs}
    keep = [i for i in range(len(paths)) if i not in drop]
    return TrainingPool(ImageListDataset([pool.dataset.samples[i] for i in keep]), [pool.sources[i] for i in keep],
                        pool.roots, [(paths[i], val_paths[j]) for i, j in pairs])


def find_copies(paths: list[str], reference: list[str], cache_dir: str | None = None,
                progress: bool = True) -> list[tuple[int, int]]:
    """``(i, j)`` for every image ``paths[i]`` that is the same photo as ``reference[j]`` (see module doc)."""
    if not paths or not reference:
        return []
    ref = _normalised(thumbnails(reference, cache_dir, progress))
    pool = _normalised(thumbnails(paths, cache_dir, progress))
    pairs = []
    for start in range(0, len(pool), 8192):  # chunks: a full ImageNet pool against 50k val images fits in memory
        corr = pool[start:start + 8192] @ ref.T
        best = corr.argmax(1)
        hits = np.nonzero(corr[np.arange(len(corr)), best] >= DUPLICATE_CORRELATION)[0]
        pairs += [(start + int(i), int(best[i])) for i in hits]
    return pairs


def _normalised(thumbs: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm rows: a dot product is then the correlation (brightness and contrast drop out)."""
    x = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    x -= x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def thumbnail(path: str) -> np.ndarray:
    """The whole frame of the image at ``path`` as a 16x16 grey thumbnail (uint8)."""
    with Image.open(path) as img:
        img.draft("L", (THUMBNAIL * 4, THUMBNAIL * 4))  # JPEG: decode at reduced size, much faster
        return np.asarray(img.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR), dtype=np.uint8)


def thumbnails(paths: list[str], cache_dir: str | None = None, progress: bool = True) -> np.ndarray:
    """Thumbnails of ``paths``, read from ``cache_dir`` when these very files were seen before."""
    cache = _thumbnail_cache(paths, cache_dir)
    if cache is not None and os.path.isfile(cache):
        return np.load(cache)
    bar = tqdm(paths, desc="thumbnails (val-copy check)", unit="img", disable=not progress, leave=False)
    thumbs = np.stack([_readable_thumbnail(p) for p in bar])
    if cache is not None:
        atomic_write(cache, lambda tmp: _save_array(tmp, thumbs))
    return thumbs


def _save_array(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a path
        np.save(f, array)


def _readable_thumbnail(path: str) -> np.ndarray:
    try:
        return thumbnail(path)
    except OSError as e:
        raise ValueError(f"image {path!r} cannot be read ({e}); remove or replace it") from e


def _thumbnail_cache(paths: list[str], cache_dir: str | None) -> str | None:
    if cache_dir is None:
        return None
    stats = [(p, st.st_size, st.st_mtime_ns) for p, st in ((p, os.stat(p)) for p in paths)]
    key = hashlib.sha256(json.dumps([THUMBNAIL, stats]).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, "thumbnails", f"{key}.npy")


def check_balance(balance: str | None) -> None:
    """Raise a ValueError naming ``balance`` unless it is one of :data:`BALANCE`."""
    if balance not in BALANCE:
        raise ValueError(f"data.balance={balance!r} is not one of {list(BALANCE)}; null samples every image once "
                         "per epoch, class gives every class the same share, source every folder")


def sampling_weights(pool: TrainingPool, balance: str | None) -> torch.Tensor | None:
    """Per-sample weights for sampling with replacement; None = every image once per epoch (no balancing).

    ``class``: every ImageNet class gets the same share, and every unlabelled image (label -1, which has no
    class to share) the share of one class. ``source``: every folder of ``roots`` gets the same share.
    """
    check_balance(balance)
    if balance is None:
        return None
    keys = pool.sources if balance == "source" else [(lab, i) if lab < 0 else lab for i, lab in enumerate(pool.labels())]
    counts = Counter(keys)
    return torch.tensor([1.0 / counts[k] for k in keys], dtype=torch.float64)
