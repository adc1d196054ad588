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

Making the thumbnails decodes every image, so the same pass finds the images that cannot be decoded (truncated
or corrupt files): they are dropped and listed (``TrainingPool.unreadable``, :func:`readable_images`) before any
training starts. The pass is cached with the thumbnails (keyed by every file's path, size and mtime), so it costs
a run nothing after the first; scanning here rather than catching decode errors only in the loader gives exact
counts for the report, and a loader cannot drop a sample without changing the epoch's length.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ._io import atomic_write, short_hash
from .data import DECODE_ERRORS, ImageListDataset, image_dataset
from .errors import UserInputError

log = logging.getLogger("pruning")

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
        unreadable: the images dropped because they cannot be decoded (found when the pool is scanned).
    """

    dataset: ImageListDataset
    sources: list[int]
    roots: list[str]
    excluded: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def labels(self) -> list[int]:
        """The label of every sample, -1 where it has no ImageNet class."""
        return [label for _, label in self.dataset.samples]

    def summary(self) -> dict:
        """Per-folder counts, labelled share, classes, the excluded copies and the unreadable images (what the
        report records)."""
        per_root = Counter(self.sources)
        labelled = [label for label in self.labels() if label >= 0]
        return {"roots": [{"root": r, "images": per_root.get(i, 0)} for i, r in enumerate(self.roots)],
                "images": len(self.dataset), "labelled": len(labelled), "classes": len(set(labelled)),
                "excluded_val_copies": len(self.excluded),
                "excluded": [{"pool": p, "val": v} for p, v in self.excluded[:20]],
                "unreadable_images": len(self.unreadable), "unreadable": self.unreadable[:20]}


def training_pool(roots: list[str], exclude: ImageListDataset | None = None, cache_dir: str | None = None,
                  progress: bool = True, scan: bool = False) -> TrainingPool:
    """The images of ``roots``, less every copy of an image in ``exclude`` (the validation set).

    Args:
        roots: folders of synset class folders or with a ``labels.csv`` (labels -1..999).
        exclude: images that must not be trained on; None excludes nothing.
        cache_dir: where thumbnails are cached between runs (keyed by path, size and mtime); None = no cache.
        progress: show a progress bar while thumbnails are computed.
        scan: decode every image even without ``exclude``. Whenever the images are decoded (``exclude`` given
            or ``scan``), those that cannot be are dropped and listed in ``unreadable``.
    """
    if not roots:
        raise UserInputError("data.train_roots is empty; give a list of image folders, e.g. data.train_roots=[a,b]")
    samples, sources = [], []
    for i, root in enumerate(roots):
        found = image_dataset(root).samples
        samples += found
        sources += [i] * len(found)
    pool = TrainingPool(ImageListDataset(samples), sources, list(roots))
    return pool if exclude is None and not scan else _checked(pool, exclude, cache_dir, progress)


def _checked(pool: TrainingPool, exclude: ImageListDataset | None, cache_dir: str | None,
             progress: bool) -> TrainingPool:
    """``pool`` less its unreadable images and every copy of an image of ``exclude``."""
    paths = [p for p, _ in pool.dataset.samples]
    thumbs, unreadable = thumbnails(paths, cache_dir, progress)
    val_paths = [p for p, _ in exclude.samples] if exclude is not None else []
    pairs = _matches(thumbs, thumbnails(val_paths, cache_dir, progress)[0]) if val_paths else []
    drop = set(unreadable) | {i for i, _ in pairs}
    keep = [i for i in range(len(paths)) if i not in drop]
    return TrainingPool(ImageListDataset([pool.dataset.samples[i] for i in keep]), [pool.sources[i] for i in keep],
                        pool.roots, [(paths[i], val_paths[j]) for i, j in pairs], [paths[i] for i in unreadable])


def readable_images(dataset: ImageListDataset, cache_dir: str | None = None,
                    progress: bool = True) -> tuple[ImageListDataset, list[str]]:
    """``dataset`` less the images that cannot be decoded, and their paths (the scan shares the thumbnail cache)."""
    paths = [p for p, _ in dataset.samples]
    unreadable = set(thumbnails(paths, cache_dir, progress)[1]) if paths else set()
    kept = [s for i, s in enumerate(dataset.samples) if i not in unreadable]
    return ImageListDataset(kept, dataset.transform), [paths[i] for i in sorted(unreadable)]


def find_copies(paths: list[str], reference: list[str], cache_dir: str | None = None,
                progress: bool = True) -> list[tuple[int, int]]:
    """``(i, j)`` for every image ``paths[i]`` that is the same photo as ``reference[j]`` (see module doc).

    Unreadable images match nothing.
    """
    if not paths or not reference:
        return []
    return _matches(thumbnails(paths, cache_dir, progress)[0], thumbnails(reference, cache_dir, progress)[0])


def _matches(thumbs: np.ndarray, reference: np.ndarray) -> list[tuple[int, int]]:
    """``(i, j)`` for every thumbnail ``thumbs[i]`` whose best match ``reference[j]`` correlates enough."""
    ref, pool = _normalised(reference), _normalised(thumbs)  # an unreadable image's zeros correlate 0 with all
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


def thumbnails(paths: list[str], cache_dir: str | None = None, progress: bool = True) -> tuple[np.ndarray, list[int]]:
    """Thumbnails of ``paths`` and the indices of the images that cannot be decoded (their thumbnails are 0).

    Read from ``cache_dir`` when these very files were seen before; a cache file that cannot be read is
    computed again.
    """
    cache = _thumbnail_cache(paths, cache_dir)
    cached = _load_thumbnails(cache, len(paths)) if cache is not None and os.path.isfile(cache) else None
    if cached is not None:
        return cached
    bar = tqdm(paths, desc="thumbnails (val-copy and image check)", unit="img", disable=not progress, leave=False)
    found = [_thumbnail_or_none(p) for p in bar]
    unreadable = [i for i, t in enumerate(found) if t is None]
    thumbs = np.zeros((len(paths), THUMBNAIL, THUMBNAIL), dtype=np.uint8)  # unreadable images keep zeros
    for i, t in enumerate(found):
        if t is not None:
            thumbs[i] = t
    if cache is not None:
        atomic_write(cache, lambda tmp: _save_thumbnails(tmp, thumbs, unreadable))
    return thumbs, unreadable


def _save_thumbnails(path: str, thumbs: np.ndarray, unreadable: list[int]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path
        np.savez(f, thumbs=thumbs, unreadable=np.asarray(unreadable, dtype=np.int64))


def _load_thumbnails(path: str, n: int) -> tuple[np.ndarray, list[int]] | None:
    """A cached ``(thumbnails, unreadable)``; None when the file is corrupt or holds another count (recompute)."""
    try:
        with np.load(path) as f:
            thumbs, unreadable = f["thumbs"], f["unreadable"].tolist()
    except Exception:  # truncated or foreign: the thumbnails are recomputed and the file rewritten
        return None
    return (thumbs, unreadable) if len(thumbs) == n else None


def _thumbnail_or_none(path: str) -> np.ndarray | None:
    """The thumbnail of ``path``, or None when the image cannot be decoded."""
    try:
        return thumbnail(path)
    except DECODE_ERRORS as e:
        log.debug("image %r cannot be decoded (%s: %s)", path, type(e).__name__, e)  # the caller reports them all
        return None


def _thumbnail_cache(paths: list[str], cache_dir: str | None) -> str | None:
    if cache_dir is None:
        return None
    stats = [(p, st.st_size, st.st_mtime_ns) for p, st in ((p, os.stat(p)) for p in paths)]
    key = short_hash([THUMBNAIL, stats])
    return os.path.join(cache_dir, "thumbnails", f"{key}.npz")  # .npz: thumbnails and the unreadable images


def check_balance(balance: str | None) -> None:
    """Raise a :class:`UserInputError` naming ``balance`` unless it is one of :data:`BALANCE`."""
    if balance not in BALANCE:
        raise UserInputError(f"data.balance={balance!r} is not one of {list(BALANCE)}; null samples every image once "
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
