"""Budgets: from what users type to limits on costs (MACs, parameters, latency).

Accepted forms, per cost (config key in brackets):

* MACs (``budget.target``): a paper budget name ``flops_490M``, ``flops_878M``, ``flops_1240M`` (the MACs of
  timm's published ``efficientnet_b{1,2,3}_pruned``, see :mod:`pruning.paper`); absolute MACs as an integer
  (``391208019``) or with a suffix K/M/G (``300M``, ``0.3G``, ``1.2e9``); a fraction of the parent's MACs
  (``0.5`` or ``50%``).
* parameters (``budget.params``): a count (``3000000``, ``3M``) or a fraction of the parent's (``0.5``, ``50%``).
* latency (``budget.latency``): a time (``8ms``, ``800us``, ``0.008s``) or a fraction of the parent's measured
  latency (``0.6``, ``60%``) at ``budget.latency_batch`` images per forward pass.
* any registered cost (``budget.limits.NAME``, :func:`pruning.cost.register_cost`): an amount in its unit or a
  fraction of the parent's, as for parameters.

Any combination may be given; each becomes a :class:`~pruning.solve.Constraint`. Infeasible limits fail
before any solving, naming the lowest achievable value.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .cost import Cost
from .errors import UserInputError
from .paper import PAPER_CONFIGS
from .solve import Constraint, allowed_widths, width_multiple
from .solvers.instance import within_limit

ACCEPTED = (
    "a paper budget name (flops_490M, flops_878M, flops_1240M), absolute MACs (391208019, 300M, 0.3G, 1.2e9), "
    "or a fraction of the parent's MACs (0.5 or 50%)"
)
ACCEPTED_PARAMS = "a parameter count (3000000, 3M, 2.5e6) or a fraction of the parent's (0.5 or 50%)"
ACCEPTED_LATENCY = "a time (8ms, 800us, 0.008s) or a fraction of the parent's measured latency (0.6 or 60%)"
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
_TIME_MS = {"MS": 1.0, "S": 1000.0, "US": 1e-3}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG%]?)\s*$")
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(ms|s|us|%)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A resolved MACs budget: what the user wrote and the target MACs it means for this parent."""

    spec: str
    macs: int
    fraction: float  # target / parent MACs


# ----------------------------------------------------------------------------------------- parsing


def _parse_count(spec: str | float | int, parent: int | float, accepted: str, names: Mapping[str, int],
                 integral: bool = True) -> int | float:
    """A count with an optional K/M/G suffix, a fraction in (0, 1] or a percentage, or a known name (rounded to an
    integer unless ``integral`` is False)."""
    if isinstance(spec, str) and spec in names:
        return names[spec]
    m = _NUMBER.match(str(spec))
    if m is None:
        raise UserInputError(f"malformed budget {spec!r}: expected {accepted}")
    value, suffix = float(m.group(1)), m.group(2).upper()
    if suffix == "%" or (suffix == "" and 0 < value <= 1):
        fraction = value / 100 if suffix == "%" else value
        if not 0 < fraction <= 1:
            raise UserInputError(f"budget {spec!r} is a fraction outside (0, 1]; expected {accepted}")
        return int(fraction * parent) if integral else fraction * parent
    return int(round(value * _SUFFIX[suffix])) if integral else value * _SUFFIX[suffix]


def parse_latency(spec: str | float | int, parent_ms: float) -> float:
    """A latency budget in milliseconds: a time with a unit, or a fraction / percentage of ``parent_ms``.

    Raises:
        UserInputError: malformed, a bare number above 1 (no unit), or a fraction outside (0, 1].
    """
    m = _TIME.match(str(spec))
    if m is None or isinstance(spec, bool):
        raise UserInputError(f"malformed latency budget {spec!r}: expected {ACCEPTED_LATENCY}")
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    if unit in _TIME_MS:
        if value <= 0:
            raise UserInputError(f"latency budget {spec!r} must be positive; expected {ACCEPTED_LATENCY}")
        return value * _TIME_MS[unit]
    fraction = value / 100 if unit == "%" else value
    if not 0 < fraction <= 1:
        raise UserInputError(
            f"latency budget {spec!r} has no unit and is not a fraction in (0, 1]; expected {ACCEPTED_LATENCY} "
            f"(write {spec}ms for milliseconds)"
        )
    return fraction * parent_ms


def is_time(spec: str | float | int) -> bool:
    """True when a latency budget is a time (``8ms``), False when it is a fraction of the parent's (``0.6``)."""
    m = _TIME.match(str(spec))
    return bool(m) and (m.group(2) or "").upper() in _TIME_MS


def resolve_budget(spec: str | float | int, parent_macs: int) -> Budget:
    """Turn a MACs budget as typed into target MACs for a parent of ``parent_macs`` MACs.

    Raises:
        UserInputError: a malformed budget (listing the accepted forms) or one above the parent's MACs.
    """
    macs = _parse_count(spec, parent_macs, ACCEPTED, {k: c.macs for k, c in PAPER_CONFIGS.items()})
    if macs > parent_macs:
        raise UserInputError(
            f"budget {spec!r} = {macs:,} MACs exceeds the unpruned model's {parent_macs:,} MACs; nothing to prune. "
            f"Check model.name / model.img_size, or give a smaller budget"
        )
    return Budget(str(spec), macs, macs / parent_macs)


# ------------------------------------------------------------------------------------ constraints


def macs_constraint(spec: str | float | int, cost: Cost) -> Constraint:
    """``cost`` (a MACs cost) limited by a MACs budget as typed."""
    return Constraint(cost, resolve_budget(spec, cost()).macs, str(spec))


def params_constraint(spec: str | float | int, cost: Cost) -> Constraint:
    """``cost`` (a parameter cost) limited by a parameter budget as typed."""
    return cost_constraint(spec, cost, ACCEPTED_PARAMS)


def cost_constraint(spec: str | float | int, cost: Cost, accepted: str | None = None) -> Constraint:
    """Any cost (``budget.params``, ``budget.limits.NAME``) limited by a value as typed: an amount in the cost's
    unit (``3M``, ``2.5e6``, ``120``) or a fraction of the parent's (``0.5``, ``50%``).

    Raises:
        UserInputError: a malformed budget, or one above the parent's cost (nothing to prune).
    """
    accepted = accepted or f"an amount of {cost.unit} (3000000, 3M, 2.5e6) or a fraction of the parent's (0.5 or 50%)"
    parent = cost()
    limit = _parse_count(spec, parent, accepted, {}, cost.integral)
    if limit > parent:
        raise UserInputError(f"{cost.name} budget {spec!r} = {_fmt(limit)} exceeds the unpruned model's {_fmt(parent)}; "
                             f"nothing to prune. Give a smaller budget: {accepted}")
    return Constraint(cost, limit, str(spec))


def latency_constraint(spec: str | float | int, cost: Cost, parent_ms: float | None = None) -> Constraint:
    """``cost`` (a latency table's cost, in ms) limited by a latency budget as typed.

    Args:
        parent_ms: the parent's measured latency that fractions refer to (default: the cost's prediction at
            full widths, which a calibrated table matches).

    Raises:
        UserInputError: a malformed budget, or a time above the parent's latency (nothing to prune).
    """
    parent = cost() if parent_ms is None else parent_ms
    limit = parse_latency(spec, parent)
    if limit > parent:
        raise UserInputError(
            f"latency budget {spec!r} = {limit:.4g} ms exceeds the unpruned model's {parent:.4g} ms; nothing to prune. "
            f"Give a smaller budget ({ACCEPTED_LATENCY}), or check model.name / model.img_size / budget.latency_batch"
        )
    return Constraint(cost, limit, str(spec))


# ---------------------------------------------------------------------------------- feasibility


def lowest_widths(groups: Sequence, round_to: int = 1, min_keep_fraction: float = 0.0,
                  removable: Sequence[tuple[str, ...]] = ()) -> dict[str, int]:
    """The smallest allowed width of every prunable group (0 for the inner groups of removable blocks)."""
    widths = {g.name: int(allowed_widths(g.width, round_to, min_keep_fraction, g.blocks)[0]) for g in groups}
    return widths | {name: 0 for block in removable for name in block}


def check_feasible(constraints: Sequence[Constraint], groups: Sequence, round_to: int = 1,
                   min_keep_fraction: float = 0.0, removable: Sequence[tuple[str, ...]] = ()) -> None:
    """Fail before any work when some limit is below its cost at the lowest allowed widths, naming that minimum.

    Args:
        constraints: the limits.
        groups: the prunable groups (``graph.prunable_groups()``).
    """
    round_to = width_multiple(round_to, constraints)
    low = lowest_widths(groups, round_to, min_keep_fraction, removable)
    for c in constraints:
        floor, parent = c.cost(low), c.cost()
        if not within_limit(floor, c.limit, c.cost.integral):
            raise UserInputError(
                f"{c.name} budget {c.spec or c.limit!r} = {_fmt(c.limit)} {c.cost.unit} is infeasible: the minimum "
                f"achievable is {_fmt(floor)} {c.cost.unit} ({floor / parent:.1%} of the parent) with "
                f"round_to={round_to}, min_keep_fraction={min_keep_fraction}"
                f"{', block removal' if removable else ''} and the protected layers. Raise the budget, or lower "
                "min_keep_fraction / round_to, allow block removal, or protect fewer layers"
            )


def _fmt(x: int | float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:.4g}"
