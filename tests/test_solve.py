"""Budgeted channel selection: every solver against brute force, on bilinear costs, measured tables, two
constraints at once and removable blocks; the greedy baseline, errors, a real model."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import pruning.solvers.exact as exact_mod
from pruning.cost import Bilinear, Constant, Cost, Interpolated, Linear
from pruning.solve import Constraint, KnapsackProblem, allowed_widths, kept_channels, solve


# ------------------------------------------------------------------------------------ random problems


def _structure(rng: np.random.Generator):
    """3-5 prunable groups of widths 2-6 plus one fixed group; a triangle and random extra couplings."""
    n = int(rng.integers(3, 6))
    names = [f"g{i}" for i in range(n)]
    full = {g: int(rng.integers(2, 7)) for g in names} | {"fixed": 3}
    pairs = [("g0", "g1"), ("g1", "g2"), ("g2", "g0")]  # a triangle, in both orientations
    for _ in range(int(rng.integers(1, 5))):
        g, h = rng.choice(names + ["fixed"], size=2)
        pairs.append((str(g), str(h)))
    return names, full, pairs


def bilinear_cost(rng: np.random.Generator, names, full, pairs, name: str = "macs") -> Cost:
    """An exact integer cost: constant + linear + bilinear terms (what MACs and params are)."""
    terms = [Constant(int(rng.integers(0, 100)))]
    terms += [Linear((g,), int(rng.integers(0, 40))) for g in names + ["fixed"]]
    terms += [Bilinear((g, h), int(rng.integers(1, 60))) for g, h in pairs]
    return Cost(name, "MACs", terms, full, integral=True)


def table_cost(rng: np.random.Generator, names, full, pairs, name: str = "latency") -> Cost:
    """A float cost from monotone random tables on coarse grids, interpolated (what latency tables are)."""
    def grid(g):
        return tuple(sorted({1, full[g], int(rng.integers(1, full[g] + 1))}))

    def monotone(shape):
        t = rng.random(shape)
        for ax in range(len(shape)):
            t = np.cumsum(t, axis=ax)
        return t

    terms = [Constant(float(rng.random()), "overhead")]
    for g in names:
        a = grid(g)
        terms.append(Interpolated((g,), (a,), monotone((len(a),)), layer=f"u{g}"))
    for g, h in pairs:
        if g != h:
            a, b = grid(g), grid(h)
            terms.append(Interpolated((g, h), (a, b), monotone((len(a), len(b))), layer=f"{g}{h}"))
    return Cost(name, "ms", terms, full, integral=False)


def random_problem(seed: int, round_to: int = 1, min_keep_fraction: float = 0.0, kind: str = "bilinear",
                   removable: bool = False) -> KnapsackProblem:
    """``kind``: ``bilinear`` (exact ints), ``table`` (floats), or ``both`` (two constraints at once)."""
    rng = np.random.default_rng(seed)
    names, full, pairs = _structure(rng)
    costs = {"bilinear": [bilinear_cost(rng, names, full, pairs)], "table": [table_cost(rng, names, full, pairs)],
             "both": [bilinear_cost(rng, names, full, pairs), table_cost(rng, names, full, pairs)]}[kind]
    scores = {g: _scores(rng, full[g]) for g in names}
    blocks = (("g1", "g2"),) if removable else ()
    p = KnapsackProblem(scores, [Constraint(c, 0) for c in costs], full, round_to, min_keep_fraction, blocks)
    return with_limits(rng, p)


def _scores(rng: np.random.Generator, width: int) -> np.ndarray:
    if rng.random() < 0.3:
        return rng.integers(0, 3, size=width).astype(float)  # ties
    return rng.random(width)


def with_limits(rng: np.random.Generator, p: KnapsackProblem) -> KnapsackProblem:
    """Limits drawn between each cost's minimum and its full value."""
    low = lowest(p)
    constraints = []
    for c in p.constraints:
        lo, hi = c.cost({**p.full_widths, **low}), c.cost()
        limit = lo + rng.uniform(0.05, 0.95) * (hi - lo)
        constraints.append(Constraint(c.cost, int(limit) if c.cost.integral else float(limit)))
    return KnapsackProblem(p.scores, constraints, p.full_widths, p.round_to, p.min_keep_fraction, p.removable)


def grids(p: KnapsackProblem) -> dict[str, np.ndarray]:
    tied = {g for block in p.removable for g in block}
    out = {g: allowed_widths(p.full_widths[g], p.round_to, p.min_keep_fraction) for g in p.scores}
    return {g: np.concatenate([[0], w]) if g in tied else w for g, w in out.items()}


def lowest(p: KnapsackProblem) -> dict[str, int]:
    return {g: int(w[0]) for g, w in grids(p).items()}


def value(p: KnapsackProblem, widths: dict[str, int]) -> float:
    return float(sum(np.sort(p.scores[g])[::-1][:w].sum() for g, w in widths.items()))


def feasible(p: KnapsackProblem, widths: dict[str, int]) -> bool:
    whole = all(len({widths[g] == 0 for g in block}) == 1 for block in p.removable)
    return whole and all(c.cost({**p.full_widths, **widths}) <= c.limit * (1 + 1e-12) for c in p.constraints)


def brute_force(p: KnapsackProblem) -> float:
    """The optimum by enumerating every combination of allowed widths."""
    names, best = list(p.scores), -math.inf
    for combo in itertools.product(*(grids(p)[g] for g in names)):
        widths = dict(zip(names, map(int, combo)))
        if feasible(p, widths):
            best = max(best, value(p, widths))
    return best


def check_exact(p: KnapsackProblem, sol, opt: float, rel: float = 1e-9) -> None:
    allowed = grids(p)
    assert all(w in allowed[g] for g, w in sol.widths.items())
    assert feasible(p, sol.widths)
    assert sol.costs == {c.name: c.cost({**p.full_widths, **sol.widths}) for c in p.constraints}
    assert sol.objective == pytest.approx(opt, rel=rel, abs=1e-12)
    assert sol.objective == pytest.approx(value(p, sol.widths), rel=1e-12, abs=1e-12)
    assert sol.bound >= opt - 1e-9 and sol.bound >= sol.objective


# --------------------------------------------------------------------------------------- exact


CASES = [(seed, r, f) for seed in range(12) for r, f in ((1, 0.0), (2, 0.0), (1, 0.4), (2, 0.5))]


@pytest.mark.parametrize("seed,round_to,frac", CASES)
def test_exact_matches_brute_force(seed, round_to, frac):
    p = random_problem(seed, round_to, frac)
    sol = solve(p, "exact", gap_tol=0.0)
    check_exact(p, sol, brute_force(p))
    assert 0.0 <= sol.gap <= 1e-9 or sol.objective == sol.bound == 0.0


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("kind", ["table", "both"])
def test_exact_on_tables_and_two_constraints(seed, kind):
    """Measured-table costs (floats, dense couplings) and MACs + latency together stay exact."""
    p = random_problem(500 + seed, round_to=1 + seed % 2, kind=kind)
    check_exact(p, solve(p, "exact", gap_tol=0.0), brute_force(p))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("kind", ["bilinear", "both"])
def test_exact_with_removable_blocks(seed, kind):
    """Width 0 for a removable block's groups, together or not at all."""
    p = random_problem(700 + seed, kind=kind, removable=True)
    sol = solve(p, "exact", gap_tol=0.0)
    check_exact(p, sol, brute_force(p))
    assert sol.removed_blocks == int(sol.widths["g1"] == 0)


def test_removing_a_block_when_it_pays():
    """A tight limit on a chain: removing the costly block keeps more value than thinning everything."""
    full = {"a": 4, "b": 4, "c": 4}
    cost = Cost("macs", "MACs", [Linear(("a",), 1), Linear(("b",), 100), Linear(("c",), 1)], full, integral=True)
    scores = {"a": np.ones(4), "b": np.full(4, 0.5), "c": np.ones(4)}
    p = KnapsackProblem(scores, [Constraint(cost, 40)], full, removable=(("b",),))
    sol = solve(p, "exact", gap_tol=0.0)
    assert sol.widths == {"a": 4, "b": 0, "c": 4} and sol.removed_blocks == 1
    assert solve(KnapsackProblem(scores, [Constraint(cost, 140)], full), "exact").widths["b"] == 1


@pytest.mark.parametrize("seed", range(8))
def test_exact_through_every_code_path(seed, monkeypatch):
    """The concave-hull messages and the relaxed-edge fallback (with its branching) stay exact."""
    p = random_problem(100 + seed, round_to=1 + seed % 2, kind="both" if seed % 3 == 2 else "bilinear",
                       removable=seed % 2 == 1)
    opt = brute_force(p)
    monkeypatch.setattr(exact_mod, "_DENSE", 0)  # every bilinear message through the concave hull
    assert solve(p, "exact", gap_tol=0.0).objective == pytest.approx(opt, rel=1e-9, abs=1e-12)
    monkeypatch.setattr(exact_mod, "_TABLE_LIMIT", 1)  # every coupling relaxed, exactness by branching
    sol = solve(p, "exact", gap_tol=0.0)
    check_exact(p, sol, opt)


@pytest.mark.parametrize("seed", range(6))
def test_bound_is_valid_when_stopped_early(seed):
    p = random_problem(200 + seed, kind=("bilinear", "both")[seed % 2])
    opt = brute_force(p)
    sol = solve(p, "exact", time_limit=0.0)  # the root's Lagrangian bound and its completed primal
    assert feasible(p, sol.widths) and sol.objective <= opt + 1e-9
    assert sol.bound >= opt - 1e-9 and sol.gap >= -1e-12


def test_deadline_is_checked_between_dual_evaluations(monkeypatch):
    """Each evaluation slowed to 0.5 s: the root's dual search alone takes ~7 of them, the limit allows 2."""
    import time

    p = random_problem(200, kind="both")
    maximise = exact_mod._maximise

    def slow(*args):
        time.sleep(0.5)
        return maximise(*args)

    monkeypatch.setattr(exact_mod, "_maximise", slow)
    t = time.perf_counter()
    sol = solve(p, "exact", time_limit=0.5, gap_tol=0.0)
    assert time.perf_counter() - t < 2.0  # the limit plus one evaluation, and slack for a busy machine
    opt = brute_force(p)
    assert feasible(p, sol.widths) and sol.objective <= opt + 1e-9
    assert sol.bound >= opt - 1e-9 and sol.bound >= sol.objective


def dense_problem(n: int = 40, width: int = 24, seed: int = 0) -> KnapsackProblem:
    """Every pair of ``n`` groups coupled (a DenseNet block taken to the extreme): exact elimination tables
    would span all groups, so the plan relaxes most edges."""
    rng = np.random.default_rng(seed)
    names = [f"g{i}" for i in range(n)]
    full = {g: width for g in names}
    terms = [Constant(100)] + [Linear((g,), int(rng.integers(1, 50))) for g in names]
    terms += [Bilinear((g, h), int(rng.integers(1, 20))) for g, h in itertools.combinations(names, 2)]
    cost = Cost("macs", "MACs", terms, full, integral=True)
    return KnapsackProblem({g: rng.random(width) for g in names}, [Constraint(cost, int(0.5 * cost()))], full)


def test_exact_on_dense_coupling_returns_within_its_time_limit():
    import time

    p = dense_problem()
    t = time.perf_counter()
    sol = solve(p, "exact", time_limit=1.0)
    assert time.perf_counter() - t < 3.0
    limit = p.constraints[0].limit
    assert feasible(p, sol.widths) and 0.99 * limit <= sol.macs <= limit
    assert sol.bound >= sol.objective and 0.0 <= sol.gap < 0.1
    assert sol.objective >= solve(p, "greedy").objective


@pytest.mark.parametrize("n", [5, 8, 12])
def test_the_relaxation_at_zero_multipliers_keeps_every_group_full(n):
    """At ``lam = 0`` costs vanish, so the maximiser is every group at full width. Every coefficient is then 0, and
    a message combining a table with such an edge once lost that neighbour's axis (an IndexError on rexnet_100)."""
    from pruning.solvers.instance import reduce

    inst = reduce(dense_problem(n, width=6, seed=n))
    plan = exact_mod._plan(inst)
    assert any(step.tables and len(step.scope) >= 2 for step in plan.steps)  # the case that broke
    weights = exact_mod._Costs(inst, plan).weights(np.zeros(1))
    np.testing.assert_array_equal(exact_mod._maximise(inst, plan, weights), inst.highest())


def test_conjugate_matches_dense_maximum():
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.integers(1, 4, size=300)).astype(float)
    u = np.cumsum(rng.normal(size=300))  # far from concave
    t = rng.normal(size=(7, 11))
    dense = (u[:, None] - x[:, None] * t.ravel()[None, :]).max(axis=0).reshape(t.shape)
    np.testing.assert_allclose(exact_mod._conjugate(x, u, t), dense, rtol=1e-12, atol=1e-9)


# ------------------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["bilinear", "both"])
def test_greedy_reports_true_costs(seed, kind):
    p = random_problem(300 + seed, round_to=1 + seed % 2, kind=kind)
    sol = solve(p, "greedy")
    assert sol.costs == {c.name: c.cost({**p.full_widths, **sol.widths}) for c in p.constraints}
    if kind == "bilinear":  # own-layer weights over-estimate bilinear costs, so the true costs undershoot
        assert feasible(p, sol.widths)
    assert sol.objective <= brute_force(p) + 1e-9 or not feasible(p, sol.widths)
    assert math.isnan(sol.bound) and math.isnan(sol.gap) and sol.solver == "greedy"


def test_normalised_threshold_ranks_each_group_by_relative_score():
    """Group b's scores are 1000x a's: a plain threshold cuts a to its minimum, the normalised one treats them alike."""
    full = {"a": 4, "b": 4}
    scores = {"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([1.0, 2.0, 3.0, 4.0]) * 1000}
    cost = Cost("macs", "MACs", [Linear(("a",), 1), Linear(("b",), 1)], full, integral=True)
    p = KnapsackProblem(scores, [Constraint(cost, 4)], full)
    assert solve(p, "threshold").widths == {"a": 1, "b": 3}  # a keeps its one channel every group keeps
    assert solve(p, "threshold_norm").widths == {"a": 2, "b": 2}


@pytest.mark.parametrize("solver", ["uniform", "threshold", "threshold_norm"])
@pytest.mark.parametrize("seed", range(6))
def test_baselines_meet_every_limit(solver, seed):
    p = random_problem(400 + seed, kind="both", removable=seed % 2 == 1)
    sol = solve(p, solver)
    assert feasible(p, sol.widths) and sol.removed_blocks == 0
    assert sol.objective <= brute_force(p) + 1e-9


# ----------------------------------------------------------------------------------------- errors


def test_limit_below_minimum_names_it():
    p = random_problem(0, min_keep_fraction=0.5)
    cost = p.constraints[0].cost
    low = cost({**p.full_widths, **lowest(p)})
    bad = KnapsackProblem(p.scores, [Constraint(cost, low - 1)], p.full_widths, p.round_to, p.min_keep_fraction)
    for solver in ("exact", "greedy"):
        with pytest.raises(ValueError, match=f"{low:,}") as err:
            solve(bad, solver)
        assert f"{low - 1:,}" in str(err.value)
    tight = KnapsackProblem(p.scores, [Constraint(cost, low)], p.full_widths, p.round_to, p.min_keep_fraction)
    assert solve(tight).macs == low


def test_integral_cost_with_fractional_terms_is_refused():
    """Float values are never truncated into integer arrays: an integral cost must give integers."""
    full = {"a": 3}
    cost = Cost("macs", "MACs", [Linear(("a",), 0.5)], full, integral=True)
    with pytest.raises(ValueError, match="non-integer"):
        solve(KnapsackProblem({"a": np.ones(3)}, [Constraint(cost, 1)], full))
    small = Cost("latency", "ms", [Linear(("a",), 1e-4)], full)  # sub-unit floats keep their resolution
    sol = solve(KnapsackProblem({"a": np.ones(3)}, [Constraint(small, 2.5e-4)], full))
    assert sol.widths == {"a": 2} and sol.costs["latency"] == pytest.approx(2e-4)


def test_decreasing_cost_is_refused():
    full = {"a": 3}
    cost = Cost("latency", "ms", [Interpolated(("a",), ((1, 3),), np.array([2.0, 1.0]))], full)
    with pytest.raises(ValueError, match="decreases"):
        solve(KnapsackProblem({"a": np.ones(3)}, [Constraint(cost, 5.0)], full))


def test_unknown_solver_lists_names():
    with pytest.raises(ValueError, match="exact") as err:
        solve(random_problem(0), "simplex")
    assert "greedy" in str(err.value)


# ---------------------------------------------------------------------------------------- reports


def test_full_budget_keeps_everything():
    p = random_problem(1)
    c = p.constraints[0]
    p = KnapsackProblem(p.scores, [Constraint(c.cost, c.cost() + 5)], p.full_widths)
    sol = solve(p)
    assert sol.widths == {g: p.full_widths[g] for g in p.scores} and sol.gap <= 1e-6 and sol.binding == []


def test_binding_names_the_constraint_that_stops_growth():
    p = random_problem(5, kind="both")
    macs, latency = p.constraints
    loose = Constraint(latency.cost, latency.cost() * 2)
    sol = solve(KnapsackProblem(p.scores, [macs, loose], p.full_widths))
    assert sol.binding == ["macs"]
    sol = solve(KnapsackProblem(p.scores, [Constraint(macs.cost, macs.cost() + 1), latency], p.full_widths))
    assert sol.binding == ["latency"]


def test_deterministic():
    p = random_problem(3, round_to=2, kind="both")
    for solver in ("exact", "greedy"):
        a, b = solve(p, solver), solve(p, solver)
        assert (a.widths, a.keep, a.objective, a.costs) == (b.widths, b.keep, b.objective, b.costs)


def test_keep_is_top_scores_ties_to_lower_index():
    assert kept_channels(np.array([1.0, 2.0, 2.0, 0.0, 2.0]), 2) == [1, 2]
    assert kept_channels(np.array([0.0, 0.0, 0.0]), 2) == [0, 1]
    p = random_problem(4)
    sol = solve(p)
    for g, idx in sol.keep.items():
        assert idx == sorted(idx) and len(idx) == sol.widths[g]
        assert p.scores[g][idx].sum() == pytest.approx(np.sort(p.scores[g])[::-1][: len(idx)].sum())


def test_allowed_widths():
    assert allowed_widths(10, 4, 0.3).tolist() == [4, 8, 10]
    assert allowed_widths(10, 1, 0.3).tolist() == list(range(3, 11))
    assert allowed_widths(3, 4).tolist() == [3]
    assert allowed_widths(6, 4, 0.9).tolist() == [6]
    assert allowed_widths(5).tolist() == [1, 2, 3, 4, 5]
    assert allowed_widths(10, 1, 0.3)[0] == 3  # 0.3 * 10 is 3.0000000000000004 in floating point


@pytest.fixture(scope="module")
def b0(model_cache):
    """efficientnet_b0 at 64 px: its graph, exact costs, and random scores."""
    from pruning import CostModel, build_channel_graph

    model = model_cache("efficientnet_b0")
    graph = build_channel_graph(model, 64)
    rng = np.random.default_rng(0)
    return graph, CostModel(graph, model), {g.name: rng.random(g.width) for g in graph.prunable_groups()}


def test_efficientnet_b0_hits_budget(b0):
    graph, cost, scores = b0
    budget = int(0.6 * cost.macs())
    p = KnapsackProblem(scores, [Constraint(cost.macs_cost, budget)], graph.full_widths())
    sol = solve(p)
    assert 0.995 * budget <= sol.macs <= budget
    assert sol.macs == cost.macs(sol.widths)
    assert sol.bound >= sol.objective and sol.gap <= 1e-4
    greedy = solve(p, "greedy")
    assert greedy.macs == cost.macs(greedy.widths) < sol.macs and greedy.objective < sol.objective


def test_efficientnet_b0_macs_and_params_together(b0):
    graph, cost, scores = b0
    limits = [Constraint(cost.macs_cost, int(0.7 * cost.macs())), Constraint(cost.params_cost, int(0.5 * cost.params()))]
    sol = solve(KnapsackProblem(scores, limits, graph.full_widths()), gap_tol=1e-4, time_limit=60)
    assert sol.costs["macs"] <= limits[0].limit and sol.costs["params"] <= limits[1].limit
    assert sol.costs["params"] >= 0.99 * limits[1].limit and "params" in sol.binding
    assert sol.bound >= sol.objective and sol.gap <= 1e-4


# ------------------------------------------------------------------------- the CP-SAT cross-check solver

CPSAT_CASES = [(seed, r, f) for seed in range(6) for r, f in ((1, 0.0), (2, 0.0), (1, 0.4), (2, 0.5))]


@pytest.mark.parametrize("seed,round_to,frac", CPSAT_CASES)
def test_cpsat_matches_brute_force(seed, round_to, frac):
    p = random_problem(seed, round_to, frac)  # a triangle coupling, fixed-group terms, ties in some scores
    sol = solve(p, "cpsat", time_limit=10.0, gap_tol=0.0)
    assert sol.solver == "cpsat"
    check_exact(p, sol, brute_force(p), rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_cpsat_on_tables_two_constraints_and_blocks(seed):
    """Float table costs are scaled (rounded down: a relaxation, then repaired): still feasible, bound valid."""
    p = random_problem(600 + seed, kind="both", removable=seed % 2 == 0)
    opt = brute_force(p)
    sol = solve(p, "cpsat", time_limit=10.0, gap_tol=0.0)
    assert feasible(p, sol.widths) and sol.bound >= opt - 1e-9
    assert sol.objective == pytest.approx(opt, rel=1e-3)


def test_cpsat_deterministic_and_bound_valid_when_stopped_early():
    p = random_problem(7, round_to=2)
    a, b = solve(p, "cpsat", gap_tol=0.0), solve(p, "cpsat", gap_tol=0.0)
    assert (a.widths, a.objective, a.bound) == (b.widths, b.objective, b.bound)
    early = solve(p, "cpsat", time_limit=0.0)  # whatever it has (the lowest widths if nothing): still valid
    assert feasible(p, early.widths) and early.bound >= brute_force(p) - 1e-9


def test_cpsat_agrees_with_exact_on_efficientnet_b0(b0):
    graph, cost, scores = b0
    p = KnapsackProblem(scores, [Constraint(cost.macs_cost, int(0.6 * cost.macs()))], graph.full_widths())
    exact = solve(p, "exact", gap_tol=1e-6)
    cp = solve(p, "cpsat", time_limit=10.0, gap_tol=1e-4)
    assert cp.macs == cost.macs(cp.widths) <= p.constraints[0].limit
    assert cp.objective == pytest.approx(exact.objective, rel=1e-3)
    assert cp.bound >= exact.objective - 1e-9 and exact.bound >= cp.objective - 1e-9  # each bounds the other
