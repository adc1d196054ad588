"""A :class:`~pruning.solve.KnapsackProblem` reduced to what solvers work on.

Only prunable groups remain, each with its ascending grid of allowed widths and the value of keeping each.
Every constraint's cost is evaluated on those grids once: a unary array per group, and per coupled pair of
groups either a bilinear coefficient (``c * w_i * w_j``: MACs and params, exact integers) or a dense table
(measured latency). Terms over fixed groups fold into constants. Integer costs stay integer arrays; float
costs stay float arrays; nothing is truncated.

Removable blocks add width 0 to their inner groups' grids and *tie* them: all at 0 or none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..solve import allowed_widths, channel_order, width_multiple

if TYPE_CHECKING:
    from ..solve import Constraint, KnapsackProblem

_FLOAT_TOL = 1e-12  # relative slack when comparing float costs with their limits (summation order)


@dataclass
class Edge:
    """The costs coupling two groups ``i < j``, per constraint: a bilinear coefficient and/or a dense table."""

    coef: list  # per constraint: c in c * w_i * w_j (0 when none)
    tables: list  # per constraint: array (len(grid_i), len(grid_j)) or None
    tie: bool = False  # both at width 0 or neither (inner groups of one removable block)

    @property
    def dense(self) -> bool:
        return self.tie or any(t is not None for t in self.tables)


@dataclass
class Instance:
    """The problem over prunable groups: grids, values and every constraint's cost on them."""

    names: list[str]
    grids: list[np.ndarray]  # allowed widths (int64, ascending; 0 first for removable groups)
    values: list[np.ndarray]  # V_g at each allowed width
    scores: list[np.ndarray]  # every channel's score (the threshold baseline ranks them)
    cost_names: list[str]
    limits: list  # per constraint, in the cost's own type
    integral: list[bool]
    const: list  # per constraint
    unary: list[list[np.ndarray]]  # [k][i]: cost over grid i
    own: list[list[np.ndarray]]  # [k][i]: cost of the layers producing group i, neighbours full (greedy)
    edges: dict[tuple[int, int], Edge]
    ties: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def n_constraints(self) -> int:
        return len(self.limits)

    def restrict(self, low: np.ndarray, high: np.ndarray) -> Instance:
        """The same problem with group ``i`` limited to choices ``low[i]..high[i]``."""
        cut = [slice(a, b + 1) for a, b in zip(low, high)]
        edges = {
            (i, j): Edge(e.coef, [None if t is None else t[cut[i], cut[j]] for t in e.tables], e.tie)
            for (i, j), e in self.edges.items()
        }
        return Instance(
            self.names, [g[s] for g, s in zip(self.grids, cut)], [v[s] for v, s in zip(self.values, cut)],
            self.scores, self.cost_names, self.limits, self.integral, self.const,
            [[u[s] for u, s in zip(uk, cut)] for uk in self.unary], [[u[s] for u, s in zip(uk, cut)] for uk in self.own],
            edges, self.ties,
        )

    # -------------------------------------------------------------------------------- evaluation
    def widths(self, idx: np.ndarray) -> list[int]:
        return [int(g[k]) for g, k in zip(self.grids, idx)]

    def index_of(self, widths) -> np.ndarray:
        """Choice indices of a width per group (``widths`` maps names to widths); raises on a disallowed width."""
        idx = np.array([int(np.searchsorted(g, widths[n])) for n, g in zip(self.names, self.grids)], np.int64)
        for n, g, k in zip(self.names, self.grids, idx):
            if k >= len(g) or g[k] != widths[n]:
                raise ValueError(f"group {n!r}: width {widths[n]} is not an allowed width")
        return idx

    def value(self, idx: np.ndarray) -> float:
        return float(sum(v[k] for v, k in zip(self.values, idx)))

    def costs(self, idx: np.ndarray) -> list:
        """Every constraint's exact cost at choice indices ``idx`` (ints for integral costs)."""
        out = []
        for k in range(self.n_constraints):
            total = self.const[k] + sum(u[i] for u, i in zip(self.unary[k], idx))
            for (i, j), e in self.edges.items():
                if e.coef[k]:
                    total += e.coef[k] * self.grids[i][idx[i]] * self.grids[j][idx[j]]
                if e.tables[k] is not None:
                    total += e.tables[k][idx[i], idx[j]]
            out.append(int(total) if self.integral[k] else float(total))
        return out

    def within(self, costs: list) -> bool:
        """True when every cost meets its limit."""
        return all(within_limit(c, lim, exact) for c, lim, exact in zip(costs, self.limits, self.integral))

    def ties_hold(self, idx: np.ndarray) -> bool:
        return all(len({self.grids[i][idx[i]] == 0 for i in tie}) == 1 for tie in self.ties)

    def fits(self, idx: np.ndarray) -> bool:
        """Feasible: every limit met and every removable block whole or gone."""
        return self.ties_hold(idx) and self.within(self.costs(idx))

    def lowest(self) -> np.ndarray:
        return np.zeros(len(self.names), np.int64)

    def highest(self) -> np.ndarray:
        return np.array([len(g) - 1 for g in self.grids], np.int64)

    def removed_blocks(self, idx: np.ndarray) -> int:
        return sum(all(self.grids[i][idx[i]] == 0 for i in tie) for tie in self.ties)

    def binding(self, idx: np.ndarray) -> list[str]:
        """Constraints that every one-step growth of any group (or restored block) would exceed."""
        steps = self.grow_moves(idx)
        if not steps:
            return []  # every group full: nothing holds it back
        out = []
        for k, name in enumerate(self.cost_names):
            if not any(within_limit(self.costs(s)[k], self.limits[k], self.integral[k]) for s in steps):
                out.append(name)
        return out

    def grow_moves(self, idx: np.ndarray) -> list[np.ndarray]:
        """Every single-step growth that keeps removable blocks whole or gone."""
        tied = {i for tie in self.ties for i in tie}
        moves = []
        for i in range(len(self.names)):
            if idx[i] + 1 < len(self.grids[i]) and not (i in tied and self.grids[i][idx[i]] == 0):
                moves.append(_moved(idx, [i], +1))
        for tie in self.ties:
            if all(self.grids[i][idx[i]] == 0 for i in tie):
                moves.append(_moved(idx, list(tie), +1))
        return moves

    def first_nonzero(self) -> np.ndarray:
        """Per group, the index of its smallest non-zero allowed width (baselines never remove blocks)."""
        return np.array([1 if len(g) > 1 and g[0] == 0 else 0 for g in self.grids], np.int64)

    def scale(self) -> np.ndarray:
        """Per constraint, 1 / limit: the units in which multipliers of different costs compare."""
        return np.array([1.0 / float(lim) if lim > 0 else 1.0 for lim in self.limits])


def _moved(idx: np.ndarray, groups: list[int], step: int) -> np.ndarray:
    out = idx.copy()
    out[groups] += step
    return out


def within_limit(cost, limit, exact: bool):
    """``cost <= limit``: exact for integral costs, with a relative tolerance for floats (works on arrays)."""
    if exact:
        return cost <= limit
    return cost <= limit + _FLOAT_TOL * max(abs(limit), 1e-300)


# ------------------------------------------------------------------------------------------ reduction


def reduce(problem: KnapsackProblem) -> Instance:
    """Validate ``problem`` and evaluate its costs on the allowed widths; errors say what is wrong."""
    _check_scores(problem)
    names = list(problem.scores)
    pos = {g: i for i, g in enumerate(names)}
    removable = _removable_groups(problem, pos)
    grids = [_grid(problem, g, g in removable) for g in names]
    values = [_prefix_values(problem.scores[g], problem.blocks.get(g, 1))[grid] for g, grid in zip(names, grids)]
    constraints = list(problem.constraints)
    if not constraints:
        raise ValueError("no constraint: give at least one budget (MACs, params or latency)")
    scores = [np.asarray(problem.scores[g], dtype=np.float64) for g in names]
    inst = Instance(names, grids, values, scores, [c.name for c in constraints], [c.limit for c in constraints],
                    [c.cost.integral for c in constraints], [], [], [], {}, [])
    for k, c in enumerate(constraints):
        const, unary, own = _evaluate_terms(c, problem.full_widths, pos, grids, inst.edges, k, len(constraints))
        inst.const.append(const)
        inst.unary.append(unary)
        inst.own.append(own)
    _add_ties(inst, problem, pos)
    _check_costs(inst, constraints)
    return inst


def _check_scores(problem: KnapsackProblem) -> None:
    for g, s in problem.scores.items():
        if g not in problem.full_widths:
            raise ValueError(f"scores given for unknown group {g!r}")
        s = np.asarray(s)
        if s.shape != (problem.full_widths[g],) or not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ValueError(f"group {g!r}: scores must be {problem.full_widths[g]} finite values >= 0")
    if problem.round_to < 1 or not 0.0 <= problem.min_keep_fraction <= 1.0:
        raise ValueError("round_to must be >= 1 and min_keep_fraction in [0, 1]")


def _removable_groups(problem: KnapsackProblem, pos: dict[str, int]) -> set[str]:
    out = set()
    for block in problem.removable:
        missing = [g for g in block if g not in pos]
        if missing:
            raise ValueError(f"removable block groups {missing} have no scores (they must be prunable)")
        out.update(block)
    return out


def _grid(problem: KnapsackProblem, group: str, removable: bool) -> np.ndarray:
    round_to = width_multiple(problem.round_to, problem.constraints)
    grid = allowed_widths(problem.full_widths[group], round_to, problem.min_keep_fraction, problem.blocks.get(group, 1))
    return np.concatenate([[0], grid]).astype(np.int64) if removable else grid


def _prefix_values(scores: np.ndarray, blocks: int = 1) -> np.ndarray:
    """``V(w)`` for ``w = 0..width``: sums of the ``w`` largest scores; with equal ``blocks``, of the
    ``w // blocks`` largest of each block (widths between multiples are never allowed)."""
    s = np.asarray(scores, dtype=np.float64)
    per_block = [np.concatenate([[0.0], np.cumsum(b[channel_order(b)])]) for b in np.split(s, blocks)]
    return sum(v[np.arange(len(s) + 1) // blocks] for v in per_block)


def _evaluate_terms(c: Constraint, full, pos, grids, edges, k: int, n_constraints: int):
    """One constraint's terms on the grids: (constant, unary arrays, own-producer arrays); fills ``edges``."""
    dtype = np.int64 if c.cost.integral else np.float64
    unary = [np.zeros(len(g), dtype) for g in grids]
    own = [np.zeros(len(g), dtype) for g in grids]
    const = dtype(0)
    for term in c.cost.terms:
        args = [grids[pos[g]] if g in pos else np.asarray(full[g]) for g in term.groups]
        free = [g for g in term.groups if g in pos]
        if not free:
            const = const + _typed(term(*args), c, term)
        elif len(set(free)) == 1:  # one prunable group (twice for a width squared)
            i = pos[free[0]]
            vals = _typed(term(*args), c, term)
            unary[i] = unary[i] + vals
            if term.groups[0] == free[0]:
                own[i] = own[i] + vals
        else:
            _add_edge(edges, term, c, pos, grids, k, n_constraints, own)
    return const, unary, own


def _add_edge(edges, term, c: Constraint, pos, grids, k: int, n_constraints: int, own) -> None:
    """A term over two prunable groups: a bilinear coefficient or a dense table on edge ``(i < j)``."""
    from ..cost import Bilinear

    a, b = pos[term.groups[0]], pos[term.groups[1]]
    i, j = min(a, b), max(a, b)
    edge = edges.setdefault((i, j), Edge([0] * n_constraints, [None] * n_constraints))
    if isinstance(term, Bilinear):
        coef = _typed(np.asarray(term.coef), c, term)
        edge.coef[k] = edge.coef[k] + coef
    else:
        table = _typed(term(grids[a][:, None], grids[b][None, :]), c, term)
        table = table if a < b else table.T
        edge.tables[k] = table if edge.tables[k] is None else edge.tables[k] + table
    # the paper's greedy weighs a channel by its own producing layer at full neighbouring width
    full_other = grids[b][-1]
    own[a] = own[a] + _typed(term(grids[a], np.asarray(full_other)), c, term)


def _typed(values, c: Constraint, term) -> np.ndarray:
    """Values in the cost's own type: integral costs must give integers (never truncated silently)."""
    values = np.asarray(values)
    if not c.cost.integral:
        return values.astype(np.float64)
    if values.dtype.kind not in "iub":
        if not np.all(values == np.round(values)):
            raise ValueError(
                f"cost {c.name!r} is integral but term {term.layer!r} gives non-integer values; mark the cost "
                "integral=False (float costs are compared with a relative tolerance) or round its terms yourself"
            )
        values = np.round(values)
    return values.astype(np.int64)


def _add_ties(inst: Instance, problem: KnapsackProblem, pos: dict[str, int]) -> None:
    """Star-shaped ties: the first inner group of a block with each other one (all at 0, or none)."""
    k = inst.n_constraints
    for block in problem.removable:
        members = tuple(pos[g] for g in block)
        inst.ties.append(members)
        for other in members[1:]:
            i, j = min(members[0], other), max(members[0], other)
            inst.edges.setdefault((i, j), Edge([0] * k, [None] * k)).tie = True


def _check_costs(inst: Instance, constraints: list) -> None:
    """Costs must not decrease with any width, and every limit must be reachable at the lowest widths."""
    for k, c in enumerate(constraints):
        arrays = [u for u in inst.unary[k]] + [e.tables[k] for e in inst.edges.values() if e.tables[k] is not None]
        coefs = [e.coef[k] for e in inst.edges.values()]
        if any(cf < 0 for cf in coefs) or any(_decreases(a) for a in arrays):
            raise ValueError(
                f"cost {c.name!r} decreases as some width grows; solvers need costs that never decrease with a "
                "width (rebuild a measured table, whose profiler makes it monotone)"
            )
    lowest = inst.costs(inst.lowest())
    for c, low in zip(constraints, lowest):
        if not within_limit(low, c.limit, c.cost.integral):
            raise ValueError(
                f"{c.name} limit {c.spec or c.limit!r} = {_fmt(c.limit)} {c.cost.unit} is below the minimum "
                f"achievable {_fmt(low)} {c.cost.unit} (every prunable group at its lowest allowed width)"
            )


def _decreases(a: np.ndarray) -> bool:
    a = np.asarray(a, dtype=np.float64)
    scale = max(1.0, float(np.abs(a).max())) if a.size else 1.0
    return any(np.any(np.diff(a, axis=ax) < -1e-9 * scale) for ax in range(a.ndim))


def _fmt(x) -> str:
    return f"{x:,}" if isinstance(x, (int, np.integer)) else f"{x:.6g}"
