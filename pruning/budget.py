"""Budgets: from what users type (``flops_490M``, ``300M``, ``0.3G``, ``0.5``) to a target in MACs.

Accepted forms:

* a paper budget name: ``flops_490M``, ``flops_878M``, ``flops_1240M`` (the MACs of timm's published
  ``efficientnet_b{1,2,3}_pruned``, see :mod:`pruning.paper`);
* absolute MACs: an integer (``391208019``) or a number with a suffix K/M/G (``300M``, ``0.3G``, ``1.2e9``);
* a fraction of the parent's MACs: a number in (0, 1] (``0.5``) or a percentage (``50%``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .cost import CostModel
from .paper import PAPER_CONFIGS
from .solve import allowed_widths

ACCEPTED = (
    "a paper budget name (flops_490M, flops_878M, flops_1240M), absolute MACs (391208019, 300M, 0.3G, 1.2e9), "
    "or a fraction of the parent's MACs (0.5 or 50%)"
)
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG%]?)\s*$")


@dataclass(frozen=True)
class Budget:
    """A resolved budget: what the user wrote and the target MACs it means for this parent."""

    spec: str
    macs: int
    fraction: float  # target / parent MACs


def _parse(spec: str | float | int, parent_macs: int) -> int:
    if isinstance(spec, str) and spec in PAPER_CONFIGS:
        return PAPER_CONFIGS[spec].macs
    m = _NUMBER.match(str(spec))
    if m is None:
        raise ValueError(f"malformed budget {spec!r}: expected {ACCEPTED}")
    value, suffix = float(m.group(1)), m.group(2).upper()
    if suffix == "%":
        value, suffix = value / 100, "FRACTION"
    elif suffix == "" and 0 < value <= 1:
        suffix = "FRACTION"
    if suffix == "FRACTION":
        if not 0 < value <= 1:
            raise ValueError(f"budget {spec!r} is a fraction outside (0, 1]; expected {ACCEPTED}")
        return int(value * parent_macs)
    return int(round(value * _SUFFIX[suffix]))


def resolve_budget(spec: str | float | int, parent_macs: int) -> Budget:
    """Turn a budget as typed into target MACs for a parent of ``parent_macs`` MACs.

    Raises:
        ValueError: a malformed budget (listing the accepted forms) or one above the parent's MACs.
    """
    macs = _parse(spec, parent_macs)
    if macs > parent_macs:
        raise ValueError(
            f"budget {spec!r} = {macs:,} MACs exceeds the unpruned model's {parent_macs:,} MACs; nothing to prune. "
            f"Check model.name / model.img_size, or give a smaller budget"
        )
    return Budget(str(spec), macs, macs / parent_macs)


def minimum_macs(cost: CostModel, round_to: int = 1, min_keep_fraction: float = 0.0) -> int:
    """The fewest MACs reachable: every prunable group at its smallest allowed width."""
    widths = {
        g.name: int(allowed_widths(g.width, round_to, min_keep_fraction)[0]) for g in cost.graph.prunable_groups()
    }
    return cost.macs(widths)


def check_feasible(budget: Budget, cost: CostModel, round_to: int = 1, min_keep_fraction: float = 0.0) -> None:
    """Fail before any work when no allowed widths meet ``budget``, saying the minimum achievable MACs."""
    floor = minimum_macs(cost, round_to, min_keep_fraction)
    if budget.macs < floor:
        raise ValueError(
            f"budget {budget.spec!r} = {budget.macs:,} MACs is infeasible: the minimum achievable is {floor:,} MACs "
            f"({floor / cost.macs():.1%} of the parent) with round_to={round_to}, min_keep_fraction={min_keep_fraction} "
            "and the protected layers. Raise the budget, or lower min_keep_fraction / round_to, or protect fewer layers"
        )
