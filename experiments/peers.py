"""Torch-Pruning (the strongest general pruning library) driven to a MACs target, for side-by-side runs.

Torch-Pruning takes channel *ratios*, not MAC budgets, so its global pruning ratio is found by bisection:
each trial prunes a copy of the model with Torch-Pruning's own dependency graph, importance and global
allocation, and this framework's counter measures the result. The layers this framework protects by default
(stem, first stage, head, classifier) are ignored by Torch-Pruning too, so both prune the same layers.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pruning.count import count_model
from pruning.graph import is_protected
from pruning.protect import default_protected


def _ignored_layers(model: nn.Module) -> list[nn.Module]:
    patterns = list(default_protected(model)) + ["classifier", "fc"]
    return [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and is_protected(n, patterns)]


def _accumulate_gradients(model: nn.Module, batches: Iterable) -> None:
    model.eval()
    model.zero_grad()
    for images, labels in batches:
        F.cross_entropy(model(images), labels).backward()


def _prune_copy(model: nn.Module, img_size: int, ratio: float, importance: str) -> nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    for src, dst in zip(model.parameters(), pruned.parameters()):  # deepcopy drops .grad; computed once in base
        dst.grad = None if src.grad is None else src.grad.clone()
    imp = tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(pruned, torch.randn(1, 3, img_size, img_size), importance=imp, global_pruning=True,
                                  pruning_ratio=ratio, ignored_layers=_ignored_layers(pruned))
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    return pruned


def torch_pruning_to_macs(model: nn.Module, img_size: int, target_macs: int, importance: str = "taylor",
                          batches: list | None = None, iterations: int = 12) -> nn.Module:
    """The largest Torch-Pruning model (global ratio found by bisection) whose MACs fit ``target_macs``.

    Args:
        model: the unpruned model (left unchanged).
        img_size: resolution the MACs are counted at.
        target_macs: the budget in MACs.
        importance: ``taylor`` (Torch-Pruning's GroupTaylorImportance, gradients from ``batches``) or
            ``magnitude`` (GroupMagnitudeImportance, L1).
        batches: ``(images, labels)`` for the Taylor gradients.
        iterations: bisection steps on the pruning ratio.
    """
    fits = lambda candidate: count_model(candidate, img_size).macs <= target_macs  # noqa: E731
    return torch_pruning_until(model, img_size, fits, importance, batches, iterations)


def torch_pruning_until(model: nn.Module, img_size: int, fits: Callable[[nn.Module], bool], importance: str = "taylor",
                        batches: list | None = None, iterations: int = 12) -> nn.Module:
    """The largest Torch-Pruning model (global ratio found by bisection) for which ``fits(model)`` holds
    (a MACs budget, a predicted latency, ...); costs must grow with the kept channels."""
    base = copy.deepcopy(model)
    if importance == "taylor":
        _accumulate_gradients(base, batches or [])
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        candidate = _prune_copy(base, img_size, mid, importance)
        if fits(candidate):
            hi, best = mid, candidate
        else:
            lo = mid
    if best is None:
        best = _prune_copy(base, img_size, hi, importance)
    return best
