"""Costs as objects: a model's MACs, parameters or latency as a sum of per-layer terms over group widths.

Every term depends on the kept widths of at most two channel groups (a dense layer: its output and input
groups; a channelwise layer or op: one group; a layer whose channels are all fixed: none), so a cost is
*pairwise separable*. That is all a solver needs: :mod:`pruning.solve` evaluates each term on the allowed
widths of its groups and never asks what the cost means.

Terms:

* :class:`Constant`, :class:`Linear` (``c * w``) and :class:`Bilinear` (``c * w_a * w_b``) make the exact
  MACs and parameter counts (integers; removing a channel also saves the input side of its consumers);
* :class:`Interpolated`: values measured on a grid of widths, multilinear in between (latency tables,
  :mod:`pruning.latency`).

A new kind of cost is a function ``(graph, model) -> Cost`` built from these terms (or from any new term with
``groups`` and a vectorised ``__call__``), registered with :func:`register_cost`; a budget then limits it by
name (``budget.limits.NAME=0.5``, :mod:`pruning.budget`). ``macs`` and ``params`` are registered here; latency
is not a registered cost: its table is measured on the device (:mod:`pruning.latency`, ``budget.latency``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import numpy as np
from torch import nn

from ._registry import Registry
from .graph import ChannelGraph
from .layers import ChannelMap

CostFn = Callable[..., "Cost"]
COSTS: Registry[CostFn] = Registry("cost", "budget.limits.NAME=LIMIT; add one with pruning.cost.register_cost")


def register_cost(name: str) -> Callable[[CostFn], CostFn]:
    """Decorator registering ``fn(graph, model=None) -> Cost`` (a cost named ``name``) for budgets to limit."""
    return COSTS.register(name)


def create_cost(name: str, graph: ChannelGraph, model: nn.Module | None = None) -> "Cost":
    """The cost registered as ``name`` for ``graph`` (and ``model``, for costs that need its parameters)."""
    cost = COSTS.create(name, graph, model)
    if cost.name != name:
        raise ValueError(f"the cost registered as {name!r} returned a cost named {cost.name!r}; the names must match "
                         "(budgets and reports use them)")
    return cost


class Term(Protocol):
    """One layer's cost as a function of the widths of ``groups`` (0, 1 or 2 names).

    ``term(*widths)`` takes one numpy array per group (broadcast against each other) and returns the cost
    at every combination; widths are integers >= 0 (0 only for a removed block's inner groups).
    """

    groups: tuple[str, ...]
    layer: str

    def __call__(self, *widths: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Constant:
    """A cost that no width changes."""

    value: int | float
    layer: str = ""
    groups: tuple[str, ...] = ()

    def __call__(self) -> np.ndarray:
        return np.asarray(self.value)


@dataclass(frozen=True)
class Linear:
    """``coef * w``: a channelwise layer, or a dense layer whose other side is fixed."""

    groups: tuple[str]
    coef: int | float
    layer: str = ""

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return self.coef * np.asarray(w)


@dataclass(frozen=True)
class Bilinear:
    """``coef * w_a * w_b``: a dense layer producing group ``a`` from group ``b`` (or a width squared)."""

    groups: tuple[str, str]
    coef: int | float
    layer: str = ""

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.coef * np.asarray(a) * np.asarray(b)


@dataclass(frozen=True)
class Grouped:
    """``coef * w_a * w_b // groups``: a grouped conv producing group ``a`` from group ``b``; both widths stay
    multiples of ``groups``, so the value is exact (integer arithmetic, no fractional coefficient)."""

    groups: tuple[str, str]
    coef: int
    divisor: int
    layer: str = ""

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.coef * np.asarray(a) * np.asarray(b) // self.divisor


@dataclass(frozen=True)
class Gated:
    """``w_a * (coef if w_b > 0 else removed)``: a channelwise layer on group ``a`` inside a removable block whose
    first inner group is ``b``; removing the block removes it, leaving ``removed`` per channel (a kept bias)."""

    groups: tuple[str, str]
    coef: int | float
    removed: int | float = 0
    layer: str = ""

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(a) * np.where(np.asarray(b) > 0, self.coef, self.removed)


@dataclass(frozen=True, eq=False)
class Interpolated:
    """Values measured at grid widths, multilinear in between (bilinear on each cell for two groups).

    Attributes:
        groups: one or two group names.
        grids: per group, the ascending sample widths (the full width last).
        values: cost at every grid point, shape ``(len(grids[0]), [len(grids[1])])``.
        zero_at: per group, True when width 0 means the layer is gone (a removed block) and costs 0;
            between 0 and the first grid point the cost is interpolated from 0.
        layer: what was measured (for reports).
    """

    groups: tuple[str, ...]
    grids: tuple[tuple[int, ...], ...]
    values: np.ndarray
    zero_at: tuple[bool, ...] = ()
    layer: str = ""

    def __post_init__(self) -> None:
        shape = tuple(len(g) for g in self.grids)
        if len(self.grids) != len(self.groups) or np.shape(self.values) != shape:
            raise ValueError(f"term {self.layer!r}: values of shape {np.shape(self.values)} do not match grids {shape}")
        if any(list(g) != sorted(set(g)) for g in self.grids):
            raise ValueError(f"term {self.layer!r}: grid widths must be strictly increasing")

    def __call__(self, *widths: np.ndarray) -> np.ndarray:
        widths = np.broadcast_arrays(*[np.asarray(w, dtype=np.float64) for w in widths])
        axes = [self._axis(k) for k in range(len(self.groups))]
        table = np.asarray(self.values, dtype=np.float64)
        for k, (_grid, zero) in enumerate(axes):
            if zero:
                table = np.concatenate([np.zeros_like(table.take([0], axis=k)), table], axis=k)
        out = np.zeros(widths[0].shape if widths else ())
        corners = _corners([(np.asarray(g, dtype=np.float64), w) for (g, _), w in zip(axes, widths)])
        for index, weight in corners:
            out = out + weight * table[index]
        return out

    def _axis(self, k: int) -> tuple[tuple[int, ...], bool]:
        zero = bool(self.zero_at[k]) if k < len(self.zero_at) else False
        grid = tuple(self.grids[k])
        return ((0, *grid) if zero and grid[0] != 0 else grid), zero and grid[0] != 0


def _corners(axes: list[tuple[np.ndarray, np.ndarray]]):
    """Multilinear interpolation: the grid corners around each point and their weights (clamped ends)."""
    per_axis = []
    for grid, w in axes:
        if len(grid) == 1:
            per_axis.append([(np.zeros(w.shape, np.int64), np.ones(w.shape))])
            continue
        hi = np.clip(np.searchsorted(grid, w, side="right"), 1, len(grid) - 1)
        lo = hi - 1
        t = np.clip((w - grid[lo]) / (grid[hi] - grid[lo]), 0.0, 1.0)
        per_axis.append([(lo, 1.0 - t), (hi, t)])
    combos = [((), 1.0)]
    for options in per_axis:
        combos = [(idx + (i,), wt * w) for idx, wt in combos for i, w in options]
    return combos


@dataclass
class Cost:
    """A model-level cost: the sum of its terms, each over the widths of at most two groups.

    Attributes:
        name: what is counted (``macs``, ``params``, ``latency``): the key budgets and reports use.
        unit: the unit of the values (``MACs``, ``params``, ``ms``).
        terms: one per layer (or op), see :class:`Term`.
        full_widths: every group's unpruned width (groups not given to :meth:`__call__` stay at it).
        integral: True when every term is an exact integer (MACs, params): solvers then compare exactly.
        meta: what the cost was measured with; ``meta["round_to"]``, when set, is the width multiple at which
            it is exact (a latency table's channel alignment), which solvers then keep.
    """

    name: str
    unit: str
    terms: list
    full_widths: dict[str, int]
    integral: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for term in self.terms:
            if len(term.groups) > 2:
                raise ValueError(f"cost {self.name!r}: term {term.layer!r} depends on {len(term.groups)} groups; at most 2")
            unknown = [g for g in term.groups if g not in self.full_widths]
            if unknown:
                raise ValueError(f"cost {self.name!r}: term {term.layer!r} names unknown groups {unknown}")

    def widths(self, widths: Mapping[str, int] | None = None) -> dict[str, int]:
        """Full widths, overridden by ``widths``; unknown group names raise a KeyError naming them."""
        unknown = set(widths or {}) - set(self.full_widths)
        if unknown:
            raise KeyError(f"unknown channel groups {sorted(unknown)}; known: {list(self.full_widths)}")
        return {**self.full_widths, **(widths or {})}

    def __call__(self, widths: Mapping[str, int] | None = None) -> int | float:
        """The cost with the given kept widths (groups not named at full width)."""
        w = self.widths(widths)
        total = sum(term(*(np.asarray(w[g]) for g in term.groups)) for term in self.terms)
        return int(total) if self.integral else float(total)

    def is_monotone(self, grids: Mapping[str, np.ndarray] | None = None) -> bool:
        """True when no term decreases as any width grows (checked on ``grids``, default every width)."""
        for term in self.terms:
            axes = [np.arange(0, self.full_widths[g] + 1) if grids is None else np.asarray(grids[g]) for g in term.groups]
            if not axes:
                continue
            mesh = np.meshgrid(*axes, indexing="ij")
            table = np.asarray(term(*mesh), dtype=np.float64)
            for k in range(table.ndim):
                if np.any(np.diff(table, axis=k) < -1e-12 * max(1.0, float(np.abs(table).max()))):
                    return False
        return True


def _layer_terms(graph: ChannelGraph, per_pair, per_out) -> list:
    """Bilinear/linear terms of every layer with a rule; dense layers between one group are squares."""
    terms: list = []
    for layer in graph.layers:
        c_pair, c_out = per_pair(layer.cost), per_out(layer.cost)
        if layer.channel_map is ChannelMap.MIX:
            pair = (layer.out_group, layer.in_group)
            if c_pair and layer.cost.groups > 1:
                terms.append(Grouped(pair, c_pair, layer.cost.groups, layer.module))
            elif c_pair:
                terms.append(Bilinear(pair, c_pair, layer.module))
        elif c_pair:
            terms.append(Linear((layer.out_group,), c_pair, layer.module))
        if c_out:
            terms.append(Linear((layer.out_group,), c_out, layer.module))
    return terms


@register_cost("macs")
def macs_cost(graph: ChannelGraph, model: nn.Module | None = None) -> Cost:
    """Exact MACs of conv and linear layers as a function of the group widths (the project's FLOPs convention)."""
    terms = _layer_terms(graph, lambda c: c.macs_per_pair, lambda c: 0)
    return Cost("macs", "MACs", terms, graph.full_widths(), integral=True)


@register_cost("params")
def params_cost(graph: ChannelGraph, model: nn.Module | None = None) -> Cost:
    """Exact parameter count; parameters of layers without a rule (if ``model`` is given) are a constant.

    With ``model``, removable blocks are known (:mod:`pruning.blocks`): a block's layers on its residual stream
    (its last batch norm) go with it, and a block that cannot fold its constant output away keeps one bias per
    stream channel, so the count stays exact when blocks are removed.
    """
    terms = _layer_terms(graph, lambda c: c.params_per_pair, lambda c: c.params_per_out)
    cost = Cost("params", "params", terms, graph.full_widths(), integral=True)
    if model is not None:
        cost.terms = _gate_removable(cost.terms, model, graph)
        other = sum(p.numel() for p in model.parameters()) - cost()
        if other:
            cost.terms.append(Constant(other, "other parameters"))
    return cost


def _gate_removable(terms: list, model: nn.Module, graph: ChannelGraph) -> list:
    from .blocks import find_block_rule, removable_blocks

    for block in removable_blocks(model, graph):
        gate = (block.stream, block.inner[0])
        def inside(t, block=block) -> bool:
            return t.layer.startswith(block.module + ".") and t.groups == (block.stream,)

        terms = [Gated(gate, t.coef, 0, t.layer) if isinstance(t, Linear) and inside(t) else t for t in terms]
        if find_block_rule(model.get_submodule(block.module)).post_add is not None:  # not folded: a bias stays
            terms.append(Gated(gate, 0, 1, f"{block.module} (bias when removed)"))
    return terms


class CostModel:
    """MACs and parameters of a model with any kept widths, without building it.

    Args:
        graph: the model's channel graph (fixes the input size).
        model: the model, to count parameters that belong to no layer with a rule (kept constant).
    """

    def __init__(self, graph: ChannelGraph, model: nn.Module | None = None) -> None:
        self.graph = graph
        self.macs_cost = macs_cost(graph)
        self.params_cost = params_cost(graph, model)

    def widths(self, widths: Mapping[str, int] | None = None) -> dict[str, int]:
        """Full widths, overridden by ``widths``; unknown group names raise a KeyError naming them."""
        return self.macs_cost.widths(widths)

    def macs(self, widths: Mapping[str, int] | None = None) -> int:
        """MACs of conv and linear layers with the given kept widths (others full)."""
        return self.macs_cost(widths)

    def params(self, widths: Mapping[str, int] | None = None) -> int:
        """Parameter count with the given kept widths (others full)."""
        return self.params_cost(widths)

