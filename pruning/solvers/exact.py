"""``exact``: Lagrangian branch and bound, optimal within ``gap_tol`` with a proven upper bound.

Relaxing the constraints with multipliers ``lam >= 0`` (one per constraint, costs measured in units of their
limits) leaves ``max_w V(w) - sum_k lam_k cost_k(w)``, which has no limit, only couplings between pairs of
groups. It is solved *exactly* by variable elimination (dynamic programming) over the coupling graph: a tree in
EfficientNets (bilinear messages are 1-D conjugates computed from a concave hull; measured tables and
removable-block ties are dense), chains of triangles in ResNets (2-D tables). Every ``lam`` proves the upper
bound ``D(lam) = sum_k lam_k + max_w (V - lam . cost)``. The best ``lam`` is found by 1-D cutting planes for
one constraint, and by Kelley's cutting planes (a small LP) for several; both are finite because the dual is
piecewise linear. Maximisers on either side of the limits are completed into feasible solutions by a greedy on
exact costs, and the box of allowed widths is split between them (best bound first) until the gap is below
``gap_tol``. Couplings whose elimination table would be too large or span more than two groups (DenseNets'
concatenations) are relaxed (McCormick at the box corner nearest the incumbent for bilinear costs, the lowest
column for tables) and branched on instead. One evaluation of a dense coupling can still take a while, so the
deadline is checked between evaluations, not only between boxes: a stopped search reports the best feasible
solution found and the smallest dual value proved (every ``D(lam)`` bounds its box).
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..solve import register_solver
from .instance import Instance
from .local import LocalSearch

_DENSE = 4096  # largest (choices x table) product evaluated densely; larger bilinear messages use a concave hull
# Limits on the tables variable elimination builds; beyond them edges are relaxed. Trees (EfficientNets) and
# chains of triangles (ResNets, <= 2M entries even at wide_resnet101_2 with round_to=1) stay within both;
# DenseNets' concatenations couple every layer of a block with every later one, and exact tables there reach
# billions of entries (seconds per dual evaluation): bounded, an evaluation takes ~0.05 s on densenet121.
_TABLE_LIMIT = 4_000_000  # entries of one table (times the eliminated group's choices when it combines tables)
_SCOPE_LIMIT = 2  # groups one created table may span
_REL_TOL = 1e-12
_KNOWN = 32  # maximisers a box passes on to its children as cutting planes (several constraints)


@register_solver("exact")
def solve_exact(inst: Instance, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """Lagrangian branch and bound: optimal within ``gap_tol`` (or the best found at the time limit)."""
    search = _BranchAndBound(inst, gap_tol, time.perf_counter() + time_limit)
    best, bound = search.run()
    return dict(zip(inst.names, inst.widths(best))), bound


# ------------------------------------------------------------------- variable elimination (the relaxation)


@dataclass
class _Step:
    """Eliminating one group: the neighbours its message depends on and the factors it consumes."""

    var: int
    scope: tuple[int, ...]  # neighbours, sorted
    edges: list[int]  # neighbours joined to it by a (non-relaxed) cost edge
    tables: list[int]  # ids of the dense tables it consumes
    out: int  # id of the table it creates (when the scope has >= 2 groups)


@dataclass
class _Plan:
    steps: list[_Step]
    relaxed: list[tuple[int, int]]  # edges replaced by a separable under-estimator
    scopes: dict[int, tuple[int, ...]] = field(init=False)  # table id -> its groups

    def __post_init__(self) -> None:
        self.scopes = {s.out: s.scope for s in self.steps if len(s.scope) >= 2}


def _plan(inst: Instance) -> _Plan:
    """Elimination order by smallest created table; edges are relaxed only if a table would be too big or
    span more than ``_SCOPE_LIMIT`` groups."""
    adj: dict[int, set[int]] = {i: set() for i in range(len(inst.names))}
    for i, j in inst.edges:
        adj[i].add(j)
        adj[j].add(i)
    dense = {e for e, edge in inst.edges.items() if edge.dense}
    tables: dict[int, tuple[int, ...]] = {}
    steps, relaxed, left = [], [], set(adj)
    while left:
        order = sorted((_elim_size(inst, adj, tables, dense, u), u) for u in left)
        size, v = order[0]
        if not _fits(adj, tables, v, size):
            # relaxing edges cannot shrink the tables a group already shares, so take the smallest group whose
            # tables alone fit, then relax its edges one by one (the first group when none fits)
            v = next((u for _, u in order if _fits({u: ()}, tables, u, _table_size(inst, tables, u))), v)
            if adj[v] and not _fits(adj, tables, v, _elim_size(inst, adj, tables, dense, v)):
                relaxed.append(_relax_edge(inst, adj, v))
                continue
        steps.append(_eliminate(adj, tables, v, len(steps)))
        left.discard(v)
    return _Plan(steps, relaxed)


def _fits(adj, tables, v: int, size: int) -> bool:
    return size <= _TABLE_LIMIT and len(_scope(adj, tables, v)) <= _SCOPE_LIMIT


def _table_size(inst: Instance, tables, v: int) -> int:
    """Entries of the table eliminating ``v`` would create with all its edges relaxed."""
    scope = _scope({v: ()}, tables, v)
    return math.prod(len(inst.grids[u]) for u in scope) * (len(inst.grids[v]) if scope else 1)


def _scope(adj, tables, v: int) -> tuple[int, ...]:
    nb = set(adj[v]).union(*(s for s in tables.values() if v in s))
    nb.discard(v)
    return tuple(sorted(nb))


def _elim_size(inst: Instance, adj, tables, dense, v: int) -> int:
    """Entries of the table eliminating ``v`` creates (times its choices when it must combine tables)."""
    size = math.prod(len(inst.grids[u]) for u in _scope(adj, tables, v))
    combines = any(v in s for s in tables.values()) or any((min(v, u), max(v, u)) in dense for u in adj[v])
    return size * len(inst.grids[v]) if combines else size


def _relax_edge(inst: Instance, adj, v: int) -> tuple[int, int]:
    """Drop the edge of ``v`` whose under-estimator loses least (bilinear before dense ones)."""
    span = lambda u: int(inst.grids[u][-1] - inst.grids[u][0])  # noqa: E731
    scale = inst.scale()

    def loss(u: int) -> tuple[float, int]:
        e = inst.edges[(min(u, v), max(u, v))]
        bilinear = sum(float(c) * s for c, s in zip(e.coef, scale)) * span(u) * span(v)
        return (math.inf if e.dense else bilinear, u)

    u = min(adj[v], key=loss)
    adj[v].discard(u)
    adj[u].discard(v)
    return (min(u, v), max(u, v))


def _eliminate(adj, tables, v: int, out: int) -> _Step:
    scope = _scope(adj, tables, v)
    step = _Step(v, scope, sorted(adj[v]), sorted(t for t, s in tables.items() if v in s), out)
    for u in adj.pop(v):
        adj[u].discard(v)
    for t in step.tables:
        del tables[t]
    if len(scope) >= 2:
        tables[out] = scope
    return step


# -------------------------------------------------------------------------- the Lagrangian's costs


@dataclass
class _Weights:
    """Costs at one multiplier vector: per group a unary array, per edge a bilinear coefficient or a table."""

    unary: list[np.ndarray]
    coef: dict[tuple[int, int], float]
    table: dict[tuple[int, int], np.ndarray]
    ties: dict[tuple[int, int], np.ndarray]  # True where one group of a removable block is at 0 and the other not


class _Costs:
    """One box's costs in units of their limits, with relaxed edges replaced by separable under-estimators.

    A relaxed bilinear edge ``c w_i w_j`` is under-estimated by the McCormick plane through the box's lowest
    or highest corner, whichever is closer at ``near`` (choice indices in the box, e.g. the incumbent): the
    error ``c |w_i - a| |w_j - b|`` vanishes at the corner ``(a, b)``, and solutions under a budget sit nearer
    the full widths than the lowest ones.
    """

    def __init__(self, inst: Instance, plan: _Plan, near: np.ndarray | None = None) -> None:
        self.inst, self.plan = inst, plan
        scale, relaxed = inst.scale(), set(plan.relaxed)
        self.unit = [[s * u.astype(np.float64) for u in uk] for s, uk in zip(scale, inst.unary)]
        self.coef = [{e: s * float(edge.coef[k]) for e, edge in inst.edges.items() if e not in relaxed}
                     for k, s in enumerate(scale)]
        self.tables = [{e: s * edge.tables[k].astype(np.float64) for e, edge in inst.edges.items()
                        if e not in relaxed and edge.tables[k] is not None} for k, s in enumerate(scale)]
        self.ties = {e: _tie_mask(inst, *e) for e, edge in inst.edges.items() if edge.tie and e not in relaxed}
        self.corner = {e: _corner(inst, *e, near) for e in plan.relaxed}  # relaxed edge -> (a, b) choice indices
        for i, j in plan.relaxed:
            self._underestimate(i, j, scale)

    def _underestimate(self, i: int, j: int, scale: np.ndarray) -> None:
        """``c w_i w_j >= c (b w_i + a w_j - a b)`` at a corner ``(a, b)`` (McCormick); ``T[a, b] >= T[a, lowest b]``."""
        gi, gj, edge = self.inst.grids[i], self.inst.grids[j], self.inst.edges[(i, j)]
        a, b = (float(g[c]) for g, c in zip((gi, gj), self.corner[(i, j)]))
        for k, s in enumerate(scale):
            c = s * float(edge.coef[k])
            self.unit[k][i] = self.unit[k][i] + c * b * (gi - a)
            self.unit[k][j] = self.unit[k][j] + c * a * gj
            if edge.tables[k] is not None:
                self.unit[k][i] = self.unit[k][i] + s * edge.tables[k][:, 0].astype(np.float64)

    def weights(self, lam: np.ndarray) -> _Weights:
        unary = [sum(lam[k] * self.unit[k][i] for k in range(len(lam))) for i in range(len(self.inst.names))]
        coef = {e: sum(lam[k] * ck[e] for k, ck in enumerate(self.coef)) for e in self.coef[0]}
        table: dict[tuple[int, int], np.ndarray] = {}
        for k, tk in enumerate(self.tables):
            for e, t in tk.items():
                table[e] = table[e] + lam[k] * t if e in table else lam[k] * t
        return _Weights(unary, coef, table, self.ties)

    def relaxed_costs(self, idx: np.ndarray) -> np.ndarray:
        """Costs as the relaxation sees them, in units of the limits: exact unless edges were relaxed."""
        inst, scale = self.inst, self.inst.scale()
        out = np.array([s * float(c) for s, c in zip(scale, inst.costs(idx))])
        for i, j in self.plan.relaxed:
            a, b = idx[i], idx[j]
            gi, gj, edge = inst.grids[i], inst.grids[j], inst.edges[(i, j)]
            ci, cj = self.corner[(i, j)]
            for k, s in enumerate(scale):
                out[k] -= s * float(edge.coef[k]) * float(gi[a] - gi[ci]) * float(gj[b] - gj[cj])
                if edge.tables[k] is not None:
                    out[k] -= s * float(edge.tables[k][a, b] - edge.tables[k][a, 0])
        return out


def _corner(inst: Instance, i: int, j: int, near: np.ndarray | None) -> tuple[int, int]:
    """The box corner (choice indices) whose McCormick plane errs least at ``near`` (the lowest without it)."""
    gi, gj = inst.grids[i], inst.grids[j]
    if near is None:
        return 0, 0
    x, y = float(gi[near[i]]), float(gj[near[j]])
    low = (x - gi[0]) * (y - gj[0])
    high = (gi[-1] - x) * (gj[-1] - y)
    return (len(gi) - 1, len(gj) - 1) if high < low else (0, 0)


def _tie_mask(inst: Instance, i: int, j: int) -> np.ndarray:
    """True where exactly one of the two groups is at width 0 (a half-removed block)."""
    return (inst.grids[i][:, None] == 0) != (inst.grids[j][None, :] == 0)


def _maximise(inst: Instance, plan: _Plan, w: _Weights) -> np.ndarray:
    """Choice indices maximising ``V(w) - cost(w)`` under the weights ``w``, by elimination."""
    unary = [v - u for v, u in zip(inst.values, w.unary)]
    tables: dict[int, np.ndarray] = {}
    kept = []
    for step in plan.steps:
        u = unary[step.var]
        kept.append(u)
        msg = _message(inst, plan, step, u, tables, w)
        if len(step.scope) == 1:
            unary[step.scope[0]] = unary[step.scope[0]] + msg
        elif len(step.scope) >= 2:
            tables[step.out] = msg
    idx = np.zeros(len(inst.names), np.int64)
    for step, u in zip(reversed(plan.steps), reversed(kept)):
        idx[step.var] = int(np.argmax(_local(inst, plan, step, u, tables, w, idx)))
    return idx


def _message(inst: Instance, plan: _Plan, step: _Step, u: np.ndarray, tables, w: _Weights) -> np.ndarray:
    """``max`` over the eliminated group's choices, as a table over its scope."""
    ties = [n for n in step.edges if _key(step.var, n) in w.ties]
    if step.tables or any(_key(step.var, n) in w.table for n in step.edges) or (ties and len(step.scope) > 1):
        return _combine(inst, plan, step, u, tables, w).max(axis=0)
    x = inst.grids[step.var].astype(np.float64)
    t = np.zeros([len(inst.grids[n]) for n in step.scope])
    for n in step.edges:
        t = t + _along(w.coef[_key(step.var, n)] * inst.grids[n], step.scope.index(n), len(step.scope))
    if not ties:
        return _bilinear_max(x, u, t)
    # a removable block's two groups: width 0 pairs with width 0 only, the rest with the rest
    zero, other = x == 0, inst.grids[ties[0]] == 0
    keep = _bilinear_max(x[~zero], u[~zero], t) if (~zero).any() else np.full(t.shape, -np.inf)
    return np.where(other, u[zero].max() if zero.any() else -np.inf, keep)


def _bilinear_max(x: np.ndarray, u: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``max_k u[k] - x[k] * t`` for every entry of ``t``: dense when small, else through the concave hull."""
    if x.size * t.size <= _DENSE:
        return (u[:, None] - x[:, None] * t.reshape(1, -1)).max(axis=0).reshape(t.shape)
    return _conjugate(x, u, t)


def _key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


def _oriented(w: _Weights, v: int, n: int) -> np.ndarray:
    """The dense table of edge (v, n) with ``v``'s choices on axis 0."""
    t = w.table[_key(v, n)]
    return t if v < n else t.T


def _oriented_mask(w: _Weights, v: int, n: int) -> np.ndarray:
    m = w.ties[_key(v, n)]
    return m if v < n else m.T


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


def _combine(inst: Instance, plan: _Plan, step: _Step, u: np.ndarray, tables, w: _Weights) -> np.ndarray:
    """Dense sum of every factor touching the eliminated group, axes ``(var, *scope)``."""
    full = (step.var, *step.scope)
    x = inst.grids[step.var].astype(np.float64)
    total = _along(u, 0, len(full))
    for n in step.edges:
        axis, key = full.index(n), _key(step.var, n)
        if key in w.coef and w.coef[key]:
            total = total - w.coef[key] * _along(x, 0, len(full)) * _along(inst.grids[n], axis, len(full))
        if key in w.table:
            total = total - _expand(_oriented(w, step.var, n), (step.var, n), full)
        if key in w.ties:
            total = np.where(_expand(_oriented_mask(w, step.var, n), (step.var, n), full), -np.inf, total)
    for t in step.tables:
        total = total + _expand(tables[t], plan.scopes[t], full)
    # every axis at its full size, also where all factors along it vanish (zero multipliers)
    return np.broadcast_to(total, [len(inst.grids[n]) for n in full])


def _expand(table: np.ndarray, scope: tuple[int, ...], full: tuple[int, ...]) -> np.ndarray:
    """``table`` (axes ``scope``) broadcast to the axes ``full`` (a superset)."""
    order = sorted(range(len(scope)), key=lambda a: full.index(scope[a]))
    shape = [1] * len(full)
    for a in order:
        shape[full.index(scope[a])] = table.shape[a]
    return np.transpose(table, order).reshape(shape)


def _local(inst: Instance, plan: _Plan, step: _Step, u: np.ndarray, tables, w: _Weights, idx) -> np.ndarray:
    """The eliminated group's objective over its choices, its neighbours fixed at ``idx``."""
    x = inst.grids[step.var].astype(np.float64)
    total = u.copy()
    for n in step.edges:
        key = _key(step.var, n)
        if key in w.coef and w.coef[key]:
            total -= w.coef[key] * float(inst.grids[n][idx[n]]) * x
        if key in w.table:
            total -= _oriented(w, step.var, n)[:, idx[n]]
        if key in w.ties:
            total[_oriented_mask(w, step.var, n)[:, idx[n]]] = -np.inf
    for t in step.tables:
        scope = plan.scopes[t]
        total += tables[t][tuple(slice(None) if n == step.var else idx[n] for n in scope)]
    return total


# ----------------------------------------------------------------------------------------- the dual search


class _Pruned(Exception):
    """Raised by a dual evaluation that proves its box cannot beat the incumbent."""


class _TimeUp(Exception):
    """Raised before a dual evaluation once the deadline has passed and the box already has a bound."""


@dataclass
class _Point:
    """One Lagrangian evaluation: the maximiser, its value and relaxed costs (in limits), and its bound."""

    lam: np.ndarray
    idx: np.ndarray
    value: float
    load: np.ndarray  # relaxed cost / limit, per constraint
    bound: float

    @property
    def over(self) -> bool:
        return bool(np.any(self.load > 1.0))


class _Dual:
    """``D(lam) = sum(lam) + max_w V(w) - lam . load(w)`` over one box; every ``D(lam)`` bounds it."""

    def __init__(self, inst: Instance, plan: _Plan, stop_at: float = -math.inf, deadline: float = math.inf,
                 parent: float = math.inf, near: np.ndarray | None = None) -> None:
        self.inst, self.plan, self.stop_at, self.deadline = inst, plan, stop_at, deadline
        self.costs = _Costs(inst, plan, near)
        self.bound = parent  # the smallest bound proved so far (the parent's bounds its sub-box too)
        self.points: list[_Point] = []

    def __call__(self, lam: np.ndarray) -> _Point:
        # one evaluation can take seconds on dense couplings: check the deadline between them, but only once
        # a bound exists (the root's first evaluation always runs, so a bound is always reported)
        if self.bound < math.inf and time.perf_counter() > self.deadline:
            raise _TimeUp
        lam = np.maximum(np.asarray(lam, dtype=np.float64), 0.0)
        idx = _maximise(self.inst, self.plan, self.costs.weights(lam))
        value, load = self.inst.value(idx), self.costs.relaxed_costs(idx)
        bound = value + float(lam @ (1.0 - load))
        point = _Point(lam, idx, value, load, bound + _REL_TOL * abs(bound) + 1e-12)
        self.points.append(point)
        self.bound = min(self.bound, point.bound)
        if self.bound <= self.stop_at:
            raise _Pruned  # the box cannot beat the incumbent: no need to minimise further
        return point

    def cut(self, idx: np.ndarray) -> _Point:
        """The cutting plane ``V(w) + lam . (1 - load(w))`` of widths ``w`` in the box (no bound of its own)."""
        return _Point(np.zeros(len(self.inst.limits)), idx, self.inst.value(idx), self.costs.relaxed_costs(idx), math.inf)


def _dual_search(dual: _Dual, lam: np.ndarray, known: list[np.ndarray] = ()) -> tuple[_Point, _Point | None]:
    """The multiplier proving the smallest bound, and a maximiser to branch against.

    Args:
        known: widths (choice indices within the box) already known to lie in it, e.g. the parent box's
            maximisers: each gives a valid cutting plane for several constraints.

    Returns:
        ``(best, other)``: ``best`` proves the smallest bound; ``other`` is a different maximiser on the other
        side of the limits (None when ``best`` is already optimal in its box: its maximiser fits, and for
        several constraints, meets the bound).
    """
    if len(lam) == 1:
        return _line_search(dual, float(lam[0]))
    return _boxstep(dual, lam, known)


def _line_search(dual: _Dual, lam: float, max_iter: int = 60) -> tuple[_Point, _Point | None]:
    """One constraint: minimise the piecewise-linear convex dual by 1-D cutting planes from ``lam``."""
    lo, hi = _bracket(dual, lam)
    if lo is None:
        return hi, None
    for _ in range(max_iter):
        lam = (lo.value - hi.value) / float(lo.load[0] - hi.load[0])
        if not lo.lam[0] < lam < hi.lam[0]:
            break
        new = dual(np.array([lam]))
        if new.bound <= lo.value + lam * (1.0 - lo.load[0]) + 2 * _REL_TOL * abs(new.bound) + 1e-12:
            return (hi, new) if new.over else (new, lo)  # lam minimises the dual
        lo, hi = (new, hi) if new.over else (lo, new)
    return hi, lo


def _bracket(dual: _Dual, lam: float) -> tuple[_Point | None, _Point]:
    """Points over and within the limit, walking geometrically from ``lam`` (the parent's multiplier).

    Returns ``(None, point at lam = 0)`` when the unconstrained maximiser fits.
    """
    p, step = dual(np.array([lam if lam > 0 else _initial_multipliers(dual.inst)[0]])), 0.02
    up = p.over
    while step < 1e30:
        to_zero = not up and step > 1e6
        q = dual(np.array([0.0 if to_zero else p.lam[0] * (1 + step) if up else p.lam[0] / (1 + step)]))
        if q.over != up:
            return (p, q) if up else (q, p)
        if to_zero:
            return None, q
        p, step = q, step * 4
    raise RuntimeError("no multiplier brings the relaxed maximiser within the limit")


def _boxstep(dual: _Dual, lam: np.ndarray, known: list[np.ndarray], max_iter: int = 100) -> tuple[_Point, _Point | None]:
    """Several constraints: cutting planes (an LP over the cuts found so far) inside a trust box around the
    best multiplier, which grows after a step that lowers the bound enough and shrinks after one that does not
    (Marsten's boxstep method: plain Kelley jumps between the corners of a large box)."""
    from scipy.optimize import linprog

    zero = dual(np.zeros_like(lam))
    if not zero.over:
        return zero, None
    center = dual(lam if np.any(lam > 0) else _initial_multipliers(dual.inst))
    cuts = [zero, center] + [dual.cut(idx) for idx in known]
    width = max(float(center.lam.max()), 1e-12)
    for _ in range(max_iter):
        low, high = np.maximum(center.lam - width, 0.0), center.lam + width
        found = _cut_minimum(linprog, cuts, low, high)
        if found is None:
            break
        new_lam, floor = found
        if center.bound - floor <= 1e-9 * max(1.0, abs(center.bound)):
            if _inside(new_lam, low, high):
                break  # the model's minimum is interior, so global: the center is optimal
            width *= 4.0
            continue
        point = dual(new_lam)
        cuts.append(point)
        if point.bound < center.bound - 0.1 * (center.bound - floor):
            center, width = point, width * 2.0
        else:
            width = max(width / 2.0, 1e-9 * max(1.0, float(center.lam.max())))
    best = min(dual.points, key=lambda p: p.bound)
    if not best.over and best.bound - best.value <= 1e-9 * max(1.0, abs(best.bound)):
        return best, None
    others = [p for p in dual.points if not np.array_equal(p.idx, best.idx)]
    if not others:
        return best, best
    return best, max(others, key=lambda p: (p.over != best.over, -abs(p.bound - best.bound)))


def _sides(points: list[_Point]) -> tuple[_Point | None, _Point | None]:
    """Of an unfinished search: the point proving the smallest bound, and the best one on the other side."""
    if not points:
        return None, None
    best = min(points, key=lambda p: p.bound)
    others = [p for p in points if p.over != best.over]
    return best, (min(others, key=lambda p: p.bound) if others else None)


def _inside(lam: np.ndarray, low: np.ndarray, high: np.ndarray) -> bool:
    margin = 1e-9 * np.maximum(1.0, high)
    return bool(np.all(((lam > low + margin) | (low == 0)) & (lam < high - margin)))


def _cut_minimum(linprog, cuts: list[_Point], low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Minimise ``max_t (V_t + lam . (1 - load_t))`` over ``low <= lam <= high``: (lam, the minimum), or None
    when the LP fails numerically (the bounds proved so far stay valid)."""
    k = len(cuts[0].lam)
    c = np.zeros(k + 1)
    c[-1] = 1.0  # minimise z
    a = np.array([np.append(1.0 - p.load, -1.0) for p in cuts])  # V_t + lam.(1 - load_t) <= z
    b = np.array([-p.value for p in cuts])
    res = linprog(c, A_ub=a, b_ub=b, bounds=[(float(a), float(b)) for a, b in zip(low, high)] + [(None, None)], method="highs")
    if res.status != 0:
        return None
    return res.x[:k], float(res.x[-1])


def _initial_multipliers(inst: Instance) -> np.ndarray:
    """Per constraint, average value per unit of its load between all-lowest and all-full widths, shared."""
    top, low = inst.highest(), inst.lowest()
    dv = inst.value(top) - inst.value(low)
    loads = (np.array(inst.costs(top), dtype=np.float64) - np.array(inst.costs(low), dtype=np.float64)) * inst.scale()
    return max(dv, 1e-12) / np.maximum(loads, 1e-12) / inst.n_constraints


# --------------------------------------------------------------------------- Lagrangian branch and bound


@dataclass(order=True)
class _Node:
    """A box of choice indices ``[low, high]`` per group, with the bound its dual search proved."""

    key: tuple[float, int]  # (-bound, creation order): best bound first, deterministic ties
    low: np.ndarray = field(compare=False)
    high: np.ndarray = field(compare=False)
    lam: np.ndarray = field(compare=False)
    best: _Point | None = field(compare=False, default=None)
    other: _Point | None = field(compare=False, default=None)
    known: list[np.ndarray] = field(compare=False, default_factory=list)  # maximisers found, absolute indices

    @property
    def bound(self) -> float:
        return -self.key[0]


class _BranchAndBound:
    """Best-first branch and bound over width boxes with Lagrangian bounds (exact inner maximisation)."""

    def __init__(self, inst: Instance, gap_tol: float, deadline: float) -> None:
        self.inst, self.gap_tol, self.deadline = inst, gap_tol, deadline
        self.plan, self.local = _plan(inst), LocalSearch(inst)
        self.best, self.best_value, self.closed_bound, self.count = None, -math.inf, -math.inf, 0

    def run(self) -> tuple[np.ndarray, float]:
        """The best solution found and a valid upper bound on the optimum."""
        low, top = self.inst.lowest(), self.inst.highest()
        self._offer(low)  # the lowest widths always fit: an incumbent from the start
        self._offer(self.local.complete(top))  # full widths trimmed to fit: a good one, where relaxations aim
        open_ = [self._evaluate(low, top, _initial_multipliers(self.inst), math.inf, [])]
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

    def _evaluate(self, low: np.ndarray, high: np.ndarray, lam: np.ndarray, parent: float,
                  known: list[np.ndarray]) -> _Node:
        """Dual search on a box (warm-started by its parent's multiplier and maximisers); its points seed
        incumbents."""
        self.count += 1
        near = None if self.best is None else np.clip(self.best, low, high) - low
        dual = _Dual(self.inst.restrict(low, high), self.plan, self._threshold(), self.deadline, parent, near)
        inside = [k - low for k in known if np.all(k >= low) and np.all(k <= high)]
        try:
            best, other = _dual_search(dual, lam, inside)
        except _Pruned:
            return _Node((-dual.bound, self.count), low, high, lam)
        except _TimeUp:  # stopped early: the smallest bound proved so far, and incumbents from both sides
            best, other = _sides(dual.points)
            if best is None:
                return _Node((-dual.bound, self.count), low, high, lam)
        for p in (best, other):
            if p is not None:
                self._offer(self.local.complete(p.idx + low))
        found = [p.idx + low for p in dual.points[-_KNOWN:]]
        return _Node((-dual.bound, self.count), low, high, best.lam, best, other, found)

    def _offer(self, idx: np.ndarray) -> None:
        value = self.inst.value(idx)
        if value > self.best_value and self.inst.fits(idx):
            self.best, self.best_value = idx, value

    def _children(self, node: _Node) -> list[_Node]:
        """Split the box in two; children that cannot beat the incumbent are closed."""
        split = self._split(node)
        if split is None:  # solved: the box's relaxed maximiser fits and proves its bound
            self.closed_bound = max(self.closed_bound, node.bound)
            return []
        i, mid = split
        kids = []
        for lo_i, hi_i in ((node.low[i], mid), (mid + 1, node.high[i])):
            low, high = node.low.copy(), node.high.copy()
            low[i], high[i] = lo_i, hi_i
            if not self.inst.within(self.inst.costs(low)) or not _ties_possible(self.inst, low, high):
                continue  # costs never decrease, so the box's lowest corner is its cheapest
            kid = self._evaluate(low, high, node.lam, node.bound, node.known)
            if self._done(kid.bound):
                self.closed_bound = max(self.closed_bound, kid.bound)
            else:
                kids.append(kid)
        return kids

    def _split(self, node: _Node) -> tuple[int, int] | None:
        """Branch between the dual's two maximisers, else halve a group that keeps the box from closing."""
        if node.best is None:  # pruned during its dual search but still open: halve the widest group
            return self._halve(node, range(len(self.inst.names)))
        if node.other is not None and not np.array_equal(node.other.idx, node.best.idx):
            i = _branch_variable(self.inst, node)
            a, b = sorted((node.best.idx[i] + node.low[i], node.other.idx[i] + node.low[i]))
            return i, (a + b) // 2
        if node.other is None and self.inst.fits(node.best.idx + node.low):
            return None
        ends = {k for e in self.plan.relaxed for k in e} or range(len(self.inst.names))
        return self._halve(node, ends)

    def _halve(self, node: _Node, candidates) -> tuple[int, int] | None:
        wide = [k for k in sorted(candidates) if node.high[k] > node.low[k]]
        if not wide:
            return None
        i = max(wide, key=lambda k: node.high[k] - node.low[k])
        return i, (node.low[i] + node.high[i]) // 2


def _ties_possible(inst: Instance, low: np.ndarray, high: np.ndarray) -> bool:
    """Some choice in the box keeps every removable block whole or gone."""
    for tie in inst.ties:
        can_zero = all(inst.grids[i][low[i]] == 0 for i in tie)
        can_keep = all(inst.grids[i][high[i]] > 0 for i in tie)
        if not (can_zero or can_keep):
            return False
    return True


def _branch_variable(inst: Instance, node: _Node) -> int:
    """The group where the dual's two maximisers differ most in value."""
    best, pick = -1.0, 0
    for i, (v, low, a, b) in enumerate(zip(inst.values, node.low, node.best.idx, node.other.idx)):
        if a != b and abs(v[low + a] - v[low + b]) > best:
            best, pick = abs(v[low + a] - v[low + b]), i
    return pick
