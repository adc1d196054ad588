"""Torch-Pruning (the strongest general pruning library) driven to a MACs target, for side-by-side runs.

Torch-Pruning takes channel *ratios*, not MAC budgets, so its global pruning ratio is found by bisection:
each trial prunes a copy of the model with Torch-Pruning's own dependency graph, importance and global
allocation, and this framework's counter measures the result. The layers this framework protects by default
(stem, first stage, head, classifier) are ignored by Torch-Pruning too, so both prune the same layers.

:func:`kept_channels` reads which of the parent's channels a Torch-Pruning model kept, in this framework's
groups, so that its model can be saved as a ``pruned_checkpoint.pth`` and fine-tuned and validated by the app
(``stages=[finetune,validate]``) exactly as the app's own pruned models are.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pruning.count import count_model
from pruning.graph import ChannelGraph, is_protected
from pruning.protect import default_protected
from pruning.prune import prune_model


def _ignored_layers(model: nn.Module) -> list[nn.Module]:
    patterns = list(default_protected(model)) + ["classifier", "fc"]
    return [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and is_protected(n, patterns)]


def _accumulate_gradients(model: nn.Module, batches: Iterable) -> None:
    model.eval()
    model.zero_grad()
    for images, labels in batches:
        logits = model(images)  # unlabelled images (-1) count against the model's own top class, as ours do
        F.cross_entropy(logits, torch.where(labels < 0, logits.detach().argmax(1), labels)).backward()


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


def _channel_rows(model: nn.Module, group) -> list[tuple[float, ...]]:
    """Per channel of ``group``, the values that pruning copies unchanged whatever else is pruned: the
    BatchNorms' weight, bias and running statistics and the producing layers' biases."""
    columns = []
    for m in group.members:
        layer = model.get_submodule(m.module)
        if m.role == "channel" and isinstance(layer, nn.BatchNorm2d):
            columns += [layer.weight, layer.bias, layer.running_mean, layer.running_var]
        elif m.role == "out" and getattr(layer, "bias", None) is not None:
            columns.append(layer.bias)
    return list(zip(*(t.tolist() for t in columns)))


def kept_channels(parent: nn.Module, pruned: nn.Module, graph: ChannelGraph) -> dict[str, list[int]]:
    """Which of ``parent``'s channels every prunable group of ``pruned`` (a Torch-Pruning model) kept.

    Pruning copies a channel's BatchNorm values and biases unchanged, so each kept channel is found by them
    among the parent's. The result is checked: this framework's :func:`pruning.prune.prune_model` with these
    channels must compute what ``pruned`` computes.

    Raises:
        ValueError: a group without BatchNorm or bias, a parent whose channels tie, or models that disagree.
    """
    keep = {}
    for group in graph.prunable_groups():
        rows = _channel_rows(parent, group)
        index = {row: i for i, row in enumerate(rows)}
        if not rows or len(index) != group.width:
            raise ValueError(f"group {group.name!r}: its channels cannot be told apart by BatchNorm values or biases")
        kept = [index[row] for row in _channel_rows(pruned, group)]
        if len(kept) < group.width:
            keep[group.name] = sorted(kept)
    _check_same_model(prune_model(parent, graph, keep), pruned, graph.input_size)
    return keep


@torch.no_grad()
def _check_same_model(ours: nn.Module, theirs: nn.Module, input_size: tuple[int, int, int]) -> None:
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    diff = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()
    if diff > 1e-4:
        raise ValueError(f"the kept channels do not rebuild the Torch-Pruning model (outputs differ by {diff:.2e})")
