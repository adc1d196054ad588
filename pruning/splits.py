"""Split rules: modules whose forward cuts the channel tensor at sizes the module holds.

MixNet's grouped kernels (``torch.split(x, self.splits, 1)``), CSP's partial blocks
(``x.split(self.expand_chs // 2, dim=1)``), Res2Net's hierarchical blocks (``torch.split(out, self.width, 1)``)
and ReXNet's partial residual (``x[:, 0:self.in_channels]``) cut their channels at sizes read from attributes.
torch.fx records those sizes as constants, so the channel graph knows where each cut falls
(:class:`pruning.graph.ChannelCut`), and the pruned module must be told its new sizes: that is a split rule's
one job. A module type is supported by registering one::

    @register_split_rule(MyBlock)
    class MyBlockSplit(SplitRule):
        def resize(self, module, cuts):
            module.split_at = cuts[0][0]

A cut whose sizes come from the tensor's shape (``x.chunk(2, dim=1)``) needs no rule. A module with constant
cuts and no rule is refused when the graph is built, naming the module; protecting it keeps its channels whole.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

from torch import nn

from ._registry import TypeRegistry

if TYPE_CHECKING:
    from .graph import ChannelGraph

RESIZED = "_pruning_resized_cuts"  # marks a module whose cut sizes changed (timm's spec adapter would lose them)


class SplitRule:
    """Tells a module the new sizes of the channel cuts its forward makes."""

    def resize(self, module: nn.Module, cuts: list[tuple[int, ...]]) -> None:
        """Update ``module`` so that its forward cuts at the new sizes.

        Args:
            module: the module whose forward makes the cuts (already holding its pruned layers).
            cuts: for each cut its forward makes, in execution order, the pruned widths of the consecutive parts
                it cuts the channels into: the pieces of a ``split``, or ``(before, selected, after)`` for a
                slice ``x[:, a:b]``.
        """
        raise NotImplementedError


SPLIT_RULES: TypeRegistry[SplitRule] = TypeRegistry("split rule")


def register_split_rule(*module_types: type) -> Callable[[type[SplitRule]], type[SplitRule]]:
    """Class decorator registering a split rule (instantiated once) for ``module_types`` and their subclasses."""
    return SPLIT_RULES.register(*module_types)


def find_split_rule(module: nn.Module) -> SplitRule | None:
    """The split rule registered for ``module``'s type or its nearest registered base class, else None."""
    return SPLIT_RULES.find(module)


def resize_cuts(model: nn.Module, graph: ChannelGraph, widths: Mapping[str, int]) -> None:
    """Give every module whose cuts changed its new sizes (``widths``: group -> pruned width, all groups)."""
    sizes: dict[str, list[tuple[int, ...]]] = {}
    changed = set()
    for cut in graph.cuts:
        new = tuple(sum(widths[g] for g in part) for part in cut.parts)
        full = tuple(sum(graph.groups[g].width for g in part) for part in cut.parts)
        sizes.setdefault(cut.module, []).append(new)
        if new != full:
            changed.add(cut.module)
    modules = dict(model.named_modules())
    for name in sorted(changed & set(modules)):  # a module inside a removed block is gone
        find_split_rule(modules[name]).resize(modules[name], sizes[name])
        setattr(modules[name], RESIZED, True)


def resized_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose channel cuts :func:`resize_cuts` changed."""
    return [name for name, m in model.named_modules() if getattr(m, RESIZED, False)]


def _equal_halves(cut: tuple[int, ...], where: str) -> int:
    if len(cut) != 2 or cut[0] != cut[1]:
        raise ValueError(f"{where} splits its channels in two equal halves; got parts {list(cut)}")
    return cut[0]


def _register_timm() -> None:
    from timm.layers.mixed_conv2d import MixedConv2d
    from timm.models.cspnet import CrossStage, CrossStage3
    from timm.models.res2net import Bottle2neck
    from timm.models.rexnet import LinearBottleneck

    @register_split_rule(MixedConv2d)
    class MixedConvSplit(SplitRule):
        """``torch.split(x, self.splits, 1)``: one conv per part."""

        def resize(self, module: nn.Module, cuts: list[tuple[int, ...]]) -> None:
            module.splits = list(cuts[0])
            module.in_channels = sum(cuts[0])
            module.out_channels = sum(conv.out_channels for conv in module.values())

    @register_split_rule(CrossStage, CrossStage3)
    class CrossStageSplit(SplitRule):
        """``x.split(self.expand_chs // 2, dim=1)``: the graph ties the halves, so they stay equal."""

        def resize(self, module: nn.Module, cuts: list[tuple[int, ...]]) -> None:
            module.expand_chs = 2 * _equal_halves(cuts[0], type(module).__name__)

    @register_split_rule(Bottle2neck)
    class Res2NetSplit(SplitRule):
        """``torch.split(out, self.width, 1)`` into ``scale`` parts, which the graph ties (equal widths)."""

        def resize(self, module: nn.Module, cuts: list[tuple[int, ...]]) -> None:
            module.width = cuts[0][0]

    @register_split_rule(LinearBottleneck)
    class ReXNetSplit(SplitRule):
        """``cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]])``: the first slice is the input's
        width."""

        def resize(self, module: nn.Module, cuts: list[tuple[int, ...]]) -> None:
            _before, module.in_channels, _after = cuts[0]
            module.out_channels = sum(cuts[0])


_register_timm()
