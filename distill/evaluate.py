"""Validation: top-1/top-5 and throughput of the student, side by side with the (cached) teacher's; of any model on
an image folder with :func:`evaluate_folder`.

Under torch.distributed every rank evaluates its own share of the images (no sample is repeated or dropped)
and the correct counts are summed across ranks, so the numbers equal a single process's.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pruning import distributed as D
from pruning._io import atomic_write_text, short_hash
from pruning.data import eval_loader, eval_transform, image_dataset
from pruning.errors import UserInputError
from pruning.speed import synchronize

from .precision import autocast, check_amp

log = logging.getLogger(__name__)

TEACHER_CACHE = "teacher_metrics.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or DataParallel) wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _memory_format(model: nn.Module) -> torch.memory_format:
    """Feed inputs in the layout of the model's first 4-d weight (channels-last models run faster so)."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    if weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def check_dataset(dataset: Dataset, what: str) -> None:
    """Raise a :class:`~pruning.errors.UserInputError` if ``dataset`` holds no samples."""
    if len(dataset) == 0:
        raise UserInputError(f"the {what} dataset is empty; give a folder of synset class folders or a labels.csv")


def _count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(1).sum())


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    workers: int = 2,
    amp: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) of ``model`` on ``dataset`` and its forward throughput.

    Args:
        model: the classifier (moved to ``device``; its train/eval mode is restored afterwards).
        dataset: ``(image tensor, class index)`` pairs.
        batch_size: per process.
        workers: data loader workers.
        amp: ``None``, ``"bf16"`` or ``"fp16"`` (GPU only).
        device: cuda when available, else cpu, when None.
        progress: show a progress bar on rank 0.

    Returns:
        ``top1``, ``top5``, ``images`` and ``images_per_s``: images over the time spent in the forward pass
        (data loading excluded; the first batch warms up and is not timed when there are more).
    """
    device = torch.device(device) if device is not None else D.default_device()
    check_amp(amp, device)
    check_dataset(dataset, "validation")
    net = unwrap(model).to(device)
    was_training = net.training
    net.eval()
    loader = eval_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda", shard=True)  # counts summed
    bar = tqdm(loader, desc="validate", unit="batch", disable=not progress or not D.is_main(), leave=False)
    try:
        with torch.no_grad():
            counts, seconds = _run(net, bar, len(loader), amp, device)
    finally:
        net.train(was_training)
    return _metrics(counts, seconds)


def evaluate_folder(
    model: nn.Module,
    root: str,
    img_size: int,
    batch_size: int = 50,
    workers: int = 2,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`evaluate` on the labelled images under ``root`` (synset folders or ``labels.csv``) at ``img_size`` px,
    through timm's evaluation transform for ``model`` (:func:`pruning.data.eval_transform`: resize, center crop,
    the model's mean/std).

    Raises:
        MissingInputError, UserInputError: ``root`` is missing or holds no readable layout
            (:func:`pruning.data.image_dataset`).
    """
    dataset = image_dataset(root, eval_transform(model, img_size))
    return evaluate(model, dataset, batch_size, workers, device=device, progress=progress)


def _run(net: nn.Module, batches, n_batches: int, amp: str | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit counts (top-1, top-5, images, timed images) and the forward seconds of this rank's batches."""
    fmt = _memory_format(net)
    counts = torch.zeros(4, dtype=torch.float64)
    seconds = torch.zeros(1, dtype=torch.float64)
    for i, (images, labels) in enumerate(batches):
        images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        synchronize(device)
        start = time.perf_counter()
        with autocast(amp, device):
            logits = net(images)
        synchronize(device)
        if i > 0 or n_batches == 1:  # the first batch warms up (allocations, kernel choice)
            seconds += time.perf_counter() - start
            counts[3] += len(images)
        top1, top5 = _count_correct(logits.float(), labels.to(device))
        counts[:3] += torch.tensor([top1, top5, len(images)], dtype=torch.float64)
    return counts, seconds


def _metrics(counts: torch.Tensor, seconds: torch.Tensor) -> dict[str, float]:
    """Sum the counts over ranks; throughput is all timed images over the slowest rank's time."""
    dev = D.collective_device()
    counts = D.all_reduce_sum(counts.to(dev)).cpu()
    seconds = D.all_reduce_max(seconds.to(dev)).cpu()
    n = counts[2].item()
    return {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n, "images": int(n),
            "images_per_s": counts[3].item() / max(seconds.item(), 1e-12)}


def dataset_fingerprint(dataset: Dataset) -> str:
    """A short hash of what decides the metrics: the samples (paths and labels when listed) and the transform."""
    samples = getattr(dataset, "samples", None)
    # sha1, as ever: the teacher caches of earlier runs stay valid
    return short_hash([len(dataset), repr(samples) if samples is not None else type(dataset).__name__,
                       repr(getattr(dataset, "transform", None))], algorithm="sha1")


def _teacher_cache_key(teacher_key: str, dataset: Dataset, batch_size: int, amp: str | None, device: torch.device) -> dict[str, Any]:
    image = dataset[0][0]
    resolution = list(image.shape[-2:]) if isinstance(image, torch.Tensor) else None
    return {"teacher": teacher_key, "data": dataset_fingerprint(dataset), "images": len(dataset),
            "resolution": resolution, "batch_size": batch_size, "amp": amp, "device": device.type}


def _read_cache(path: str) -> dict[str, Any]:
    """The cached teacher metrics; empty when there are none, or when the file is corrupt (said, then rewritten)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            cache = json.load(f)
        if isinstance(cache, dict):
            return cache
        raise ValueError(f"a JSON {type(cache).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("%s is corrupt or truncated (%s: %s); the teacher is evaluated again", path, type(e).__name__, e)
        return {}


def validate_pair(
    student: nn.Module,
    teacher: nn.Module,
    dataset: Dataset,
    out_dir: str,
    teacher_key: str,
    batch_size: int = 64,
    workers: int = 2,
    amp: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Student and teacher metrics side by side; the teacher is evaluated once and cached in ``out_dir``.

    Args:
        student: the pruned, fine-tuned model.
        teacher: its unpruned parent.
        dataset: labelled validation images (the transform fixes the resolution).
        out_dir: run folder; ``teacher_metrics.json`` there holds the teacher's metrics, keyed by
            ``teacher_key``, the dataset's fingerprint, resolution, batch size, amp mode and device type.
        teacher_key: what identifies the teacher's weights (e.g. ``"tf_efficientnet_lite0:lite0-pytorch"``).
        batch_size, workers, amp, device, progress: as :func:`evaluate`.

    Returns:
        ``{"student": metrics, "teacher": metrics, "teacher_cached": bool, "top1_gap": teacher - student
        top-1, "speedup": student over teacher images/s}``.
    """
    device = torch.device(device) if device is not None else D.default_device()
    check_amp(amp, device)
    check_dataset(dataset, "validation")
    t, cached = _teacher_metrics(teacher, dataset, out_dir, teacher_key, batch_size, workers, amp, device, progress)
    s = evaluate(student, dataset, batch_size, workers, amp, device, progress)
    return {"student": s, "teacher": t, "teacher_cached": cached, "top1_gap": t["top1"] - s["top1"],
            "speedup": s["images_per_s"] / t["images_per_s"]}


def _teacher_metrics(teacher, dataset, out_dir, teacher_key, batch_size, workers, amp, device, progress) -> tuple[dict, bool]:
    """The teacher's metrics from the run folder's cache, or evaluated now and added to it (by rank 0)."""
    key_fields = _teacher_cache_key(teacher_key, dataset, batch_size, amp, device)
    key = short_hash(key_fields, algorithm="sha1")
    path = os.path.join(out_dir, TEACHER_CACHE)
    cache = D.main_decides(lambda: _read_cache(path))  # every rank takes the same branch
    if key in cache:
        return cache[key]["metrics"], True
    cache[key] = {**key_fields, "metrics": evaluate(teacher, dataset, batch_size, workers, amp, device, progress)}
    if D.is_main():
        atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
    return cache[key]["metrics"], False


# below this many classes a validation set measures a subset of ImageNet, not ImageNet accuracy
FEW_CLASSES = 100
# a student this many top-1 points above its own teacher has likely been trained on the validation classes alone
STUDENT_LEAD = 2.0


def validation_warnings(classes: int, student_top1: float, teacher_top1: float) -> list[str]:
    """What a reader of the validation result must know: few classes, or a student that beats its teacher."""
    warnings = []
    if classes < FEW_CLASSES:
        warnings.append(f"the validation set covers {classes} of ImageNet's 1000 classes: its top-1 does not measure "
                        "ImageNet accuracy; validate on ImageNet val images (data.val_root)")
    if student_top1 > teacher_top1 + STUDENT_LEAD:
        warnings.append(f"the student beats its teacher by {student_top1 - teacher_top1:.1f} top-1 points: a sign that "
                        "it was trained on the validation classes (class overlap), not that pruning helped")
    return warnings
