"""Budgeted channel selection: which channels each group keeps so that the model meets every limit.

Each prunable group ``g`` keeps its ``w_g`` best channels, worth ``V_g(w_g)``, the sum of its ``w_g`` largest
importance scores (concave in ``w_g``). The problem is

    maximise  sum_g V_g(w_g)   subject to   cost_k(w) <= limit_k for every constraint k,   w_g in allowed(g),

where every cost (MACs, params, a measured latency table, see :mod:`pruning.cost`) is a sum of terms over at
most two groups' widths: a channel's cost depends on its neighbours' widths, so a 0/1 knapsack over fixed
per-channel costs only approximates it. Costs must not decrease as a width grows.

Where a residual block can be removed whole (:mod:`pruning.blocks`), its inner groups may also take width 0,
all together (``KnapsackProblem.removable``).

Solvers live in :mod:`pruning.solvers`, one module each, and register here with :func:`register_solver` (a
new one is one file: README, Extending); configs select them by that name (``solver.name``):

* ``exact`` (:mod:`pruning.solvers.exact`): Lagrangian branch and bound, optimal within ``gap_tol`` with a
  proven upper bound;
* ``cpsat`` (:mod:`pruning.solvers.cpsat`): the same problem in OR-tools CP-SAT, an independent cross-check;
* ``uniform``, ``threshold``, ``greedy`` (:mod:`pruning.solvers.baselines`): one keep ratio, one global
  score threshold, and the paper's greedy by value per own-layer cost.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ._registry import Registry, check_arguments
from .cost import Cost

# solve()'s defaults, also those of the search functions built on it (conf/solver/*.yaml set their own)
TIME_LIMIT, GAP_TOL = 10.0, 1e-6


@dataclass(frozen=True)
class Constraint:
    """``cost(widths) <= limit``; ``spec`` is what the user wrote (for messages and reports)."""

    cost: Cost
    limit: int | float
    spec: str = ""

    @property
    def name(self) -> str:
        return self.cost.name


@dataclass(frozen=True)
class KnapsackProblem:
    """One budgeted channel-selection problem.

    Attributes:
        scores: importance of every channel, per prunable group (1-D, length = the group's width, >= 0).
        constraints: every limit the widths must meet (at least one).
        full_widths: unpruned width of every group; groups without scores stay at this width.
        round_to: kept widths are multiples of this (or the full width) when > 1.
        min_keep_fraction: every group keeps at least ``ceil(fraction * width)`` (and at least 1) channels.
        removable: the inner groups of each removable block; each tuple's groups may all take width 0 together.
        blocks: groups whose channels form equal blocks that keep equal counts (grouped convs,
            :attr:`pruning.graph.ChannelGroup.blocks`), by name; every other group is one block.
    """

    scores: Mapping[str, np.ndarray]
    constraints: Sequence[Constraint]
    full_widths: Mapping[str, int]
    round_to: int = 1
    min_keep_fraction: float = 0.0
    removable: Sequence[tuple[str, ...]] = ()
    blocks: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Solution:
    """A solver's answer.

    Attributes:
        widths: kept width of every prunable group (0: its block is removed).
        keep: sorted indices of the kept channels (the top scores; ties go to the lower index).
        objective: sum of the kept scores.
        bound: an upper bound on the optimum (NaN when the solver proves none).
        gap: ``(bound - objective) / bound`` (NaN without a bound).
        costs: the true value of every constraint's cost at ``widths`` (all other groups full), by name.
        limits: every constraint's limit, by name.
        binding: the constraints that stop every group from growing one more allowed step.
        solver: the solver's name.
        seconds: wall time of the solve.
        removed_blocks: how many removable blocks were removed.
        round_to: the width multiple the widths keep (the problem's, or a finer-grained cost's: see
            :func:`width_multiple`).
    """

    widths: dict[str, int]
    keep: dict[str, list[int]]
    objective: float
    bound: float
    gap: float
    costs: dict[str, int | float]
    limits: dict[str, int | float]
    binding: list[str]
    solver: str
    seconds: float
    removed_blocks: int = 0
    round_to: int = 1

    @property
    def macs(self) -> int | None:
        """MACs of the solution when MACs were constrained."""
        return self.costs.get("macs")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> Solution:
        """Read :meth:`to_dict`'s output (and solutions written before costs were objects)."""
        d = {k: v for k, v in d.items() if k != "problem_key"}  # the pipeline's resume key, not a result
        if "macs" in d and "costs" not in d:
            macs = d.pop("macs")
            d.update(costs={"macs": macs}, limits={}, binding=[])
        return cls(**d)


# ------------------------------------------------------------------------------------------ widths


def allowed_widths(width: int, round_to: int = 1, min_keep_fraction: float = 0.0, blocks: int = 1) -> np.ndarray:
    """Allowed kept widths of a group of ``width`` channels, ascending (the full width is always allowed); with
    ``blocks`` equal blocks, multiples of it (every block keeps as many channels, at least one)."""
    round_to = math.lcm(max(1, round_to), blocks)
    lo = max(1, math.ceil(min_keep_fraction * width - 1e-9))
    lo = min(lo, width)
    if round_to <= 1:
        return np.arange(lo, width + 1, dtype=np.int64)
    first = -(-lo // round_to) * round_to
    return np.unique(np.append(np.arange(first, width + 1, round_to, dtype=np.int64), width))


def width_multiple(round_to: int, constraints: Sequence[Constraint]) -> int:
    """The width multiple solvers keep: ``round_to`` combined with every cost's own (``cost.meta["round_to"]``).

    A measured latency table is exact only at the channel multiple this device's kernels are fast at (off it,
    a conv can be twice as slow, so latency is not monotone there): widths then stay at multiples of it.
    """
    return math.lcm(max(1, int(round_to)), *(max(1, int(c.cost.meta.get("round_to", 1))) for c in constraints))


def channel_order(scores: np.ndarray) -> np.ndarray:
    """Channel indices by decreasing score, ties by increasing index."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def kept_channels(scores: np.ndarray, width: int, blocks: int = 1) -> list[int]:
    """Sorted indices of the ``width`` best channels; with ``blocks`` equal contiguous blocks, the
    ``width / blocks`` best of each (a grouped conv keeps its groups)."""
    scores = np.asarray(scores, dtype=np.float64)
    if width % blocks or len(scores) % blocks:
        raise ValueError(f"{width} of {len(scores)} channels do not split into {blocks} equal blocks")
    size, per = len(scores) // blocks, width // blocks
    return sorted(b * size + i for b in range(blocks) for i in channel_order(scores[b * size:(b + 1) * size])[:per].tolist())


def first_channels(full: int, width: int, blocks: int = 1) -> list[int]:
    """The first ``width`` channels (the first ``width / blocks`` of each block): an architecture, not a choice."""
    return kept_channels(np.zeros(full), width, blocks)


# ---------------------------------------------------------------------------------------- registry

SolverFn = Callable[..., tuple[dict[str, int], float]]
SOLVERS: Registry[SolverFn] = Registry(
    "solver", "solver=NAME; add one with pruning.solve.register_solver",
    builtins=("pruning.solvers",))


def register_solver(name: str) -> Callable[[SolverFn], SolverFn]:
    """Decorator registering ``fn(instance, time_limit, gap_tol, **options) -> (widths, upper bound or NaN)``.

    ``instance`` is the problem reduced to its prunable groups (:class:`pruning.solvers.instance.Instance`);
    ``options`` are the solver's own keys in its ``conf/solver/NAME.yaml`` (passed on by :func:`solve`).
    """
    return SOLVERS.register(name)


def check_solver(name: str, **options: Any) -> SolverFn:
    """The solver registered as ``name``, after checking it takes ``options``.

    Raises:
        UserInputError: an unknown name (listing the known ones), or an option the solver does not take.
    """
    fn = SOLVERS.get(name)
    check_arguments(fn, f"solver {name!r}", None, **options)
    return fn


def solve(
    problem: KnapsackProblem, solver: str = "exact", time_limit: float = TIME_LIMIT, gap_tol: float = GAP_TOL,
    **options: Any,
) -> Solution:
    """Choose the kept channels of every prunable group under every constraint.

    Args:
        problem: scores, constraints, widths and width rules.
        solver: a name in :data:`SOLVERS` (``exact``: optimal with a proven bound; ``greedy``: the paper's).
        time_limit: seconds the solver may use (soft: ``exact`` checks it between dual evaluations).
        gap_tol: ``exact`` stops once ``(bound - objective) <= gap_tol * objective`` (0: prove optimality).
        options: further arguments of the solver (the keys of its YAML beyond ``time_limit`` and ``gap_tol``).

    Raises:
        ValueError: unknown solver or option, malformed scores or costs, or a limit below the lowest achievable cost.
    """
    from .solvers.instance import reduce

    fn = check_solver(solver, time_limit=time_limit, gap_tol=gap_tol, **options)
    inst = reduce(problem)
    t0 = time.perf_counter()
    widths, bound = fn(inst, time_limit=time_limit, gap_tol=gap_tol, **options)
    return _solution(problem, inst, inst.index_of(widths), bound, solver, t0)


def _solution(problem: KnapsackProblem, inst, idx: np.ndarray, bound: float, solver: str, t0: float) -> Solution:
    widths = dict(zip(inst.names, inst.widths(idx)))
    objective = inst.value(idx)
    gap = (bound - objective) / bound if bound > 0 else (0.0 if bound == objective else math.nan)
    keep = {g: kept_channels(problem.scores[g], w, problem.blocks.get(g, 1)) for g, w in widths.items()}
    costs = {c.name: c.cost(widths) for c in problem.constraints}  # the true costs, from the costs themselves
    limits = {c.name: c.limit for c in problem.constraints}
    return Solution(widths, keep, objective, bound, gap, costs, limits, inst.binding(idx), solver,
                    time.perf_counter() - t0, inst.removed_blocks(idx), width_multiple(problem.round_to, problem.constraints))

