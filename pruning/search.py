"""From scores and a budget to a pruned model: solve the knapsack, then build the smaller network.

This is the middle of the pipeline (importance -> **solve -> prune** -> distil -> validate)::

    scores = create_importance("taylor_weight")(model, graph, batches)
    result = search(model, graph, scores, "flops_490M")
    result.pruned            # the physically smaller model
    result.solution.widths   # kept width per group

:func:`choose_channels` is the search without building the model: :func:`search` and the app's solve stage
(:func:`pruning.stages.stage_solve`) both find their channels through it, with the device in the loop
(:class:`MeasuredLimit`, :func:`solve_to_measured`) when a latency budget is checked by measurement.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .budget import Budget, check_feasible, resolve_budget
from .cost import CostModel
from .graph import ChannelGraph
from .prune import prune_model
from .solve import GAP_TOL, TIME_LIMIT, Constraint, KnapsackProblem, Solution, solve


@dataclass
class SearchResult:
    """A solved budget and the pruned model it gives."""

    budget: Budget | None
    solution: Solution
    pruned: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    verification: list[dict] = field(default_factory=list)  # with a MeasuredLimit: the solve_to_measured steps

    @property
    def ratio(self) -> float:
        """Achieved MACs over the target (NaN without a MACs budget)."""
        return self.macs_after / self.budget.macs if self.budget is not None else float("nan")


def knapsack_problem(
    graph: ChannelGraph, scores: Mapping[str, torch.Tensor], constraints: Sequence[Constraint], round_to: int = 1,
    min_keep_fraction: float = 0.0, removable: Sequence[tuple[str, ...]] = (),
) -> KnapsackProblem:
    """The solver's view of one model, its scores and its limits."""
    return KnapsackProblem(
        scores={g: np.asarray(torch.as_tensor(s, dtype=torch.float64)) for g, s in scores.items()},
        constraints=list(constraints),
        full_widths=graph.full_widths(),
        round_to=round_to,
        min_keep_fraction=min_keep_fraction,
        removable=tuple(removable),
        blocks={g.name: g.blocks for g in graph.prunable_groups() if g.blocks > 1},
    )


@dataclass(frozen=True)
class MeasuredLimit:
    """The device in the loop: re-solve while the chosen channels measure over ``allowed`` (:func:`solve_to_measured`).

    Attributes:
        measure: solution -> the measured quantity (a latency in ms, or a ratio to the parent's).
        allowed: the largest acceptable measurement, in ``measure``'s unit.
        cost_name: the constraint whose limit is lowered by the measured excess.
        iterations: solves at most.
    """

    measure: Callable[[Solution], float]
    allowed: float
    cost_name: str = "latency"
    iterations: int = 4


def choose_channels(
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor],
    constraints: Sequence[Constraint],
    solver: str = "exact",
    round_to: int = 1,
    min_keep_fraction: float = 0.0,
    removable: Sequence[tuple[str, ...]] = (),
    time_limit: float = TIME_LIMIT,
    gap_tol: float = GAP_TOL,
    solver_options: Mapping[str, Any] | None = None,
    measured: MeasuredLimit | None = None,
) -> tuple[Solution, list[dict]]:
    """The channels every group keeps under all ``constraints``: the search, without building the model.

    Args:
        graph: the unpruned model's channel graph.
        scores: per-channel importance of every prunable group.
        constraints: the limits (MACs, params, latency, any registered cost: :mod:`pruning.budget`), all met.
        solver: a name in :data:`pruning.solve.SOLVERS`.
        round_to: kept widths are multiples of this (or full).
        min_keep_fraction: no group keeps fewer than this fraction of its channels.
        removable: inner groups of the blocks that may be removed whole (:func:`removable_groups`).
        time_limit, gap_tol, solver_options: the solver's arguments (:func:`pruning.solve.solve`).
        measured: measure the chosen model and solve again while it misses its limit; None trusts the costs.

    Returns:
        ``(solution, history)``: ``history`` is :func:`solve_to_measured`'s steps, empty without ``measured``.

    Raises:
        UserInputError: a limit is below its cost at the lowest allowed widths (before solving).
    """
    check_feasible(constraints, graph.prunable_groups(), round_to, min_keep_fraction, removable)
    problem = knapsack_problem(graph, scores, constraints, round_to, min_keep_fraction, removable)
    if measured is None:
        return solve(problem, solver, time_limit, gap_tol, **(solver_options or {})), []
    return solve_to_measured(problem, measured.measure, measured.allowed, measured.cost_name, solver, time_limit,
                             gap_tol, measured.iterations, solver_options=solver_options)


def search(
    model: nn.Module,
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor],
    budget: str | float | int | Budget | None,
    solver: str = "exact",
    round_to: int = 1,
    min_keep_fraction: float = 0.0,
    time_limit: float = TIME_LIMIT,
    constraints: Sequence[Constraint] = (),
    allow_block_removal: bool = False,
    solver_options: Mapping[str, Any] | None = None,
    gap_tol: float = GAP_TOL,
    measured: MeasuredLimit | None = None,
) -> SearchResult:
    """Choose the channels to keep under ``budget`` (and any other ``constraints``) and build the pruned model.

    Args:
        model: the unpruned model of ``graph``.
        graph: its channel graph (fixes the input size the MACs are counted at).
        scores: per-channel importance of every prunable group.
        budget: a MACs budget: a :class:`Budget` or anything :func:`resolve_budget` accepts; None for none.
        solver: a name in :data:`pruning.solve.SOLVERS`.
        round_to: kept widths are multiples of this (or full).
        min_keep_fraction: no group keeps fewer than this fraction of its channels.
        time_limit: seconds the solver may use.
        constraints: further limits (params, latency: :mod:`pruning.budget`), all met together.
        allow_block_removal: removable residual blocks (:mod:`pruning.blocks`) may lose all inner channels.
        solver_options: further arguments of the solver (:func:`pruning.solve.solve`).
        gap_tol: the solver's optimality gap (:func:`pruning.solve.solve`).
        measured: re-solve while the pruned model measures over a limit on the device (:class:`MeasuredLimit`).
    """
    cost = CostModel(graph, model)
    limits = list(constraints)
    if budget is not None:
        if not isinstance(budget, Budget):
            budget = resolve_budget(budget, cost.macs())
        limits.insert(0, Constraint(cost.macs_cost, budget.macs, budget.spec))
    if not limits:
        raise ValueError("no budget: give a MACs budget or at least one constraint (params, latency)")
    removable = removable_groups(model, graph) if allow_block_removal else ()
    solution, history = choose_channels(graph, scores, limits, solver, round_to, min_keep_fraction, removable,
                                        time_limit, gap_tol, solver_options, measured)
    pruned = prune_model(model, graph, solution.keep)
    widths = solution.widths
    return SearchResult(budget, solution, pruned, cost.macs(), cost.macs(widths), cost.params(), cost.params(widths),
                        history)


def solve_to_measured(problem: KnapsackProblem, measure: Callable[[Solution], float], allowed: float,
                      cost_name: str = "latency", solver: str = "exact", time_limit: float = TIME_LIMIT,
                      gap_tol: float = GAP_TOL, iterations: int = 4, margin: float = 0.99,
                      solver_options: Mapping[str, Any] | None = None) -> tuple[Solution, list[dict]]:
    """Solve, measure the solution on the device, and while the measurement exceeds ``allowed``, lower the
    limit of ``cost_name`` and solve again: by the measured excess at first, then along the line through the
    last two (predicted, measured) points.

    A latency table predicts, it does not measure: the optimiser also favours the widths the table happens to
    under-predict. Measuring the chosen model closes that loop on the hardware the user pays for. Latency has a
    part that does not shrink with the widths (framework overhead, measured ~0.3-0.5 of a small model's), so
    proportional steps alone approach the limit slowly; the line through two measurements accounts for it.

    Args:
        problem: the problem, with a constraint on ``cost_name``.
        measure: solution -> the measured quantity (a latency in ms, or a ratio to the parent's).
        allowed: the largest acceptable measurement, in ``measure``'s unit.
        iterations: solves at most; margin: each new limit is this much below the proportional one.
        solver_options: further arguments of the solver (:func:`pruning.solve.solve`).

    Returns:
        ``(solution, history)``; each history entry has the limit, the predicted cost and the measurement.
        The last solution is returned even if it still measures over ``allowed`` (its entry says so).
    """
    history: list[dict] = []
    solution = solve(problem, solver, time_limit, gap_tol, **(solver_options or {}))
    for i in range(iterations):
        limit = next(c for c in problem.constraints if c.name == cost_name)
        measured = measure(solution)
        history.append({"limit": limit.limit, "predicted": solution.costs[cost_name], "measured": measured,
                        "allowed": allowed, "met": measured <= allowed})
        if measured <= allowed or i + 1 == iterations:
            break
        tighter = replace(limit, limit=_next_limit(history, limit.limit, margin))
        problem = replace(problem, constraints=[tighter if c is limit else c for c in problem.constraints])
        try:
            solution = solve(problem, solver, time_limit, gap_tol, **(solver_options or {}))
        except ValueError as e:  # the tighter limit is below the lowest achievable: keep the last solution
            history.append({"limit": tighter.limit, "stopped": str(e)})
            break
    return solution, history


def _next_limit(history: list[dict], limit: float, margin: float) -> float:
    """The next limit of the measured cost: proportional to the excess, or, from two measurements on, where the
    line through the last two meets ``margin * allowed`` (never above the proportional step, never below half
    of it: a noisy slope must not throw the limit far off)."""
    last = history[-1]
    proportional = limit * last["allowed"] / last["measured"] * margin
    if len(history) < 2:
        return proportional
    before = history[-2]
    slope = (last["measured"] - before["measured"]) / (last["predicted"] - before["predicted"] or float("nan"))
    if not slope > 0:  # noise, or a flat stretch: no line to follow
        return proportional
    secant = last["predicted"] + (margin * last["allowed"] - last["measured"]) / slope
    return min(proportional, max(secant, 0.5 * proportional))


def removable_groups(model: nn.Module, graph: ChannelGraph) -> tuple[tuple[str, ...], ...]:
    """The inner groups of every block that may be removed whole (see :mod:`pruning.blocks`)."""
    from .blocks import removable_blocks

    return tuple(b.inner for b in removable_blocks(model, graph))


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
