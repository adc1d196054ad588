"""Helpers for tests: random kept channels and the masked reference model."""
from __future__ import annotations

import copy

import torch
from torch import nn

from pruning.graph import ChannelGraph


def random_keep(graph: ChannelGraph, seed: int = 0, low: float = 0.3, high: float = 0.9) -> dict[str, list[int]]:
    """Random kept channel indices (a random fraction in [low, high]) for every prunable group."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in graph.prunable_groups():
        frac = low + (high - low) * torch.rand(1, generator=gen).item()
        n = max(1, round(frac * g.width))
        keep[g.name] = sorted(torch.randperm(g.width, generator=gen)[:n].tolist())
    return keep


def masked_reference(model: nn.Module, graph: ChannelGraph, keep: dict[str, list[int]]) -> nn.Module:
    """A copy of ``model`` with removed channels zeroed where they are consumed (consumer weight columns)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name, idx in keep.items():
        removed = sorted(set(range(graph.groups[name].width)) - set(idx))
        for m in graph.groups[name].members:
            if m.role == "in":
                with torch.no_grad():
                    modules[m.module].weight[:, removed] = 0
    return ref
