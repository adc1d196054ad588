"""From scores and a budget to a pruned model: solve the knapsack, then build the smaller network.

This is the middle of the pipeline (importance -> **solve -> prune** -> distil -> validate)::

    scores = create_importance("taylor_weight")(model, graph, batches)
    result = search(model, graph, scores, "flops_490M")
    result.pruned            # the physically smaller model
    result.solution.widths   # kept width per group
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .budget import Budget, check_feasible, resolve_budget
from .cost import CostModel
from .graph import ChannelGraph
from .prune import prune_model
from .solve import KnapsackProblem, Solution, solve


@dataclass
class SearchResult:
    """A solved budget and the pruned model it gives."""

    budget: Budget
    solution: Solution
    pruned: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int

    @property
    def ratio(self) -> float:
        """Achieved MACs over the target."""
        return self.macs_after / self.budget.macs


def knapsack_problem(
    cost: CostModel, scores: Mapping[str, torch.Tensor], budget: Budget, round_to: int = 1, min_keep_fraction: float = 0.0
) -> KnapsackProblem:
    """The solver's view of one model, its scores and a budget."""
    return KnapsackProblem(
        scores={g: np.asarray(torch.as_tensor(s, dtype=torch.float64)) for g, s in scores.items()},
        macs=cost.macs_poly,
        full_widths=cost.graph.full_widths(),
        budget=budget.macs,
        round_to=round_to,
        min_keep_fraction=min_keep_fraction,
    )


def search(
    model: nn.Module,
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor],
    budget: str | float | int | Budget,
    solver: str = "exact",
    round_to: int = 1,
    min_keep_fraction: float = 0.0,
    time_limit: float = 10.0,
) -> SearchResult:
    """Choose the channels to keep under ``budget`` and build the pruned model.

    Args:
        model: the unpruned model of ``graph``.
        graph: its channel graph (fixes the input size the MACs are counted at).
        scores: per-channel importance of every prunable group.
        budget: a :class:`Budget` or anything :func:`resolve_budget` accepts.
        solver: a name in :data:`pruning.solve.SOLVERS`.
        round_to: kept widths are multiples of this (or full).
        min_keep_fraction: no group keeps fewer than this fraction of its channels.
        time_limit: seconds the solver may use.
    """
    cost = CostModel(graph, model)
    if not isinstance(budget, Budget):
        budget = resolve_budget(budget, cost.macs())
    check_feasible(budget, cost, round_to, min_keep_fraction)
    solution = solve(knapsack_problem(cost, scores, budget, round_to, min_keep_fraction), solver, time_limit)
    pruned = prune_model(model, graph, solution.keep)
    widths = {g: len(k) for g, k in solution.keep.items()}
    return SearchResult(budget, solution, pruned, cost.macs(), cost.macs(widths), cost.params(), cost.params(widths))


_STAGE = re.compile(r"^((?:blocks|layer|stages|features)\.?\d+)")


def stage_of(group_name: str) -> str:
    """The stage a group belongs to, from its name (``blocks.3.1.conv_pw`` -> ``blocks.3``), else the name."""
    m = _STAGE.match(group_name)
    return m.group(1) if m else group_name


def kept_fraction_by_stage(graph: ChannelGraph, widths: Mapping[str, int]) -> dict[str, float]:
    """Kept channels over all channels of the prunable groups of each stage, in execution order."""
    kept: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for g in graph.prunable_groups():
        kept[stage_of(g.name)] += widths.get(g.name, g.width)
        total[stage_of(g.name)] += g.width
    return {s: kept[s] / total[s] for s in total}
