"""Physical pruning: a real smaller model holding the kept weights and BN statistics, not masks."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from .blocks import blocks_to_remove, remove_blocks, removable_blocks
from .graph import ChannelGraph
from .layers import find_rule
from .splits import resize_cuts


def _check_keep(graph: ChannelGraph, keep: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
    checked = {}
    for name, idx in keep.items():
        if name not in graph.groups:
            raise KeyError(f"unknown channel group {name!r}; the model's groups are {list(graph.groups)}")
        group = graph.groups[name]
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        if len(idx) == 0 or idx.unique().numel() != len(idx) or idx[0] < 0 or idx[-1] >= group.width:
            hint = " (width 0 is allowed only for the inner groups of a removable block)" if len(idx) == 0 else ""
            raise ValueError(
                f"group {name!r}: kept indices must be 1..{group.width} distinct values in [0, {group.width}), "
                f"got {len(idx)} values{hint}"
            )
        if len(idx) == group.width:
            continue  # nothing removed: leave the layers untouched (bit-identical)
        if not group.prunable:
            raise ValueError(f"group {name!r} cannot be pruned: {group.reason}")
        per_block = torch.bincount(idx // (group.width // group.blocks), minlength=group.blocks)
        if not (per_block == per_block[0]).all():  # one block (no grouped conv): always equal
            raise ValueError(f"group {name!r} feeds a grouped conv: keep the same number of channels in each of its "
                             f"{group.blocks} groups of {group.width // group.blocks}, got {per_block.tolist()}")
        checked[name] = idx
    return checked


def prune_model(model: nn.Module, graph: ChannelGraph, keep: Mapping[str, Sequence[int]]) -> nn.Module:
    """Build the pruned model: a deep copy of ``model`` whose layers keep only the given channels.

    Args:
        model: the unpruned model ``graph`` was built from (left unchanged).
        graph: its channel graph.
        keep: group name -> indices of the channels to keep; groups not named are kept whole. The inner
            groups of a removable block (:func:`pruning.blocks.removable_blocks`) may keep none, all of
            them together: the block is then removed (see :func:`pruning.blocks.remove_blocks`).

    Returns:
        A new model with smaller layers. In eval mode its output equals the original's with the removed
        channels zeroed where they are consumed.

    Raises:
        KeyError: an unknown group.
        ValueError: bad indices, a non-prunable group, an empty group that is not a removable block's inner
            group, or a block with only some of its inner groups empty (naming the block).
    """
    keep = {name: list(idx) for name, idx in keep.items()}
    removed = []
    if any(len(idx) == 0 for idx in keep.values()):
        removed = blocks_to_remove(removable_blocks(model, graph), keep)
    emptied = {g for block in removed for g in block.inner}
    keep_idx = _check_keep(graph, {name: idx for name, idx in keep.items() if name not in emptied})
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    for (module_name, side), idx in _kept_per_layer_side(graph, keep_idx).items():
        module = modules[module_name]
        rule = find_rule(module)
        (rule.prune_in if side == "in" else rule.prune_out)(module, idx)
    # after slicing: a removed block's constant comes from its last BN, already cut to the kept stream channels
    remove_blocks(pruned, removed)
    widths = {name: len(keep_idx[name]) if name in keep_idx else 0 if name in emptied else g.width
              for name, g in graph.groups.items()}
    resize_cuts(pruned, graph, widths)
    _sync_timm_attributes(pruned)
    return pruned


def _kept_per_layer_side(graph: ChannelGraph, keep_idx: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """``(module, "in" | "out") -> kept channel indices`` for every layer side holding a pruned group.

    A side holding several groups (a conv reading concatenated features) keeps, segment by segment in channel
    order, the pruned groups' kept indices and the other groups' every channel, each shifted by its offset; it
    is sliced once. Sides holding no pruned group are left untouched.
    """
    side = lambda m: (m.module, "in" if m.role == "in" else "out")  # noqa: E731  (a channelwise layer: its out)
    segments: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for group in graph.groups.values():
        for m in group.members:
            idx = keep_idx.get(group.name, torch.arange(group.width))
            segments.setdefault(side(m), {})[m.offset] = idx + m.offset
    pruned = {side(m) for g in keep_idx for m in graph.groups[g].members}
    return {side: torch.cat([segs[o] for o in sorted(segs)]) for side, segs in segments.items() if side in pruned}


def prune_to_widths(model: nn.Module, graph: ChannelGraph, widths: Mapping[str, int]) -> nn.Module:
    """Prune to the given widths keeping each group's first channels (of each block, for a grouped conv's
    groups): for architectures, not accuracy."""
    from .solve import first_channels

    groups = graph.groups
    return prune_model(model, graph, {g: first_channels(groups[g].width, w, groups[g].blocks) if w else []
                                      for g, w in widths.items()})


def _sync_timm_attributes(model: nn.Module) -> None:
    """timm models record their feature width; keep it true when the classifier's input shrank."""
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if isinstance(classifier, nn.Linear) and getattr(model, "num_features", None) not in (None, classifier.in_features):
        if getattr(model, "head_hidden_size", None) == model.num_features:
            model.head_hidden_size = classifier.in_features
        model.num_features = classifier.in_features
