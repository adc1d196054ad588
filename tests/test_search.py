"""From scores and a budget to a pruned model that meets the budget (importance -> solve -> prune)."""
from __future__ import annotations

import pytest
import torch

from pruning import build_channel_graph, create_model
from pruning.cost import CostModel
from pruning.count import count_model
from pruning.importance import create_importance
from pruning.search import kept_fraction_by_stage, search, stage_of


@pytest.fixture(scope="module")
def b1():
    torch.manual_seed(0)
    model = create_model("efficientnet_b1")
    graph = build_channel_graph(model, 240)
    return model, graph, create_importance("l1")(model, graph)


def test_b1_meets_the_paper_budget(b1):
    """Acceptance: efficientnet_b1@240 at flops_490M lands in [0.995, 1.0] x 391,208,019 MACs and runs."""
    model, graph, scores = b1
    result = search(model, graph, scores, "flops_490M")
    assert 0.995 <= result.macs_after / 391_208_019 <= 1.0
    assert count_model(result.pruned, 240).macs == result.macs_after == result.solution.macs
    assert result.solution.gap < 1e-4 and result.solution.bound >= result.solution.objective
    with torch.no_grad():
        assert result.pruned(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_same_scores_same_channels(b1):
    model, graph, scores = b1
    a = search(model, graph, scores, 0.5).solution
    b = search(model, graph, scores, 0.5).solution
    assert a.keep == b.keep


def test_round_to_and_min_keep(b1):
    model, graph, scores = b1
    result = search(model, graph, scores, 0.5, round_to=8, min_keep_fraction=0.25)
    for g in graph.prunable_groups():
        w = result.solution.widths[g.name]
        assert w % 8 == 0 or w == g.width
        assert w >= 0.25 * g.width
    assert 0.99 <= result.ratio <= 1.0


def test_uniform_keeps_one_ratio(b1):
    model, graph, scores = b1
    result = search(model, graph, scores, 0.6, solver="uniform")
    fractions = [result.solution.widths[g.name] / g.width for g in graph.prunable_groups()]
    ratio = max(fractions)
    assert all(ratio - 1 / g.width - 1e-9 <= f <= ratio for f, g in zip(fractions, graph.prunable_groups()))
    assert result.ratio <= 1.0


def test_exact_beats_paper_greedy(b1):
    model, graph, scores = b1
    exact = search(model, graph, scores, "flops_490M").solution
    greedy = search(model, graph, scores, "flops_490M", solver="greedy").solution
    assert greedy.macs < 0.995 * 391_208_019  # ignoring input-side savings misses the target
    assert exact.objective > greedy.objective


def test_infeasible_and_malformed_budgets_fail_before_solving(b1):
    model, graph, scores = b1
    with pytest.raises(ValueError, match="minimum achievable"):
        search(model, graph, scores, "1M")
    with pytest.raises(ValueError, match="malformed budget"):
        search(model, graph, scores, "lots")


def test_stages():
    assert stage_of("blocks.3.1.conv_pw") == "blocks.3" and stage_of("layer2.0.conv1") == "layer2"
    graph = build_channel_graph(create_model("efficientnet_b0"), 64)
    full = kept_fraction_by_stage(graph, graph.full_widths())
    assert list(full) == [f"blocks.{s}" for s in range(1, 7)] and set(full.values()) == {1.0}


def test_threshold_is_a_global_ranking(b1):
    model, graph, scores = b1
    result = search(model, graph, scores, 0.6, solver="threshold")
    assert result.ratio <= 1.0
    kept = torch.cat([torch.as_tensor(scores[g])[torch.tensor(k)] for g, k in result.solution.keep.items()])
    dropped = torch.cat([torch.as_tensor(scores[g])[torch.tensor(sorted(set(range(len(scores[g]))) - set(k)), dtype=torch.long)]
                         for g, k in result.solution.keep.items()])
    # apart from each group's last channel (never removed), every kept channel outranks every dropped one
    singles = {g for g, k in result.solution.keep.items() if len(k) == 1}
    multi_kept = torch.cat([torch.as_tensor(scores[g])[torch.tensor(k)] for g, k in result.solution.keep.items() if g not in singles])
    assert multi_kept.min() >= dropped.max()
    assert len(kept) + len(dropped) == sum(g.width for g in graph.prunable_groups())


def test_solve_to_measured_tightens_until_the_device_agrees():
    """A device 10% slower than its table: the limit is lowered by the measured excess and solved again."""
    from test_solve import random_problem

    from pruning.search import solve_to_measured
    from pruning.solve import Constraint, KnapsackProblem

    p = random_problem(11, kind="table")
    table = p.constraints[0].cost
    allowed = 0.8 * table()  # the budget in ms
    p = KnapsackProblem(p.scores, [Constraint(table, allowed, "0.8")], p.full_widths)
    measure = lambda sol: 1.1 * table({**p.full_widths, **sol.widths})  # noqa: E731
    solution, history = solve_to_measured(p, measure, allowed)
    assert not history[0]["met"] and history[-1]["met"] and len(history) >= 2
    assert measure(solution) <= allowed < 1.1 * history[0]["predicted"]
    assert [h["limit"] for h in history] == sorted((h["limit"] for h in history), reverse=True)


def test_solve_to_measured_follows_a_fixed_overhead_in_few_steps():
    """A device with a fixed overhead (half the budget) on top of the table: proportional steps alone would still
    be over after four measurements; the line through the last two gets under at the third."""
    from test_solve import random_problem

    from pruning.search import solve_to_measured
    from pruning.solve import Constraint, KnapsackProblem

    p = random_problem(11, kind="table")
    table = p.constraints[0].cost
    allowed = 0.8 * table()
    p = KnapsackProblem(p.scores, [Constraint(table, allowed, "0.8")], p.full_widths)
    measure = lambda sol: 0.5 * allowed + table({**p.full_widths, **sol.widths})  # noqa: E731
    solution, history = solve_to_measured(p, measure, allowed, iterations=3)
    assert history[-1]["met"] and len(history) == 3
    assert 0.9 * allowed <= measure(solution) <= allowed  # close under it (the widths are coarse), not far below


def test_search_with_the_device_in_the_loop(b1):
    """search(..., measured=...): a device measuring 10% above the MACs count: solved again until it agrees."""
    from pruning.search import MeasuredLimit

    model, graph, scores = b1
    parent = CostModel(graph, model).macs()
    measured = MeasuredLimit(lambda solution: 1.1 * solution.costs["macs"], 0.5 * parent, cost_name="macs")
    result = search(model, graph, scores, 0.5, measured=measured)
    steps = result.verification
    assert not steps[0]["met"] and steps[-1]["met"] and len(steps) >= 2
    assert 1.1 * result.macs_after <= 0.5 * parent and result.solution.macs == result.macs_after
