"""Batch-norm recalibration (EagleEye's adaptive BN): re-estimate BN running statistics after pruning.

A freshly pruned network feeds its batch norms different statistics than the parent did, so the stored
running means and variances no longer fit and accuracy collapses. Forwarding a few hundred training images
in train mode, with no gradient steps, re-estimates them; the weights are untouched.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .data import take_images


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_images: int,
                   progress: bool = True) -> int:
    """Replace every BN's running statistics by their exact average over ``num_images`` images.

    Args:
        model: the (pruned) model; only BN buffers change, and its train/eval mode is restored.
        batches: ``(images, labels)`` batches of training images (eval transform: no augmentation).
        num_images: how many images to use (the first ``num_images`` of ``batches``).
        progress: show a progress bar.

    Returns:
        The number of images used.
    """
    bns = _batch_norms(model)
    saved = [(bn.momentum, bn.training) for bn in bns]
    was_training = model.training
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.train()
    seen, device = 0, next(model.parameters()).device
    try:
        for images, _ in take_images(batches, num_images, "BN recalibration", progress):
            images = images.to(device)
            for bn in bns:  # weight each batch by its size: the running mean is the mean over all images
                bn.momentum = len(images) / (seen + len(images))
            model(images)
            seen += len(images)
    finally:
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)
        model.train(was_training)
    return seen
