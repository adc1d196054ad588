"""The exact cost model: MACs and parameters of the model as a function of every group's kept width.

A dense layer costs ``c * out_width * in_width`` and a channelwise layer ``c * width``, so the total is a
bilinear polynomial in the group widths. Removing a channel therefore also saves the input side of every
layer that consumed it (the paper's code ignored that saving and missed its targets).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

from torch import nn

from .graph import ChannelGraph
from .layers import ChannelMap


@dataclass(frozen=True)
class Polynomial:
    """``const + sum_g linear[g] * w_g + sum_{(g, h)} pairs[(g, h)] * w_g * w_h`` over group widths."""

    const: int
    linear: dict[str, int]
    pairs: dict[tuple[str, str], int]

    def __call__(self, widths: Mapping[str, int]) -> int:
        total = self.const
        total += sum(c * widths[g] for g, c in self.linear.items())
        total += sum(c * widths[g] * widths[h] for (g, h), c in self.pairs.items())
        return total


class CostModel:
    """MACs and parameters of a model with any kept widths, without building it.

    Args:
        graph: the model's channel graph (fixes the input size).
        model: the model, to count parameters that belong to no layer with a rule (kept constant).
    """

    def __init__(self, graph: ChannelGraph, model: nn.Module | None = None) -> None:
        self.graph = graph
        self.macs_poly = self._polynomial(lambda cost: (cost.macs_per_pair, 0))
        params_poly = self._polynomial(lambda cost: (cost.params_per_pair, cost.params_per_out))
        self.params_poly = Polynomial(params_poly.const + self._other_params(model, params_poly), params_poly.linear, params_poly.pairs)

    def _polynomial(self, coefs) -> Polynomial:
        linear: dict[str, int] = defaultdict(int)
        pairs: dict[tuple[str, str], int] = defaultdict(int)
        for layer in self.graph.layers:
            per_pair, per_out = coefs(layer.cost)
            linear[layer.out_group] += per_out
            if layer.channel_map is ChannelMap.MIX:
                pairs[(layer.out_group, layer.in_group)] += per_pair
            else:
                linear[layer.out_group] += per_pair
        return Polynomial(0, {g: c for g, c in linear.items() if c}, {k: c for k, c in pairs.items() if c})

    def _other_params(self, model: nn.Module | None, params_poly: Polynomial) -> int:
        if model is None:
            return 0
        total = sum(p.numel() for p in model.parameters())
        return total - params_poly(self.graph.full_widths())

    def widths(self, widths: Mapping[str, int] | None = None) -> dict[str, int]:
        """Full widths, overridden by ``widths``; unknown group names raise a KeyError naming them."""
        full = self.graph.full_widths()
        unknown = set(widths or {}) - set(full)
        if unknown:
            raise KeyError(f"unknown channel groups {sorted(unknown)}; known: {list(full)}")
        return {**full, **(widths or {})}

    def macs(self, widths: Mapping[str, int] | None = None) -> int:
        """MACs of conv and linear layers with the given kept widths (others full)."""
        return self.macs_poly(self.widths(widths))

    def params(self, widths: Mapping[str, int] | None = None) -> int:
        """Parameter count with the given kept widths (others full)."""
        return self.params_poly(self.widths(widths))
