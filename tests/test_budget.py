"""Budget parsing and the feasibility check made before any work."""
from __future__ import annotations

import pytest

from pruning import CostModel, build_channel_graph, create_model
from pruning.graph import ChannelGroup
from pruning.budget import (check_feasible, latency_constraint, lowest_widths, macs_constraint, params_constraint,
                            parse_latency, resolve_budget)
from pruning.cost import Cost, Linear
from pruning.errors import UserInputError

PARENT = 2_000_000_000


@pytest.mark.parametrize("spec,macs", [
    ("flops_490M", 391_208_019), ("flops_878M", 715_749_145), ("flops_1240M", 1_020_257_090),
    ("300M", 300_000_000), ("0.3G", 300_000_000), ("1.2e8", 120_000_000), ("391208019", 391_208_019),
    (391208019, 391_208_019), ("0.5", 1_000_000_000), (0.5, 1_000_000_000), ("50%", 1_000_000_000), ("250k", 250_000),
    (1, PARENT),
])
def test_accepted_forms(spec, macs):
    assert resolve_budget(spec, PARENT).macs == macs


@pytest.mark.parametrize("spec,needle", [
    ("flops_500M", "malformed budget 'flops_500M'"), ("half", "malformed"), ("-3M", "malformed"),
    ("150%", "fraction outside"), ("3G", "exceeds the unpruned model"),
])
def test_bad_budgets_name_the_value_and_the_forms(spec, needle):
    with pytest.raises(ValueError, match=needle) as err:
        resolve_budget(spec, PARENT)
    assert "flops_490M" in str(err.value) or "exceeds" in str(err.value)


def test_infeasible_budget_reports_minimum():
    model = create_model("efficientnet_b0")
    graph = build_channel_graph(model, 64)
    cost = CostModel(graph, model)
    floor = cost.macs(lowest_widths(graph.prunable_groups(), 8, 0.1))
    assert floor < cost.macs()
    check_feasible([macs_constraint(floor, cost.macs_cost)], graph.prunable_groups(), 8, 0.1)
    with pytest.raises(ValueError, match=f"minimum achievable is {floor:,} MACs"):
        check_feasible([macs_constraint(floor - 1, cost.macs_cost)], graph.prunable_groups(), 8, 0.1)


@pytest.mark.parametrize("spec,ms", [("8ms", 8.0), ("800us", 0.8), ("0.008s", 8.0), ("0.6", 12.0), (0.6, 12.0),
                                     ("60%", 12.0), ("2.5 ms", 2.5), (1, 20.0)])
def test_latency_forms(spec, ms):
    assert parse_latency(spec, 20.0) == pytest.approx(ms)


@pytest.mark.parametrize("spec,needle", [("8", "no unit"), ("fast", "malformed latency"), ("0ms", "positive"),
                                         ("150%", "no unit"), ("8 hours", "malformed")])
def test_bad_latency_budgets_say_the_forms(spec, needle):
    with pytest.raises(ValueError, match=needle) as err:
        parse_latency(spec, 20.0)
    assert "8ms" in str(err.value)


def test_params_and_latency_constraints():
    full = {"a": 10}
    params = Cost("params", "params", [Linear(("a",), 100)], full, integral=True)
    assert params_constraint("50%", params).limit == 500 and params_constraint("0.7K", params).limit == 700
    with pytest.raises(ValueError, match="exceeds"):
        params_constraint("2K", params)
    latency = Cost("latency", "ms", [Linear(("a",), 0.5)], full)
    assert latency_constraint("0.6", latency).limit == pytest.approx(3.0)  # fraction of the predicted parent
    assert latency_constraint("0.6", latency, parent_ms=10.0).limit == pytest.approx(6.0)  # of the measured one
    with pytest.raises(ValueError, match=r"minimum achievable is 0.5 ms \(10.0% of the parent\)"):
        check_feasible([latency_constraint("0.4ms", latency)], [ChannelGroup("a", 10)])


def test_budgets_above_the_parent_are_refused():
    """Nothing to prune: MACs, params and a latency time above the parent's cost fail, naming both values."""
    full = {"a": 10}
    latency = Cost("latency", "ms", [Linear(("a",), 0.5)], full)
    assert latency_constraint("10ms", latency, parent_ms=10.0).limit == 10.0  # the parent's own latency is allowed
    with pytest.raises(UserInputError, match=r"latency budget '30ms' = 30 ms exceeds the unpruned model's 10 ms; "
                                             r"nothing to prune.*8ms"):
        latency_constraint("30ms", latency, parent_ms=10.0)
    params = Cost("params", "params", [Linear(("a",), 100)], full, integral=True)
    with pytest.raises(UserInputError, match=r"params budget '2K' = 2,000 exceeds the unpruned model's 1,000.*3M"):
        params_constraint("2K", params)
    with pytest.raises(UserInputError, match=r"budget '3G' = 3,000,000,000 MACs exceeds the unpruned model's "
                                             r"2,000,000,000 MACs; nothing to prune"):
        resolve_budget("3G", PARENT)


def test_block_removal_lowers_the_minimum():
    model = create_model("efficientnet_b0")
    graph = build_channel_graph(model, 64)
    cost = CostModel(graph, model)
    block = ("blocks.2.1.conv_pw", "blocks.2.1.se.conv_reduce")
    low = lowest_widths(graph.prunable_groups(), removable=[block])
    assert low["blocks.2.1.conv_pw"] == 0 and cost.macs(low) < cost.macs(lowest_widths(graph.prunable_groups()))
