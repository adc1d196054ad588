"""One fx node rebuilt in isolation at given widths of its channel groups, as a measurement job.

A function or method node becomes a module (:class:`_Call`) whose tensor arguments are slots; a module node is a
pruned copy of its module. :class:`_Planner` turns every node at every grid point into a job key, so that nodes of
one shape are measured once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..graph import ChannelGraph, NodeUse, trace
from ..layers import ChannelMap, find_rule


@dataclass(frozen=True)
class _Slot:
    """The place of the ``index``-th tensor input in a node's arguments."""

    index: int


class _Call(nn.Module):
    """A function or method node as a module: ``forward(*tensors)`` rebuilds the node's arguments.

    The node's graph references are replaced by :class:`_Slot` markers, so the module holds no fx objects
    (it can be copied and exported).
    """

    def __init__(self, node: fx.Node, tensor_args: Sequence[fx.Node]) -> None:
        super().__init__()
        slots = {a: _Slot(i) for i, a in enumerate(tensor_args)}
        self.op, self.target = node.op, node.target
        self.args_ = fx.node.map_arg(node.args, slots.__getitem__)
        self.kwargs_ = fx.node.map_arg(node.kwargs, slots.__getitem__)

    def forward(self, *tensors: torch.Tensor) -> Any:
        fill = lambda a: tensors[a.index] if isinstance(a, _Slot) else a  # noqa: E731
        args = fx.node.map_aggregate(self.args_, fill)
        kwargs = fx.node.map_aggregate(self.kwargs_, fill)
        if self.op == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


@dataclass
class _Job:
    """One distinct measurement: build ``module`` and ``inputs`` on demand."""

    key: str
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]


def _resize(shape: Sequence[int], batch: int, width: int | None) -> tuple[int, ...]:
    out = [batch, *shape[1:]]
    if width is not None and len(out) >= 2:
        out[1] = width
    return tuple(out)


def _pruned_module(module: nn.Module, out_w: int | None, in_w: int | None) -> nn.Module:
    """A copy of ``module`` keeping its first ``out_w`` output and ``in_w`` input channels (None: all)."""
    from ..solve import first_channels

    m = copy.deepcopy(module)
    rule = find_rule(m)
    if rule is None:
        return m
    blocks = rule.blocks(m)  # a grouped conv keeps the same number of channels in each group

    def first(w: int, side: str) -> torch.Tensor:  # the width of a grouped conv's side: read only for one
        return torch.tensor(first_channels(getattr(m, side), w, blocks), dtype=torch.long) if blocks > 1 else torch.arange(w)

    if rule.channel_map(m) is ChannelMap.MIX:
        if out_w is not None:
            rule.prune_out(m, first(out_w, "out_channels"))
        if in_w is not None:
            rule.prune_in(m, first(in_w, "in_channels"))
    elif out_w is not None and any(True for _ in m.parameters()):
        rule.prune_out(m, torch.arange(out_w))
    return m


class _Planner:
    """Turns each node at each grid point into a measurement key; identical keys are measured once."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, grids: Mapping[str, tuple[int, ...]], batch: int,
                 dtype: torch.dtype, device: str) -> None:
        self.gm = trace(model)
        self.fx_nodes = {n.name: n for n in self.gm.graph.nodes}
        self.modules = dict(model.named_modules())
        self.graph, self.grids, self.batch, self.dtype, self.device = graph, grids, batch, dtype, device
        self.jobs: dict[str, _Job] = {}

    def plan(self, use: NodeUse) -> tuple[tuple[str, ...], np.ndarray]:
        """The node's varying groups and, per grid point, its measurement key (an object array)."""
        varying = tuple(g for g in use.groups if g in self.grids)
        axes = [self.grids[g] for g in varying]
        keys = np.empty([len(a) for a in axes], dtype=object)
        for index in np.ndindex(*keys.shape):
            widths = {g: axes[k][i] for k, (g, i) in enumerate(zip(varying, index))}
            keys[index] = self._job(use, widths)
        return varying, keys

    def _width(self, group: str, widths: Mapping[str, int]) -> int | None:
        w = widths.get(group)
        return None if w is None or w == self.graph.groups[group].width else w

    def _job(self, use: NodeUse, widths: Mapping[str, int]) -> str:
        node = self.fx_nodes[use.name]
        shapes = []
        for group, shape in zip(use.in_groups, use.input_shapes):
            w = self._width(group, widths) if len(shape) >= 2 and shape[1] == self.graph.groups[group].width else None
            shapes.append(_resize(shape, self.batch, w))
        out_w, in_w = self._width(use.out_group, widths), None
        if use.op == "call_module":
            module = self.modules[use.target]
            in_w = self._width(use.in_groups[0], widths) if use.in_groups else None
            signature = f"{type(module).__module__}.{type(module).__qualname__}:{module!r}:out={out_w}:in={in_w}"
        else:
            others = [a.name for a in _flat_nodes(node.args) + _flat_nodes(node.kwargs) if a.name not in use.inputs]
            if others:
                raise ValueError(f"node {use.name!r} ({use.target}) takes values computed elsewhere in the graph "
                                 f"({others}); it cannot be timed in isolation")
            signature = f"{use.op}:{use.target}:{_arg_repr(node.args)}:{_arg_repr(node.kwargs)}"
        key = f"{signature}|{shapes}|{self.dtype}"
        if key not in self.jobs:
            self.jobs[key] = _Job(key, self._builder(use, node, shapes, out_w, in_w))
        return key

    def _builder(self, use: NodeUse, node: fx.Node, shapes: list[tuple[int, ...]], out_w: int | None,
                 in_w: int | None) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
            inputs = _random_inputs(shapes, self.device, self.dtype)
            if use.op == "call_module":
                module = _pruned_module(self.modules[use.target], out_w, in_w)
            else:
                module = _Call(node, [self.fx_nodes[name] for name in use.inputs])
            return module.to(self.device, self.dtype).eval(), inputs

        return build


def _random_inputs(shapes: Sequence[Sequence[int]], device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Seeded random tensors of ``shapes``, drawn on ``device`` itself.

    For a GPU table, drawing on the CPU and copying would cost more than the timing: a batch-64 input of an
    early EfficientNet layer (77M values) takes 0.3 s to draw on a 2-core CPU, per shape and pass.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(tuple(s), generator=gen, device=device).to(dtype) for s in shapes)


def _flat_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, out.append)
    return out


def _arg_repr(args: Any) -> str:
    return repr(fx.node.map_arg(args, lambda n: "T"))
