"""Physical pruning: a real smaller model holding the kept weights and BN statistics, not masks."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from .graph import ChannelGraph
from .layers import find_rule


def _check_keep(graph: ChannelGraph, keep: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    checked = {}
    for name, idx in keep.items():
        if name not in graph.groups:
            raise KeyError(f"unknown channel group {name!r}; the model's groups are {list(graph.groups)}")
        group = graph.groups[name]
        idx = torch.as_tensor(list(idx), dtype=torch.long).sort().values
        if len(idx) == 0 or idx.unique().numel() != len(idx) or idx[0] < 0 or idx[-1] >= group.width:
            raise ValueError(
                f"group {name!r}: kept indices must be 1..{group.width} distinct values in [0, {group.width}), "
                f"got {len(idx)} values"
            )
        if len(idx) == group.width:
            continue  # nothing removed: leave the layers untouched (bit-identical)
        if not group.prunable:
            raise ValueError(f"group {name!r} cannot be pruned: {group.reason}")
        checked[name] = idx
    return checked


def prune_model(model: nn.Module, graph: ChannelGraph, keep: Mapping[str, Sequence[int]]) -> nn.Module:
    """Build the pruned model: a deep copy of ``model`` whose layers keep only the given channels.

    Args:
        model: the unpruned model ``graph`` was built from (left unchanged).
        graph: its channel graph.
        keep: group name -> indices of the channels to keep; groups not named are kept whole.

    Returns:
        A new model with smaller layers. In eval mode its output equals the original's with the removed
        channels zeroed where they are consumed.
    """
    keep_idx = _check_keep(graph, keep)
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    for name, idx in keep_idx.items():
        for member in graph.groups[name].members:
            module = modules[member.module]
            rule = find_rule(module)
            (rule.prune_in if member.role == "in" else rule.prune_out)(module, idx)
    _sync_timm_attributes(pruned)
    return pruned


def prune_to_widths(model: nn.Module, graph: ChannelGraph, widths: Mapping[str, int]) -> nn.Module:
    """Prune to the given widths keeping each group's first channels (for architectures, not accuracy)."""
    return prune_model(model, graph, {g: range(w) for g, w in widths.items()})


def _sync_timm_attributes(model: nn.Module) -> None:
    """timm models record their feature width; keep it true when the classifier's input shrank."""
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if isinstance(classifier, nn.Linear) and getattr(model, "num_features", None) not in (None, classifier.in_features):
        if getattr(model, "head_hidden_size", None) == model.num_features:
            model.head_hidden_size = classifier.in_features
        model.num_features = classifier.in_features
