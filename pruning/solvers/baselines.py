"""Baseline allocations: one keep ratio, one global score threshold, and the paper's greedy.

None of them proves a bound (they return NaN), and none removes blocks.
"""
from __future__ import annotations

import math

import numpy as np

from ..solve import register_solver
from .instance import Instance


@register_solver("uniform")
def solve_uniform(inst: Instance, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """The same keep ratio in every group, the largest whose (rounded) widths meet every limit."""
    first = inst.first_nonzero()

    def at(ratio: float) -> np.ndarray:
        # per group, the largest allowed width <= ratio * full width (its smallest non-zero width at least)
        return np.array([max(f, int(np.searchsorted(g, ratio * g[-1], side="right")) - 1)
                         for g, f in zip(inst.grids, first)], np.int64)

    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection on the ratio: costs never decrease with it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if inst.within(inst.costs(at(mid))) else (lo, mid)
    return dict(zip(inst.names, inst.widths(at(lo)))), math.nan


@register_solver("threshold")
def solve_threshold(inst: Instance, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """Global ranking (what most libraries do): drop every channel scoring below one global threshold, the
    lowest threshold whose widths meet every limit; costs play no part in the ranking."""
    return _threshold(inst, [np.sort(s) for s in inst.scores])


@register_solver("threshold_norm")
def solve_threshold_normalised(inst: Instance, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """Global ranking after dividing every group's scores by their mean (Torch-Pruning's default ``mean``
    normaliser), so layers whose scores run on different scales compete on relative importance."""
    return _threshold(inst, [np.sort(s / max(float(np.mean(s)), 1e-30)) for s in inst.scores])


def _threshold(inst: Instance, scores: list[np.ndarray]) -> tuple[dict[str, int], float]:
    """The lowest single threshold on ``scores`` (sorted, per group) whose widths meet every limit."""
    first = inst.first_nonzero()

    def at(threshold: float) -> np.ndarray:
        counts = [len(s) - int(np.searchsorted(s, threshold, side="left")) for s in scores]
        return np.array([max(f, int(np.searchsorted(g, c, side="right")) - 1)
                         for g, c, f in zip(inst.grids, counts, first)], np.int64)

    candidates = np.unique(np.concatenate(scores + [np.array([np.inf])]))
    lo, hi = 0, len(candidates) - 1  # at(candidates[hi]) keeps the fewest channels: feasible (checked before)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if inst.within(inst.costs(at(candidates[mid]))) else (mid + 1, hi)
    return dict(zip(inst.names, inst.widths(at(candidates[lo])))), math.nan


@register_solver("greedy")
def solve_greedy(inst: Instance, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """The paper's knapsack: a channel weighs what its own producing layers cost at full neighbouring widths
    (the input-side saving is ignored); steps are taken by value per weight while the weights fit. Its true
    costs (reported) miss the limits."""
    first = inst.first_nonzero()
    idx = first.copy()
    approx = _approximate_lowest(inst, first)
    for _, i, k in sorted(_items(inst, first)):
        step = [own[i][k] - own[i][k - 1] for own in inst.own]
        if not inst.within([a + s for a, s in zip(approx, step)]):
            break
        approx = [a + s for a, s in zip(approx, step)]
        idx[i] = k
    return dict(zip(inst.names, inst.widths(idx))), math.nan


def _approximate_lowest(inst: Instance, first: np.ndarray) -> list:
    """Each cost at full widths minus the own-layer savings of every group at its lowest width."""
    full = inst.costs(inst.highest())
    return [c - sum(own[i][-1] - own[i][f] for i, f in enumerate(first)) for c, own in zip(full, inst.own)]


def _items(inst: Instance, first: np.ndarray) -> list[tuple[float, int, int]]:
    """``(-value/weight, group, step)`` for every step between consecutive allowed widths (non-increasing per
    group, so a group's steps are taken in order)."""
    scale, items = inst.scale(), []
    for i, (g, v) in enumerate(zip(inst.grids, inst.values)):
        ratio = math.inf
        for k in range(first[i] + 1, len(g)):
            w = sum(float(own[i][k] - own[i][k - 1]) * s for own, s in zip(inst.own, scale))
            ratio = min(ratio, (v[k] - v[k - 1]) / w if w > 0 else math.inf)
            items.append((-ratio, i, k))
    return items
