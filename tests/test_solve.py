"""Budgeted channel selection: the exact solver against brute force, the greedy baseline, errors, a real model."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import pruning.solve as solve_mod
from pruning.cost import Polynomial
from pruning.solve import KnapsackProblem, allowed_widths, kept_channels, solve


def random_problem(seed: int, round_to: int = 1, min_keep_fraction: float = 0.0) -> KnapsackProblem:
    """3-5 prunable groups of widths 2-6 plus one fixed group, with a triangle and random bilinear terms."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 6))
    names = [f"g{i}" for i in range(n)]
    full = {g: int(rng.integers(2, 7)) for g in names} | {"fixed": 3}
    pairs = {("g0", "g1"): int(rng.integers(1, 60)), ("g1", "g2"): int(rng.integers(1, 60)),
             ("g2", "g0"): int(rng.integers(1, 60))}  # a triangle, in both orientations
    for _ in range(int(rng.integers(1, 5))):
        g, h = rng.choice(names + ["fixed"], size=2)
        pairs[(str(g), str(h))] = pairs.get((str(g), str(h)), 0) + int(rng.integers(1, 60))
    linear = {g: int(rng.integers(0, 40)) for g in names + ["fixed"]}
    poly = Polynomial(int(rng.integers(0, 100)), linear, pairs)
    scores = {g: _scores(rng, full[g]) for g in names}
    return _with_budget(rng, KnapsackProblem(scores, poly, full, 0, round_to, min_keep_fraction))


def _scores(rng: np.random.Generator, width: int) -> np.ndarray:
    if rng.random() < 0.3:
        return rng.integers(0, 3, size=width).astype(float)  # ties
    return rng.random(width)


def _with_budget(rng: np.random.Generator, p: KnapsackProblem) -> KnapsackProblem:
    lo, hi = minimum_macs(p), p.macs(dict(p.full_widths))
    budget = int(lo + rng.uniform(0.05, 0.95) * (hi - lo))
    return KnapsackProblem(p.scores, p.macs, p.full_widths, budget, p.round_to, p.min_keep_fraction)


def grids(p: KnapsackProblem) -> dict[str, np.ndarray]:
    return {g: allowed_widths(p.full_widths[g], p.round_to, p.min_keep_fraction) for g in p.scores}


def minimum_macs(p: KnapsackProblem) -> int:
    return p.macs({**p.full_widths, **{g: int(w[0]) for g, w in grids(p).items()}})


def value(p: KnapsackProblem, widths: dict[str, int]) -> float:
    return float(sum(np.sort(p.scores[g])[::-1][:w].sum() for g, w in widths.items()))


def brute_force(p: KnapsackProblem) -> float:
    """The optimum by enumerating every combination of allowed widths."""
    names, best = list(p.scores), -math.inf
    for combo in itertools.product(*(grids(p)[g] for g in names)):
        widths = dict(zip(names, map(int, combo)))
        if p.macs({**p.full_widths, **widths}) <= p.budget:
            best = max(best, value(p, widths))
    return best


CASES = [(seed, r, f) for seed in range(12) for r, f in ((1, 0.0), (2, 0.0), (1, 0.4), (2, 0.5))]


@pytest.mark.parametrize("seed,round_to,frac", CASES)
def test_exact_matches_brute_force(seed, round_to, frac):
    p = random_problem(seed, round_to, frac)
    opt = brute_force(p)
    sol = solve(p, "exact", gap_tol=0.0)
    allowed = grids(p)
    assert all(w in allowed[g] for g, w in sol.widths.items())
    assert sol.macs == p.macs({**p.full_widths, **sol.widths}) <= p.budget
    assert sol.objective == pytest.approx(opt, rel=1e-9, abs=1e-12)
    assert sol.objective == pytest.approx(value(p, sol.widths), rel=1e-12, abs=1e-12)
    assert sol.bound >= opt - 1e-12 and sol.bound >= sol.objective
    assert 0.0 <= sol.gap <= 1e-9 or sol.objective == sol.bound == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_exact_through_every_code_path(seed, monkeypatch):
    """The concave-hull messages and the relaxed-edge fallback (with its branching) stay exact."""
    p = random_problem(100 + seed, round_to=1 + seed % 2)
    opt = brute_force(p)
    monkeypatch.setattr(solve_mod, "_DENSE", 0)  # every message through the concave hull
    assert solve(p, "exact", gap_tol=0.0).objective == pytest.approx(opt, rel=1e-9, abs=1e-12)
    monkeypatch.setattr(solve_mod, "_TABLE_LIMIT", 1)  # every coupling relaxed, exactness by branching
    sol = solve(p, "exact", gap_tol=0.0)
    assert sol.objective == pytest.approx(opt, rel=1e-9, abs=1e-12) and sol.macs <= p.budget
    assert sol.bound >= opt - 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_bound_is_valid_when_stopped_early(seed):
    p = random_problem(200 + seed)
    opt = brute_force(p)
    sol = solve(p, "exact", time_limit=0.0)  # the root's Lagrangian bound and its completed primal
    assert sol.macs <= p.budget and sol.objective <= opt + 1e-9
    assert sol.bound >= opt - 1e-12 and sol.gap >= -1e-12


def test_conjugate_matches_dense_maximum():
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.integers(1, 4, size=300)).astype(float)
    u = np.cumsum(rng.normal(size=300))  # far from concave
    t = rng.normal(size=(7, 11))
    dense = (u[:, None] - x[:, None] * t.ravel()[None, :]).max(axis=0).reshape(t.shape)
    np.testing.assert_allclose(solve_mod._conjugate(x, u, t), dense, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_reports_true_macs(seed):
    p = random_problem(300 + seed, round_to=1 + seed % 2)
    sol = solve(p, "greedy")
    assert sol.macs == p.macs({**p.full_widths, **sol.widths})
    assert sol.macs <= p.budget  # own-layer weights over-estimate, so the true MACs undershoot
    assert sol.objective <= brute_force(p) + 1e-9
    assert math.isnan(sol.bound) and math.isnan(sol.gap) and sol.solver == "greedy"


def test_budget_below_minimum_names_it():
    p = random_problem(0, min_keep_fraction=0.5)
    low = minimum_macs(p)
    bad = KnapsackProblem(p.scores, p.macs, p.full_widths, low - 1, p.round_to, p.min_keep_fraction)
    for solver in ("exact", "greedy"):
        with pytest.raises(ValueError, match=str(low)) as err:
            solve(bad, solver)
        assert str(low - 1) in str(err.value)
    tight = KnapsackProblem(p.scores, p.macs, p.full_widths, low, p.round_to, p.min_keep_fraction)
    assert solve(tight).macs == low


def test_unknown_solver_lists_names():
    with pytest.raises(ValueError, match="exact") as err:
        solve(random_problem(0), "simplex")
    assert "greedy" in str(err.value)


def test_full_budget_keeps_everything():
    p = random_problem(1)
    p = KnapsackProblem(p.scores, p.macs, p.full_widths, p.macs(dict(p.full_widths)) + 5)
    sol = solve(p)
    assert sol.widths == {g: p.full_widths[g] for g in p.scores} and sol.gap <= 1e-9


def test_deterministic():
    p = random_problem(3, round_to=2)
    for solver in ("exact", "greedy"):
        a, b = solve(p, solver), solve(p, solver)
        assert (a.widths, a.keep, a.objective, a.macs) == (b.widths, b.keep, b.objective, b.macs)


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


def test_efficientnet_b0_hits_budget(model_cache):
    from pruning import CostModel, build_channel_graph

    model = model_cache("efficientnet_b0")
    graph = build_channel_graph(model, 64)
    cost = CostModel(graph, model)
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.width) for g in graph.prunable_groups()}
    budget = int(0.6 * cost.macs())
    p = KnapsackProblem(scores, cost.macs_poly, graph.full_widths(), budget)
    sol = solve(p)
    assert 0.995 * budget <= sol.macs <= budget
    assert sol.macs == cost.macs(sol.widths)
    assert sol.bound >= sol.objective and sol.gap <= 1e-4
    greedy = solve(p, "greedy")
    assert greedy.macs == cost.macs(greedy.widths) < sol.macs and greedy.objective < sol.objective


# ------------------------------------------------------------------------- the CP-SAT cross-check solver

CPSAT_CASES = [(seed, r, f) for seed in range(6) for r, f in ((1, 0.0), (2, 0.0), (1, 0.4), (2, 0.5))]


@pytest.mark.parametrize("seed,round_to,frac", CPSAT_CASES)
def test_cpsat_matches_brute_force(seed, round_to, frac):
    p = random_problem(seed, round_to, frac)  # a triangle coupling, fixed-group terms, ties in some scores
    opt = brute_force(p)
    sol = solve(p, "cpsat", time_limit=10.0, gap_tol=0.0)
    allowed = grids(p)
    assert all(w in allowed[g] for g, w in sol.widths.items()) and sol.solver == "cpsat"
    assert sol.macs == p.macs({**p.full_widths, **sol.widths}) <= p.budget
    assert sol.objective == pytest.approx(opt, rel=1e-6, abs=1e-12)
    assert sol.bound >= opt - 1e-9 and sol.bound >= sol.objective


def test_cpsat_deterministic_and_bound_valid_when_stopped_early():
    p = random_problem(7, round_to=2)
    a, b = solve(p, "cpsat", gap_tol=0.0), solve(p, "cpsat", gap_tol=0.0)
    assert (a.widths, a.objective, a.bound) == (b.widths, b.objective, b.bound)
    early = solve(p, "cpsat", time_limit=0.0)  # whatever it has (the lowest widths if nothing): still valid
    assert early.macs <= p.budget and early.bound >= brute_force(p) - 1e-9


def test_cpsat_agrees_with_exact_on_efficientnet_b0(model_cache):
    from pruning import CostModel, build_channel_graph

    model = model_cache("efficientnet_b0")
    graph = build_channel_graph(model, 64)
    cost = CostModel(graph, model)
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.width) for g in graph.prunable_groups()}
    p = KnapsackProblem(scores, cost.macs_poly, graph.full_widths(), int(0.6 * cost.macs()))
    exact = solve(p, "exact", gap_tol=1e-6)
    cp = solve(p, "cpsat", time_limit=10.0, gap_tol=1e-4)
    assert cp.macs == cost.macs(cp.widths) <= p.budget
    assert cp.objective == pytest.approx(exact.objective, rel=1e-3)
    assert cp.bound >= exact.objective - 1e-9 and exact.bound >= cp.objective - 1e-9  # each bounds the other
