"""Budget parsing and the feasibility check made before any work."""
from __future__ import annotations

import pytest

from pruning import CostModel, build_channel_graph, create_model
from pruning.budget import check_feasible, minimum_macs, resolve_budget

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
    cost = CostModel(build_channel_graph(model, 64), model)
    floor = minimum_macs(cost, round_to=8, min_keep_fraction=0.1)
    assert floor < cost.macs()
    check_feasible(resolve_budget(floor, cost.macs()), cost, 8, 0.1)
    with pytest.raises(ValueError, match=f"minimum achievable is {floor:,} MACs"):
        check_feasible(resolve_budget(floor - 1, cost.macs()), cost, 8, 0.1)
