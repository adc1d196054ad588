"""Budgeted channel selection: which channels each group keeps so the model's MACs fit a budget.

Each prunable group ``g`` keeps its ``w_g`` best channels, worth ``V_g(w_g)``, the sum of its ``w_g`` largest
importance scores (concave in ``w_g``). The exact problem is

    maximise  sum_g V_g(w_g)   subject to   macs(w) <= budget,   w_g in allowed(g),

where ``macs`` is the bilinear :class:`~pruning.cost.Polynomial` (a channel's cost depends on its neighbours'
widths, so a 0/1 knapsack over fixed per-channel costs only approximates it).

Solvers (registry :data:`SOLVERS`; a new solver is one function registered with :func:`register_solver`):

* ``exact``: Lagrangian branch and bound. Relaxing the budget with a multiplier ``lam`` leaves
  ``max_w V(w) - lam * macs(w)``, which has no budget, only pairwise (bilinear) couplings between groups, and
  is solved *exactly* by variable elimination (dynamic programming) over the coupling graph: a tree in
  EfficientNets (every message a 1-D conjugate, computed from a concave hull), chains of triangles in ResNets
  (2-D tables). Every ``lam`` proves the upper bound ``lam * budget + max_w (V - lam * macs)``; the best
  ``lam`` is found by 1-D cutting planes (finite: the dual is piecewise linear). The two maximisers either
  side of the budget are completed into feasible solutions by a greedy on true MAC costs, and the box of
  allowed widths is split between them (best bound first) until the gap is below ``gap_tol``. Couplings
  whose elimination table would be too large are relaxed (McCormick) and branched on instead.
* ``uniform``: the same keep ratio in every group (the largest that fits); a baseline.
* ``threshold``: global ranking, one score threshold for all groups (what most libraries do); a baseline.
* ``greedy``: the paper's baseline. Every channel is an item worth its score that weighs the MACs of its own
  producing layers at full neighbouring widths (the input-side saving is ignored); items are taken by
  value/weight while the approximate weight fits. Its true MACs (reported) miss the budget.
* ``cpsat``: the same exact problem as an OR-tools CP-SAT model (one-hot width choices, integer products of
  widths, values scaled to integers with the rounding added to its bound); an independent cross-check of
  ``exact`` for users and tests. Slow on big models (seconds on efficientnet_b0 at 64 px, where ``exact``
  takes tens of milliseconds) and only proves the bound CP-SAT reaches within the time limit.

OR-tools (``ortools.sat``) is used only by ``cpsat`` and imported when it runs.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from .cost import Polynomial

_DENSE = 4096  # largest (choices x table) product evaluated densely; larger messages use a concave hull
_TABLE_LIMIT = 30_000_000  # largest dense table variable elimination may build; beyond it edges are relaxed
_REL_TOL = 1e-12


@dataclass(frozen=True)
class KnapsackProblem:
    """One budgeted channel-selection problem.

    Attributes:
        scores: importance of every channel, per prunable group (1-D, length = the group's width, >= 0).
        macs: the model's MACs as a polynomial of the group widths.
        full_widths: unpruned width of every group; groups without scores stay at this width.
        budget: largest allowed MACs.
        round_to: kept widths are multiples of this (or the full width) when > 1.
        min_keep_fraction: every group keeps at least ``ceil(fraction * width)`` (and at least 1) channels.
    """

    scores: Mapping[str, np.ndarray]
    macs: Polynomial
    full_widths: Mapping[str, int]
    budget: int
    round_to: int = 1
    min_keep_fraction: float = 0.0


@dataclass(frozen=True)
class Solution:
    """A solver's answer.

    Attributes:
        widths: kept width of every prunable group.
        keep: sorted indices of the kept channels (the top scores; ties go to the lower index).
        objective: sum of the kept scores.
        bound: an upper bound on the optimum (NaN when the solver proves none).
        gap: ``(bound - objective) / bound`` (NaN without a bound).
        macs: the true MACs of ``widths`` (all other groups full).
        solver: the solver's name.
        seconds: wall time of the solve.
    """

    widths: dict[str, int]
    keep: dict[str, list[int]]
    objective: float
    bound: float
    gap: float
    macs: int
    solver: str
    seconds: float


# ------------------------------------------------------------------------------------------ the instance


def allowed_widths(width: int, round_to: int = 1, min_keep_fraction: float = 0.0) -> np.ndarray:
    """Allowed kept widths of a group of ``width`` channels, ascending (the full width is always allowed)."""
    lo = max(1, math.ceil(min_keep_fraction * width - 1e-9))
    lo = min(lo, width)
    if round_to <= 1:
        return np.arange(lo, width + 1, dtype=np.int64)
    first = -(-lo // round_to) * round_to
    return np.unique(np.append(np.arange(first, width + 1, round_to, dtype=np.int64), width))


def channel_order(scores: np.ndarray) -> np.ndarray:
    """Channel indices by decreasing score, ties by increasing index."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def kept_channels(scores: np.ndarray, width: int) -> list[int]:
    """Sorted indices of the ``width`` best channels."""
    return sorted(channel_order(scores)[:width].tolist())


@dataclass
class _Instance:
    """The problem over prunable groups only: choice grids, their values and an exact integer cost."""

    names: list[str]
    grids: list[np.ndarray]  # allowed widths (int64, ascending)
    values: list[np.ndarray]  # V_g at each allowed width
    const: int
    lin: np.ndarray  # per group: cost += lin * w
    sq: np.ndarray  # per group: cost += sq * w * w
    edges: dict[tuple[int, int], int]  # (i < j): cost += c * w_i * w_j

    def restrict(self, low: np.ndarray, high: np.ndarray) -> _Instance:
        """The same problem with group ``i`` limited to choices ``low[i]..high[i]``."""
        grids = [g[a : b + 1] for g, a, b in zip(self.grids, low, high)]
        values = [v[a : b + 1] for v, a, b in zip(self.values, low, high)]
        return _Instance(self.names, grids, values, self.const, self.lin, self.sq, self.edges)

    def widths(self, idx: np.ndarray) -> list[int]:
        return [int(g[k]) for g, k in zip(self.grids, idx)]

    def value(self, idx: np.ndarray) -> float:
        return float(sum(v[k] for v, k in zip(self.values, idx)))

    def cost(self, idx: np.ndarray) -> int:
        w = self.widths(idx)
        total = self.const + sum(int(a) * x + int(b) * x * x for a, b, x in zip(self.lin, self.sq, w))
        return total + sum(c * w[i] * w[j] for (i, j), c in self.edges.items())


def _reduce(problem: KnapsackProblem) -> _Instance:
    """Substitute the fixed groups' full widths into the polynomial; index the prunable groups."""
    names = list(problem.scores)
    pos = {g: i for i, g in enumerate(names)}
    full = problem.full_widths
    lin, sq = np.zeros(len(names), np.int64), np.zeros(len(names), np.int64)
    const, edges = int(problem.macs.const), {}
    for g, c in problem.macs.linear.items():
        if g in pos:
            lin[pos[g]] += c
        else:
            const += c * full[g]
    for (g, h), c in problem.macs.pairs.items():
        const += _add_pair(pos, full, lin, sq, edges, g, h, c)
    grids = [allowed_widths(full[g], problem.round_to, problem.min_keep_fraction) for g in names]
    values = [_prefix_values(problem.scores[g])[grid] for g, grid in zip(names, grids)]
    return _Instance(names, grids, values, const, lin, sq, edges)


def _add_pair(pos, full, lin, sq, edges, g: str, h: str, c: int) -> int:
    """Route one bilinear term to an edge, a square, a linear term or the constant (returned)."""
    if g in pos and h in pos:
        i, j = sorted((pos[g], pos[h]))
        if i == j:
            sq[i] += c
        else:
            edges[(i, j)] = edges.get((i, j), 0) + c
        return 0
    if g in pos or h in pos:
        mine, other = (g, h) if g in pos else (h, g)
        lin[pos[mine]] += c * full[other]
        return 0
    return c * full[g] * full[h]


def _prefix_values(scores: np.ndarray) -> np.ndarray:
    """``V(w)`` for ``w = 0..width``: sums of the ``w`` largest scores."""
    s = np.asarray(scores, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(s[channel_order(s)])])


def _check(problem: KnapsackProblem, solver: str) -> _Instance:
    """Validate the problem before any work; raise a ValueError saying what is wrong."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; available solvers: {sorted(SOLVERS)}")
    for g, s in problem.scores.items():
        if g not in problem.full_widths:
            raise ValueError(f"scores given for unknown group {g!r}")
        s = np.asarray(s)
        if s.shape != (problem.full_widths[g],) or not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ValueError(f"group {g!r}: scores must be {problem.full_widths[g]} finite values >= 0")
    if problem.round_to < 1 or not 0.0 <= problem.min_keep_fraction <= 1.0:
        raise ValueError("round_to must be >= 1 and min_keep_fraction in [0, 1]")
    coefs = [problem.macs.const, *problem.macs.linear.values(), *problem.macs.pairs.values()]
    if min(coefs) < 0:
        raise ValueError("the MACs polynomial must have non-negative coefficients")
    inst = _reduce(problem)
    lowest = inst.cost(np.zeros(len(inst.names), np.int64))
    if problem.budget < lowest:
        raise ValueError(
            f"budget {problem.budget} MACs is below the minimum achievable {lowest} MACs "
            f"(every prunable group at its lowest allowed width)"
        )
    return inst


def _solution(problem: KnapsackProblem, inst: _Instance, idx, bound: float, solver: str, t0: float) -> Solution:
    widths = dict(zip(inst.names, inst.widths(idx)))
    objective = inst.value(idx)
    gap = (bound - objective) / bound if bound > 0 else (0.0 if bound == objective else math.nan)
    keep = {g: kept_channels(problem.scores[g], w) for g, w in widths.items()}
    return Solution(widths, keep, objective, bound, gap, inst.cost(idx), solver, time.perf_counter() - t0)


# ------------------------------------------------------------------- variable elimination (the relaxation)


@dataclass
class _Step:
    """Eliminating one group: the neighbours its message depends on and the factors it consumes."""

    var: int
    scope: tuple[int, ...]  # neighbours, sorted
    edges: list[tuple[int, int]]  # (neighbour, coefficient) of the bilinear terms it consumes
    tables: list[int]  # ids of the dense tables it consumes
    out: int  # id of the table it creates (when the scope has >= 2 groups)


@dataclass
class _Plan:
    steps: list[_Step]
    relaxed: list[tuple[int, int, int]]  # edges replaced by their McCormick under-estimator (i, j, coef)
    scopes: dict[int, tuple[int, ...]] = field(init=False)  # table id -> its groups

    def __post_init__(self) -> None:
        self.scopes = {s.out: s.scope for s in self.steps if len(s.scope) >= 2}


def _plan(inst: _Instance) -> _Plan:
    """Elimination order by smallest created table; edges are relaxed only if a table would be too big."""
    edges = {i: dict() for i in range(len(inst.names))}
    for (i, j), c in inst.edges.items():
        edges[i][j] = edges[j][i] = c
    tables: dict[int, tuple[int, ...]] = {}
    steps, relaxed, left = [], [], set(edges)
    while left:
        size, v = min((_elim_size(inst, edges, tables, u), u) for u in sorted(left))
        if size > _TABLE_LIMIT and edges[v]:
            relaxed.append(_relax_edge(inst, edges, v))
            continue
        steps.append(_eliminate(edges, tables, v, len(steps)))
        left.discard(v)
    return _Plan(steps, relaxed)


def _scope(edges, tables, v: int) -> tuple[int, ...]:
    nb = set(edges[v]).union(*(s for s in tables.values() if v in s))
    nb.discard(v)
    return tuple(sorted(nb))


def _elim_size(inst: _Instance, edges, tables, v: int) -> int:
    """Entries of the table eliminating ``v`` creates (times its choices when it must combine tables)."""
    size = math.prod(len(inst.grids[u]) for u in _scope(edges, tables, v))
    return size * len(inst.grids[v]) if any(v in s for s in tables.values()) else size


def _relax_edge(inst: _Instance, edges, v: int) -> tuple[int, int, int]:
    """Drop the edge of ``v`` whose under-estimator loses least; it becomes linear in the relaxation."""
    span = lambda u: int(inst.grids[u][-1] - inst.grids[u][0])  # noqa: E731
    u = min(edges[v], key=lambda u: (edges[v][u] * span(u) * span(v), u))
    c = edges[v].pop(u)
    edges[u].pop(v)
    return (min(u, v), max(u, v), c)


def _eliminate(edges, tables, v: int, out: int) -> _Step:
    scope = _scope(edges, tables, v)
    step = _Step(v, scope, sorted(edges[v].items()), sorted(t for t, s in tables.items() if v in s), out)
    for u in edges.pop(v):
        edges[u].pop(v)
    for t in step.tables:
        del tables[t]
    if len(scope) >= 2:
        tables[out] = scope
    return step


# ------------------------------------------------------------------------------ one Lagrangian evaluation


def _unit_cost(inst: _Instance, relaxed: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """Per group, the separable part of the (relaxed) cost at each allowed width, as floats."""
    unit = [(a * g + b * g * g).astype(np.float64) for a, b, g in zip(inst.lin, inst.sq, inst.grids)]
    for i, j, c in relaxed:  # w_i w_j >= lo_j w_i + lo_i w_j - lo_i lo_j
        unit[i] = unit[i] + c * float(inst.grids[j][0]) * inst.grids[i]
        unit[j] = unit[j] + c * float(inst.grids[i][0]) * inst.grids[j]
    return unit


def _relaxed_cost(inst: _Instance, plan: _Plan, idx: np.ndarray) -> int:
    """The cost the relaxation sees: exact unless edges were relaxed (then a lower bound)."""
    w = inst.widths(idx)
    lo = [int(g[0]) for g in inst.grids]
    return inst.cost(idx) - sum(c * (w[i] - lo[i]) * (w[j] - lo[j]) for i, j, c in plan.relaxed)


def _maximise(inst: _Instance, plan: _Plan, unit: list[np.ndarray], lam: float) -> np.ndarray:
    """Choice indices maximising ``V(w) - lam * cost(w)`` (relaxed edges linearised), by elimination."""
    unary = [v - lam * u for v, u in zip(inst.values, unit)]
    tables: dict[int, np.ndarray] = {}
    kept = []
    for step in plan.steps:
        u = unary[step.var]
        kept.append(u)
        msg = _message(inst, plan, step, u, tables, lam)
        if len(step.scope) == 1:
            unary[step.scope[0]] = unary[step.scope[0]] + msg
        elif len(step.scope) >= 2:
            tables[step.out] = msg
    idx = np.zeros(len(inst.names), np.int64)
    for step, u in zip(reversed(plan.steps), reversed(kept)):
        idx[step.var] = int(np.argmax(_local(inst, plan, step, u, tables, lam, idx)))
    return idx


def _message(inst: _Instance, plan: _Plan, step: _Step, u: np.ndarray, tables, lam: float) -> np.ndarray:
    """``max`` over the eliminated group's choices, as a table over its scope."""
    if step.tables:
        return _combine(inst, plan, step, u, tables, lam).max(axis=0)
    x = inst.grids[step.var].astype(np.float64)
    t = np.zeros([len(inst.grids[n]) for n in step.scope])
    for n, c in step.edges:
        t = t + _along(lam * c * inst.grids[n], step.scope.index(n), len(step.scope))
    if x.size * t.size <= _DENSE:
        return (u[:, None] - x[:, None] * t.reshape(1, -1)).max(axis=0).reshape(t.shape)
    return _conjugate(x, u, t)


def _along(vec: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = len(vec)
    return np.asarray(vec, dtype=np.float64).reshape(shape)


def _conjugate(x: np.ndarray, u: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``max_k u[k] - x[k] * t`` for every entry of ``t``, via the upper concave hull of ``(x, u)``."""
    hx, hu = _upper_hull(x, u)
    slopes = np.diff(hu) / np.diff(hx)  # decreasing
    k = np.searchsorted(-slopes, -t.ravel(), side="left")  # number of hull slopes > t
    return (hu[k] - hx[k] * t.ravel()).reshape(t.shape)


def _upper_hull(x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the upper concave hull of points with increasing ``x``.

    Points on or below the chord of their neighbours are never hull vertices, so each pass drops all of
    them at once; a few passes suffice for the nearly concave functions met here (then a monotone chain).
    """
    for _ in range(32):
        if len(x) <= 2:
            return x, u
        below = (u[1:-1] - u[:-2]) * (x[2:] - x[1:-1]) <= (u[2:] - u[1:-1]) * (x[1:-1] - x[:-2])
        if not below.any():
            return x, u
        keep = np.concatenate([[True], ~below, [True]])
        x, u = x[keep], u[keep]
    hull: list[int] = []
    for k in range(len(x)):
        while len(hull) >= 2 and _turns_up(x, u, hull[-2], hull[-1], k):
            hull.pop()
        hull.append(k)
    return x[hull], u[hull]


def _turns_up(x, u, a: int, b: int, c: int) -> bool:
    """True when ``b`` lies on or below the chord from ``a`` to ``c``."""
    return (u[b] - u[a]) * (x[c] - x[a]) <= (u[c] - u[a]) * (x[b] - x[a])


def _combine(inst: _Instance, plan: _Plan, step: _Step, u: np.ndarray, tables, lam: float) -> np.ndarray:
    """Dense sum of every factor touching the eliminated group, axes ``(var, *scope)``."""
    full = (step.var, *step.scope)
    x = inst.grids[step.var].astype(np.float64)
    total = _along(u, 0, len(full))
    for n, c in step.edges:
        total = total - lam * c * _along(x, 0, len(full)) * _along(inst.grids[n], full.index(n), len(full))
    for t in step.tables:
        total = total + _expand(tables[t], plan.scopes[t], full)
    return total


def _expand(table: np.ndarray, scope: tuple[int, ...], full: tuple[int, ...]) -> np.ndarray:
    """``table`` (axes ``scope``) broadcast to the axes ``full`` (a superset)."""
    order = sorted(range(len(scope)), key=lambda a: full.index(scope[a]))
    shape = [1] * len(full)
    for a in order:
        shape[full.index(scope[a])] = table.shape[a]
    return np.transpose(table, order).reshape(shape)


def _local(inst: _Instance, plan: _Plan, step: _Step, u: np.ndarray, tables, lam: float, idx) -> np.ndarray:
    """The eliminated group's objective over its choices, its neighbours fixed at ``idx``."""
    x = inst.grids[step.var].astype(np.float64)
    total = u.copy()
    for n, c in step.edges:
        total -= lam * c * float(inst.grids[n][idx[n]]) * x
    for t in step.tables:
        scope = plan.scopes[t]
        total += tables[t][tuple(slice(None) if n == step.var else idx[n] for n in scope)]
    return total


# ----------------------------------------------------------------------------------------- the dual search


class _Pruned(Exception):
    """Raised by a dual evaluation that proves its box cannot beat the incumbent."""


@dataclass
class _Point:
    """One Lagrangian evaluation: the maximiser, its value and (relaxed) cost, and the bound it proves."""

    lam: float
    idx: np.ndarray
    value: float
    cost: int  # the cost the relaxation sees (the true cost unless edges were relaxed)
    bound: float


class _Dual:
    """``D(lam) = lam * B + max_w V(w) - lam * cost(w)`` over one box of widths; every ``D(lam)`` bounds it."""

    def __init__(self, inst: _Instance, plan: _Plan, budget: int, stop_at: float = -math.inf) -> None:
        self.inst, self.plan, self.budget, self.stop_at = inst, plan, budget, stop_at
        self.unit = _unit_cost(inst, plan.relaxed)
        self.bound = math.inf  # the smallest bound proved so far

    def __call__(self, lam: float) -> _Point:
        idx = _maximise(self.inst, self.plan, self.unit, lam)
        value, cost = self.inst.value(idx), _relaxed_cost(self.inst, self.plan, idx)
        bound = value + lam * (self.budget - cost)
        point = _Point(lam, idx, value, cost, bound + _REL_TOL * abs(bound) + 1e-12)
        self.bound = min(self.bound, point.bound)
        if self.bound <= self.stop_at:
            raise _Pruned  # the box cannot beat the incumbent: no need to minimise further
        return point


def _dual_search(dual: _Dual, lam: float, max_iter: int = 60) -> tuple[_Point, _Point | None]:
    """Minimise the piecewise-linear convex dual by 1-D cutting planes from a starting multiplier.

    Returns:
        ``(best, over)``: the point proving the smallest bound (its maximiser fits the budget) and the last
        maximiser over budget (None when the unconstrained maximiser already fits: the box is solved).
    """
    B = dual.budget
    lo, hi = _bracket(dual, lam)
    if lo is None:
        return hi, None
    for _ in range(max_iter):
        lam = (lo.value - hi.value) / (lo.cost - hi.cost)
        if not lo.lam < lam < hi.lam:
            break
        new = dual(lam)
        if new.bound <= lo.value + lam * (B - lo.cost) + 2 * _REL_TOL * abs(new.bound) + 1e-12:
            return new if new.cost <= B else hi, new if new.cost > B else lo  # lam minimises the dual
        lo, hi = (new, hi) if new.cost > B else (lo, new)
    return hi, lo


def _bracket(dual: _Dual, lam: float) -> tuple[_Point | None, _Point]:
    """Points over and within the budget, walking geometrically from ``lam`` (the parent's multiplier).

    Returns ``(None, point at lam = 0)`` when the unconstrained maximiser fits.
    """
    p, step = dual(lam if lam > 0 else _initial_multiplier(dual.inst)), 0.02
    up = p.cost > dual.budget
    while step < 1e30:
        to_zero = not up and step > 1e6
        q = dual(0.0 if to_zero else p.lam * (1 + step) if up else p.lam / (1 + step))
        if (q.cost > dual.budget) != up:
            return (p, q) if up else (q, p)
        if to_zero:
            return None, q
        p, step = q, step * 4
    raise RuntimeError("no multiplier brings the relaxed maximiser under the budget")


def _initial_multiplier(inst: _Instance) -> float:
    """Average value per MAC between all-lowest and all-full widths (a scale to start bracketing from)."""
    top = np.array([len(g) - 1 for g in inst.grids])
    dv = inst.value(top) - inst.value(np.zeros_like(top))
    dc = inst.cost(top) - inst.cost(np.zeros_like(top))
    return max(dv, 1e-12) / max(dc, 1)


# ------------------------------------------------------------------------------ primal: trim and fill


class _Local:
    """Widths as choice indices with exact integer step costs, for greedy trimming and filling."""

    def __init__(self, inst: _Instance) -> None:
        n, m = len(inst.names), max(len(g) for g in inst.grids)
        self.inst, self.size, self.rows = inst, np.array([len(g) for g in inst.grids]), np.arange(n)
        self.grid, self.val = np.zeros((n, m + 1), np.int64), np.zeros((n, m + 1))
        for i, (g, v) in enumerate(zip(inst.grids, inst.values)):
            self.grid[i, : len(g)], self.grid[i, len(g) :] = g, g[-1]
            self.val[i, : len(v)], self.val[i, len(v) :] = v, v[-1]
        self.adj = np.zeros((n, n), np.int64)
        for (i, j), c in inst.edges.items():
            self.adj[i, j] = self.adj[j, i] = c

    def complete(self, idx: np.ndarray, budget: int) -> np.ndarray:
        """A feasible solution near ``idx``: trimmed until it fits, then filled up to the budget."""
        idx = idx.copy()
        cost = self._trim(idx, self.inst.cost(idx), budget)
        self._fill(idx, cost, budget)
        return idx

    def _delta(self, idx: np.ndarray, to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact value and cost change of moving each group alone to choice ``to``."""
        x, y = self.grid[self.rows, idx], self.grid[self.rows, to]
        dc = (y - x) * (self.inst.lin + self.inst.sq * (x + y) + self.adj @ x)
        return self.val[self.rows, to] - self.val[self.rows, idx], dc

    def _trim(self, idx: np.ndarray, cost: int, budget: int) -> int:
        """Remove the steps losing least value per MAC saved until the cost fits."""
        while cost > budget:
            dv, dc = self._delta(idx, np.maximum(idx - 1, 0))
            loss = np.where(dc < 0, dv / np.minimum(dc, -1), np.inf)  # value lost per MAC saved
            i = int(np.argmin(loss))
            if loss[i] == np.inf:
                break
            idx[i] -= 1
            cost += int(dc[i])
        return cost

    def _fill(self, idx: np.ndarray, cost: int, budget: int) -> int:
        """Add the steps gaining most value per MAC while they fit."""
        while True:
            dv, dc = self._delta(idx, np.minimum(idx + 1, self.size - 1))
            ok = (idx + 1 < self.size) & (dc <= budget - cost)
            if not ok.any():
                return cost
            i = int(np.argmax(np.where(ok, np.where(dc > 0, dv / np.maximum(dc, 1), np.inf), -np.inf)))
            idx[i] += 1
            cost += int(dc[i])


# --------------------------------------------------------------------------- Lagrangian branch and bound


@dataclass(order=True)
class _Node:
    """A box of choice indices ``[low, high]`` per group, with the bound its dual search proved."""

    key: tuple[float, int]  # (-bound, creation order): best bound first, deterministic ties
    low: np.ndarray = field(compare=False)
    high: np.ndarray = field(compare=False)
    lam: float = field(compare=False)
    fit: _Point | None = field(compare=False, default=None)
    over: _Point | None = field(compare=False, default=None)

    @property
    def bound(self) -> float:
        return -self.key[0]


class _BranchAndBound:
    """Best-first branch and bound over width boxes with Lagrangian bounds (exact inner maximisation)."""

    def __init__(self, inst: _Instance, budget: int, gap_tol: float, deadline: float) -> None:
        self.inst, self.budget, self.gap_tol, self.deadline = inst, budget, gap_tol, deadline
        self.plan, self.local = _plan(inst), _Local(inst)
        self.best, self.best_value, self.closed_bound, self.count = None, -math.inf, -math.inf, 0

    def run(self) -> tuple[np.ndarray, float]:
        """The best solution found and a valid upper bound on the optimum."""
        top = np.array([len(g) - 1 for g in self.inst.grids])
        open_ = [self._evaluate(np.zeros_like(top), top, _initial_multiplier(self.inst), math.inf)]
        while open_ and not self._done(open_[0].bound) and time.perf_counter() < self.deadline:
            node = heapq.heappop(open_)
            for child in self._children(node):
                heapq.heappush(open_, child)
        bound = max([self.best_value, self.closed_bound] + [n.bound for n in open_])
        return self.best, bound

    def _threshold(self) -> float:
        """Bounds up to here are within the tolerance (plus the bounds' rounding margin) of the incumbent."""
        if self.best is None:
            return -math.inf
        return self.best_value + (self.gap_tol + 4 * _REL_TOL) * abs(self.best_value) + 4e-12

    def _done(self, bound: float) -> bool:
        return bound <= self._threshold()

    def _evaluate(self, low: np.ndarray, high: np.ndarray, lam: float, parent: float) -> _Node:
        """Dual search on a box; its points seed incumbents."""
        self.count += 1
        dual = _Dual(self.inst.restrict(low, high), self.plan, self.budget, self._threshold())
        try:
            fit, over = _dual_search(dual, lam)
        except _Pruned:
            return _Node((-dual.bound, self.count), low, high, lam)
        for p in (fit, over):
            if p is not None:
                self._offer(self.local.complete(p.idx + low, self.budget))
        return _Node((-min(dual.bound, parent), self.count), low, high, fit.lam, fit, over)

    def _offer(self, idx: np.ndarray) -> None:
        value = self.inst.value(idx)
        if value > self.best_value and self.inst.cost(idx) <= self.budget:
            self.best, self.best_value = idx, value

    def _children(self, node: _Node) -> list[_Node]:
        """Split the box in two; children that cannot beat the incumbent are closed."""
        split = self._split(node)
        if split is None:  # solved: the box's relaxed maximiser fits
            self.closed_bound = max(self.closed_bound, node.bound)
            return []
        i, mid = split
        kids = []
        for lo_i, hi_i in ((node.low[i], mid), (mid + 1, node.high[i])):
            low, high = node.low.copy(), node.high.copy()
            low[i], high[i] = lo_i, hi_i
            if self.inst.cost(low) > self.budget:
                continue
            kid = self._evaluate(low, high, node.lam, node.bound)
            if self._done(kid.bound):
                self.closed_bound = max(self.closed_bound, kid.bound)
            else:
                kids.append(kid)
        return kids

    def _split(self, node: _Node) -> tuple[int, int] | None:
        """Branch between the dual's two maximisers (or, if edges were relaxed, halve one of their groups)."""
        if node.over is not None:
            i = _branch_variable(self.inst, node)
            a, b = sorted((node.fit.idx[i] + node.low[i], node.over.idx[i] + node.low[i]))
            return i, (a + b) // 2
        if self.inst.cost(node.fit.idx + node.low) <= self.budget:
            return None
        ends = {k for i, j, _ in self.plan.relaxed for k in (i, j)}
        i = max(sorted(ends), key=lambda k: node.high[k] - node.low[k])
        return i, (node.low[i] + node.high[i]) // 2


def _branch_variable(inst: _Instance, node: _Node) -> int:
    """The group where the dual's two maximisers differ most in value."""
    best, pick = -1.0, 0
    for i, (v, low, a, b) in enumerate(zip(inst.values, node.low, node.fit.idx, node.over.idx)):
        if a != b and abs(v[low + a] - v[low + b]) > best:
            best, pick = abs(v[low + a] - v[low + b]), i
    return pick


# ---------------------------------------------------------------------------------------------- solvers

SolverFn = Callable[[KnapsackProblem, float, float], tuple[dict[str, int], float]]
SOLVERS: dict[str, SolverFn] = {}


def register_solver(name: str) -> Callable[[SolverFn], SolverFn]:
    """Decorator adding ``fn(problem, time_limit, gap_tol) -> (widths, upper bound or NaN)`` to SOLVERS."""

    def add(fn: SolverFn) -> SolverFn:
        SOLVERS[name] = fn
        return fn

    return add


def solve(
    problem: KnapsackProblem, solver: str = "exact", time_limit: float = 10.0, gap_tol: float = 1e-6
) -> Solution:
    """Choose the kept channels of every prunable group under the MACs budget.

    Args:
        problem: scores, cost polynomial, widths, budget and width rules.
        solver: a name in :data:`SOLVERS` (``exact``: optimal with a proven bound; ``greedy``: the paper's).
        time_limit: seconds the solver may use (soft: checked between branch-and-bound nodes).
        gap_tol: ``exact`` stops once ``(bound - objective) <= gap_tol * objective`` (0: prove optimality).

    Raises:
        ValueError: unknown solver, malformed scores, or a budget below the minimum achievable MACs.
    """
    inst = _check(problem, solver)
    t0 = time.perf_counter()
    widths, bound = SOLVERS[solver](problem, time_limit, gap_tol)
    idx = np.array([int(np.searchsorted(g, widths[n])) for n, g in zip(inst.names, inst.grids)], np.int64)
    return _solution(problem, inst, idx, bound, solver, t0)


@register_solver("exact")
def _exact(problem: KnapsackProblem, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """Lagrangian branch and bound: optimal within ``gap_tol`` (or the best found at the time limit)."""
    inst = _reduce(problem)
    search = _BranchAndBound(inst, problem.budget, gap_tol, time.perf_counter() + time_limit)
    best, bound = search.run()
    return dict(zip(inst.names, inst.widths(best))), bound


@register_solver("greedy")
def _greedy(problem: KnapsackProblem, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """The paper's knapsack: per-channel weight = own producing layers' MACs at full neighbouring widths."""
    inst = _reduce(problem)
    weight = _producer_weights(problem, inst)
    full = inst.cost(np.array([len(g) - 1 for g in inst.grids]))
    approx = full - sum(int(w) * int(g[-1] - g[0]) for w, g in zip(weight, inst.grids))
    idx = np.zeros(len(inst.names), np.int64)
    for _, i, k in sorted(_greedy_items(inst, weight)):
        step = int(weight[i]) * int(inst.grids[i][k] - inst.grids[i][k - 1])
        if approx + step > problem.budget:
            break
        approx, idx[i] = approx + step, k
    return dict(zip(inst.names, inst.widths(idx))), math.nan


def _producer_weights(problem: KnapsackProblem, inst: _Instance) -> np.ndarray:
    """MACs per channel of each group's own producing layers, neighbours at full width."""
    pos = {g: i for i, g in enumerate(inst.names)}
    weight = np.array([problem.macs.linear.get(g, 0) for g in inst.names], np.int64)
    for (out, src), c in problem.macs.pairs.items():
        if out in pos:
            weight[pos[out]] += c * problem.full_widths[src]
    return weight


def _greedy_items(inst: _Instance, weight: np.ndarray) -> list[tuple[float, int, int]]:
    """``(-value/weight, group, step)`` for every step between consecutive allowed widths."""
    items = []
    for i, (g, v) in enumerate(zip(inst.grids, inst.values)):
        for k in range(1, len(g)):
            w = int(weight[i]) * int(g[k] - g[k - 1])
            items.append((-(v[k] - v[k - 1]) / w if w > 0 else -math.inf, i, k))
    return items


@register_solver("uniform")
def _uniform(problem: KnapsackProblem, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """Baseline: the same keep ratio in every group, the largest whose (rounded) widths fit the budget."""
    inst = _reduce(problem)

    def at(ratio: float) -> np.ndarray:
        # per group, the largest allowed width <= ratio * full width (its lowest allowed width at least)
        return np.array([max(0, int(np.searchsorted(g, ratio * g[-1], side="right")) - 1) for g in inst.grids], np.int64)

    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection on the ratio: MACs are monotone in it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if inst.cost(at(mid)) <= problem.budget else (lo, mid)
    return dict(zip(inst.names, inst.widths(at(lo)))), math.nan


# ------------------------------------------------------------------------------------ CP-SAT cross-check

_CPSAT_SCALE = 1e9  # the largest possible total value (every group full) becomes this many integer units
_CPSAT_SEED = 0


@register_solver("cpsat")
def _cpsat(problem: KnapsackProblem, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """The exact problem as an OR-tools CP-SAT model: a cross-check of ``exact`` (slow on big models).

    Per group, one-hot booleans choose an allowed width; the integer width ``w_g`` and the value are linear in
    them (so is ``w_g ** 2``), every coupled pair's product ``w_i * w_j`` is an integer variable tied by
    ``AddMultiplicationEquality``, and the MACs are the exact integer polynomial ``<= budget``.

    CP-SAT needs integer objectives: each value ``V_g(w)`` is scaled by ``S = 1e9 / M`` (``M`` the total value
    at full widths) and rounded, so a solution's scaled value is off by at most ``E = sum_g max_w |rounding|``
    (``<= n_groups / 2``) units, i.e. ``E / 1e9`` of ``M``. The reported bound is the solver's best objective
    bound plus ``E``, converted back (so it stays a valid upper bound); the chosen solution is optimal for the
    rounded values, hence within ``2 E / S`` of the true optimum when CP-SAT proves optimality.

    The search is hinted with the ``uniform`` baseline's widths (feasible; it finds good solutions about 3x
    sooner). Deterministic (one worker, a fixed seed) unless the ``time_limit`` (seconds, wall clock)
    interrupts it; ``gap_tol`` is CP-SAT's ``relative_gap_limit``. Without any solution by the time limit it
    returns the lowest widths (always within budget) and the trivial bound (every group full).
    """
    from ortools.sat.python import cp_model

    inst = _reduce(problem)
    n = len(inst.names)
    total = float(sum(v[-1] for v in inst.values))
    scale = _CPSAT_SCALE / total if total > 0 else 1.0
    scaled = [np.rint(v * scale).astype(np.int64) for v in inst.values]
    slack = float(sum(np.abs(v * scale - s).max() for v, s in zip(inst.values, scaled)))

    model = cp_model.CpModel()
    choose, width = [], []
    for i, grid in enumerate(inst.grids):
        b = [model.NewBoolVar(f"{inst.names[i]}={int(w)}") for w in grid]
        model.AddExactlyOne(b)
        w = model.NewIntVarFromDomain(cp_model.Domain.FromValues(grid.tolist()), f"w[{inst.names[i]}]")
        model.Add(w == sum(int(x) * bk for x, bk in zip(grid, b)))
        choose.append(b)
        width.append(w)
    cost = inst.const + sum(int(a) * w for a, w in zip(inst.lin, width) if a)
    for i, g in enumerate(inst.grids):  # w ** 2 is linear in the one-hot choice
        if inst.sq[i]:
            cost += sum(int(inst.sq[i]) * int(x) * int(x) * bk for x, bk in zip(g, choose[i]))
    for (i, j), c in sorted(inst.edges.items()):
        gi, gj = inst.grids[i], inst.grids[j]
        name = f"w[{inst.names[i]}]*w[{inst.names[j]}]"
        prod = model.NewIntVar(int(gi[0] * gj[0]), int(gi[-1] * gj[-1]), name)
        model.AddMultiplicationEquality(prod, [width[i], width[j]])
        cost += int(c) * prod
    if isinstance(cost, (int, np.integer)):  # no prunable group costs anything
        model.Add(model.NewConstant(cost) <= problem.budget)
    else:
        model.Add(cost <= problem.budget)
    model.Maximize(sum(int(v) * bk for i in range(n) for v, bk in zip(scaled[i], choose[i])))

    start = _uniform(problem, time_limit, gap_tol)[0]  # a feasible first solution (not from ``exact``)
    for name, grid, b, w in zip(inst.names, inst.grids, choose, width):
        model.AddHint(w, start[name])
        for x, bk in zip(grid, b):
            model.AddHint(bk, int(x) == start[name])
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = _CPSAT_SEED
    solver.parameters.max_time_in_seconds = max(float(time_limit), 1e-3)
    solver.parameters.relative_gap_limit = float(gap_tol)
    solver.parameters.linearization_level = 2  # every constraint's relaxation in the LP: much tighter bounds
    solver.parameters.cp_model_probing_level = 0  # probing 10k choice literals costs seconds, gains nothing
    status = solver.Solve(model)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        idx = np.array([[solver.BooleanValue(bk) for bk in b].index(True) for b in choose], np.int64)
    elif status == cp_model.UNKNOWN:  # no solution within the time limit: the lowest widths always fit
        idx = np.zeros(n, np.int64)
    else:
        why = model.Validate() or f"budget {problem.budget}"
        raise RuntimeError(f"CP-SAT found the model {solver.StatusName(status)}: {why}")
    bound = total  # every group full: always an upper bound
    if status != cp_model.UNKNOWN:  # without a solution CP-SAT's reported bound is unset (0), not a bound
        bound = min((solver.BestObjectiveBound() + slack) / scale, total)
    bound += _REL_TOL * abs(bound) + 1e-12  # float round-off of the conversion
    return dict(zip(inst.names, inst.widths(idx))), bound


@register_solver("threshold")
def _threshold(problem: KnapsackProblem, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """Baseline: global ranking (what most libraries do). Drop every channel scoring below one global
    threshold, the lowest threshold whose widths fit the budget; costs play no part in the ranking."""
    inst = _reduce(problem)
    scores = [np.sort(np.asarray(problem.scores[n], dtype=np.float64)) for n in inst.names]

    def at(threshold: float) -> np.ndarray:
        counts = [len(s) - int(np.searchsorted(s, threshold, side="left")) for s in scores]
        return np.array([max(0, int(np.searchsorted(g, c, side="right")) - 1) for g, c in zip(inst.grids, counts)], np.int64)

    candidates = np.unique(np.concatenate(scores + [np.array([np.inf])]))
    lo, hi = 0, len(candidates) - 1  # at(candidates[hi]) keeps the fewest channels: feasible (checked before)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if inst.cost(at(candidates[mid])) <= problem.budget else (mid + 1, hi)
    return dict(zip(inst.names, inst.widths(at(candidates[lo])))), math.nan
