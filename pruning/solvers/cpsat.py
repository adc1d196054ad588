"""``cpsat``: the exact problem as an OR-tools CP-SAT model, an independent cross-check of ``exact``.

Per group, one-hot booleans choose an allowed width; the integer width ``w_g``, the value and every unary cost
are linear in them. A bilinear coupling ``c * w_i * w_j`` is an integer product variable
(``AddMultiplicationEquality``); a measured table coupling is an element constraint on the pair of choices.
Removable blocks tie their groups' "width 0" booleans. Slow on big models (seconds on efficientnet_b0 at 64 px,
where ``exact`` takes tens of milliseconds) and only proves the bound CP-SAT reaches within the time limit.

CP-SAT needs integers. Values ``V_g(w)`` are scaled by ``S = 1e9 / M`` (``M`` the total value at full widths)
and rounded, so a solution's scaled value is off by at most ``E = sum_g max_w |rounding|`` units; the reported
bound is CP-SAT's bound plus ``E``, converted back, so it stays an upper bound. Integral costs (MACs, params)
are exact. Float costs (latency) are scaled on purpose so that their limit becomes 1e7 units and every term is
rounded *down*: the integer model is then a relaxation (its bound stays valid), and a solution it returns that
misses a true float limit is repaired with the exact-cost greedy trim (:mod:`pruning.solvers.local`).

OR-tools (``ortools.sat``) is imported only when this solver runs.
"""
from __future__ import annotations

import numpy as np

from ..solve import register_solver
from .baselines import solve_uniform
from .instance import Instance
from .local import LocalSearch

_VALUE_SCALE = 1e9  # the largest possible total value (every group full) becomes this many integer units
_FLOAT_COST_UNITS = 1e7  # a float cost's limit becomes this many integer units
_SEED = 0
_REL_TOL = 1e-12


@register_solver("cpsat")
def solve_cpsat(inst: Instance, time_limit: float, gap_tol: float) -> tuple[dict[str, int], float]:
    """Solve ``inst`` with CP-SAT; returns ``(widths, upper bound)``. Deterministic (one worker, a fixed seed)
    unless the ``time_limit`` (seconds, wall clock) interrupts it; ``gap_tol`` is CP-SAT's relative gap limit.
    Without any solution by the time limit it returns the lowest widths (always within the limits) and the
    trivial bound (every group full)."""
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    choose, width = _choices(model, inst, cp_model)
    for k in range(inst.n_constraints):
        _add_constraint(model, inst, k, choose, width)
    _add_ties(model, inst, choose)
    total, scale, slack, objective = _objective(inst, choose)
    model.Maximize(objective)
    _hint(model, inst, choose, width, time_limit, gap_tol)
    solver = _solver(cp_model, time_limit, gap_tol)
    status = solver.Solve(model)
    idx = _read(inst, solver, status, choose, model, cp_model)
    if not inst.fits(idx):  # a float cost rounded down let it past its true limit
        idx = LocalSearch(inst).complete(idx)
    bound = total  # every group full: always an upper bound
    if status != cp_model.UNKNOWN:  # without a solution CP-SAT's reported bound is unset (0), not a bound
        bound = min((solver.BestObjectiveBound() + slack) / scale, total)
    bound += _REL_TOL * abs(bound) + 1e-12  # float round-off of the conversion
    return dict(zip(inst.names, inst.widths(idx))), bound


def _choices(model, inst: Instance, cp_model):
    choose, width = [], []
    for name, grid in zip(inst.names, inst.grids):
        b = [model.NewBoolVar(f"{name}={int(w)}") for w in grid]
        model.AddExactlyOne(b)
        w = model.NewIntVarFromDomain(cp_model.Domain.FromValues(grid.tolist()), f"w[{name}]")
        model.Add(w == sum(int(x) * bk for x, bk in zip(grid, b)))
        choose.append(b)
        width.append(w)
    return choose, width


def _integer(inst: Instance, k: int, values) -> np.ndarray:
    """A constraint's cost values as integers: exact for integral costs, scaled and floored for floats."""
    values = np.asarray(values)
    if inst.integral[k]:
        return values.astype(np.int64)
    return np.floor(values * (_FLOAT_COST_UNITS / float(inst.limits[k]))).astype(np.int64)


def _add_constraint(model, inst: Instance, k: int, choose, width) -> None:
    limit = int(inst.limits[k]) if inst.integral[k] else int(_FLOAT_COST_UNITS)
    cost = int(_integer(inst, k, inst.const[k]))
    for u, b in zip(inst.unary[k], choose):  # any unary cost is linear in the one-hot choice
        cost += sum(int(c) * bk for c, bk in zip(_integer(inst, k, u), b) if c)
    for (i, j), e in sorted(inst.edges.items()):
        if e.coef[k]:
            gi, gj = inst.grids[i], inst.grids[j]
            prod = model.NewIntVar(int(gi[0] * gj[0]), int(gi[-1] * gj[-1]), f"w[{inst.names[i]}]*w[{inst.names[j]}]")
            model.AddMultiplicationEquality(prod, [width[i], width[j]])
            cost += int(_integer(inst, k, e.coef[k])) * prod
        if e.tables[k] is not None:
            cost += _table_term(model, inst, k, i, j, e.tables[k], choose)
    if isinstance(cost, (int, np.integer)):  # no prunable group costs anything
        model.Add(model.NewConstant(int(cost)) <= limit)
    else:
        model.Add(cost <= limit)


def _table_term(model, inst: Instance, k: int, i: int, j: int, table: np.ndarray, choose):
    """``table[choice_i, choice_j]`` as an integer variable: an element constraint on the joint choice."""
    flat = _integer(inst, k, table).ravel()
    ci = sum(a * b for a, b in enumerate(choose[i]))
    cj = sum(a * b for a, b in enumerate(choose[j]))
    index = model.NewIntVar(0, len(flat) - 1, f"pair[{inst.names[i]},{inst.names[j]}]")
    model.Add(index == ci * table.shape[1] + cj)
    value = model.NewIntVar(int(flat.min()), int(flat.max()), f"cost{k}[{inst.names[i]},{inst.names[j]}]")
    model.AddElement(index, [int(v) for v in flat], value)
    return value


def _add_ties(model, inst: Instance, choose) -> None:
    for tie in inst.ties:
        for other in tie[1:]:
            model.Add(choose[tie[0]][0] == choose[other][0])  # width 0 is every removable group's first choice


def _objective(inst: Instance, choose):
    total = float(sum(v[-1] for v in inst.values))
    scale = _VALUE_SCALE / total if total > 0 else 1.0
    scaled = [np.rint(v * scale).astype(np.int64) for v in inst.values]
    slack = float(sum(np.abs(v * scale - s).max() for v, s in zip(inst.values, scaled)))
    objective = sum(int(v) * bk for s, b in zip(scaled, choose) for v, bk in zip(s, b))
    return total, scale, slack, objective


def _hint(model, inst: Instance, choose, width, time_limit: float, gap_tol: float) -> None:
    """Start from the uniform baseline's widths (feasible; CP-SAT finds good solutions about 3x sooner)."""
    start = solve_uniform(inst, time_limit, gap_tol)[0]
    for name, grid, b, w in zip(inst.names, inst.grids, choose, width):
        model.AddHint(w, start[name])
        for x, bk in zip(grid, b):
            model.AddHint(bk, int(x) == start[name])


def _solver(cp_model, time_limit: float, gap_tol: float):
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = _SEED
    solver.parameters.max_time_in_seconds = max(float(time_limit), 1e-3)
    solver.parameters.relative_gap_limit = float(gap_tol)
    solver.parameters.linearization_level = 2  # every constraint's relaxation in the LP: much tighter bounds
    solver.parameters.cp_model_probing_level = 0  # probing 10k choice literals costs seconds, gains nothing
    return solver


def _read(inst: Instance, solver, status, choose, model, cp_model) -> np.ndarray:
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return np.array([[solver.BooleanValue(bk) for bk in b].index(True) for b in choose], np.int64)
    if status == cp_model.UNKNOWN:  # no solution within the time limit: the lowest widths always fit
        return inst.lowest()
    why = model.Validate() or f"limits {inst.limits}"
    raise RuntimeError(f"CP-SAT found the model {solver.StatusName(status)}: {why}")
