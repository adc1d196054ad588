"""Layer rules: how each layer type maps channels, what it costs, and how it is physically sliced.

Graph discovery, the cost model and physical pruning never special-case layer types; they ask the rule
registered for the module's type. A new layer type is supported by registering one rule::

    @register_rule(MyNorm)
    class MyNormRule(ChannelwiseRule):
        def prune_out(self, module, idx): ...

Lookup walks the module's MRO, so subclasses (timm's ``Conv2dSame``, ``BatchNormAct2d``, ``Linear``)
inherit the rule of their base class. Rules are keyed by module type (:class:`pruning._registry.TypeRegistry`),
block rules (:mod:`pruning.blocks`) and protected layers (:mod:`pruning.protect`) likewise.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ._registry import TypeRegistry
from .errors import UserInputError


class ChannelMap(enum.Enum):
    """How a layer's output channels relate to its input channels."""

    MIX = "mix"  # every output channel reads every input channel (dense conv, linear): a new channel space
    CHANNELWISE = "channelwise"  # output channel i reads input channel i only (norm, depthwise conv, activation)


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer at a fixed spatial size, as a function of its widths.

    For a MIX layer: ``MACs = macs_per_pair * out_width * in_width // groups`` and
    ``params = params_per_pair * out_width * in_width // groups + params_per_out * out_width``.
    For a CHANNELWISE layer ``in_width`` is 1 (its single width is the output width). ``groups`` is a grouped
    conv's: each output channel reads ``in_width / groups`` inputs (exact, since both widths stay multiples).
    """

    macs_per_pair: int = 0
    params_per_pair: int = 0
    params_per_out: int = 0
    groups: int = 1


class UnsupportedLayerError(UserInputError):
    """A layer or operation whose channel semantics are unknown: pruning through it could be silently wrong."""


class LayerRule:
    """Base rule. Subclasses say how a layer maps channels, what it costs, and how it is sliced."""

    def channel_map(self, module: nn.Module) -> ChannelMap:
        return ChannelMap.CHANNELWISE

    def fixes_channels(self, module: nn.Module) -> str | None:
        """Why the channels this layer sees can never be pruned exactly, or None (most layers)."""
        return None

    def channel_dim(self, module: nn.Module) -> int | None:
        """The dim holding the channels this layer reads and writes: 1 (channels first: convs, batch norm), -1
        (the last: ``nn.Linear``, ``nn.LayerNorm``, which also run on channels-last tensors), or None (any dim:
        pointwise activations)."""
        return 1

    def blocks(self, module: nn.Module) -> int:
        """Into how many equal contiguous blocks this layer splits its input and output channels, each block
        keeping as many channels as every other (a grouped conv's groups: pruning keeps the groups)."""
        return 1

    def cost(self, module: nn.Module, output_shape: Sequence[int]) -> LayerCost:
        return LayerCost()

    def prune_out(self, module: nn.Module, idx: torch.Tensor) -> None:
        """Keep only output channels ``idx`` (for CHANNELWISE layers: the channels)."""

    def prune_in(self, module: nn.Module, idx: torch.Tensor) -> None:
        """Keep only input channels ``idx`` (MIX layers only)."""


LAYER_RULES: TypeRegistry[LayerRule] = TypeRegistry("layer rule")


def register_rule(*module_types: type) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator registering a layer rule (instantiated once) for ``module_types`` and their subclasses."""
    return LAYER_RULES.register(*module_types)


def find_rule(module: nn.Module) -> LayerRule | None:
    """The layer rule registered for ``module``'s type or its nearest registered base class, else None."""
    return LAYER_RULES.find(module)


def _replace_param(module: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    old = getattr(module, name)
    if old is None:
        return
    new = old.data.index_select(dim, idx.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)


def is_depthwise(conv: nn.Conv2d) -> bool:
    """True for a depthwise conv with one filter per input channel (no channel multiplier)."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def is_grouped(conv: nn.Conv2d) -> bool:
    """True for a grouped conv that mixes channels within each group (not a plain depthwise one)."""
    return conv.groups > 1 and not is_depthwise(conv)


@register_rule(nn.Conv2d)
class ConvRule(LayerRule):
    """Dense convs mix channels; depthwise convs are channelwise; grouped convs mix within each group.

    A grouped conv keeps its number of groups and prunes the same number of channels in every group, on both
    sides (:meth:`blocks`). Why not remove whole groups: RegNet and ResNeXt have few wide groups (2-8 at
    small widths), so whole groups would be far too coarse a step, while equal counts keep the layer one
    dense grouped kernel with exact MACs, ``k * out * in / groups``.
    """

    def channel_map(self, module: nn.Conv2d) -> ChannelMap:
        return ChannelMap.CHANNELWISE if is_depthwise(module) else ChannelMap.MIX

    def blocks(self, module: nn.Conv2d) -> int:
        return module.groups if is_grouped(module) else 1

    def cost(self, module: nn.Conv2d, output_shape: Sequence[int]) -> LayerCost:
        kernel = math.prod(module.kernel_size)
        spatial = math.prod(output_shape[2:])
        return LayerCost(
            macs_per_pair=spatial * kernel,
            params_per_pair=kernel,
            params_per_out=1 if module.bias is not None else 0,
            groups=self.blocks(module),
        )

    def prune_out(self, module: nn.Conv2d, idx: torch.Tensor) -> None:
        _replace_param(module, "weight", idx, 0)  # a grouped conv's rows are its groups' outputs, in order
        _replace_param(module, "bias", idx, 0)
        if is_depthwise(module):
            module.in_channels = module.groups = len(idx)
        module.out_channels = len(idx)

    def prune_in(self, module: nn.Conv2d, idx: torch.Tensor) -> None:
        if is_grouped(module):
            module.weight = nn.Parameter(_grouped_columns(module.weight.data, idx, module.groups, module.in_channels),
                                         requires_grad=module.weight.requires_grad)
        else:
            _replace_param(module, "weight", idx, 1)
        module.in_channels = len(idx)


def _grouped_columns(weight: torch.Tensor, idx: torch.Tensor, groups: int, in_channels: int) -> torch.Tensor:
    """A grouped conv's weight keeping input channels ``idx`` (the same number in every group): each group's
    rows keep the columns of that group's own kept inputs."""
    per_group = in_channels // groups
    local = idx.to(weight.device).view(groups, -1) - per_group * torch.arange(groups, device=weight.device)[:, None]
    if local.min() < 0 or local.max() >= per_group:
        raise ValueError(f"kept inputs {idx.tolist()} are not the same number in each of the {groups} groups")
    rows = weight.view(groups, weight.shape[0] // groups, per_group, *weight.shape[2:])
    index = local[:, None, :].expand(groups, rows.shape[1], local.shape[1])
    index = index.reshape(*index.shape, *([1] * (weight.dim() - 2))).expand(*index.shape, *weight.shape[2:])
    return rows.gather(2, index).reshape(weight.shape[0], local.shape[1], *weight.shape[2:]).clone()


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    def channel_map(self, module: nn.Linear) -> ChannelMap:
        return ChannelMap.MIX

    def channel_dim(self, module: nn.Linear) -> int:
        return -1

    def cost(self, module: nn.Linear, output_shape: Sequence[int]) -> LayerCost:
        # rows per sample: 1 for a classifier on pooled features; batch dim is excluded by the caller
        rows = math.prod(output_shape[1:-1])
        return LayerCost(macs_per_pair=rows, params_per_pair=1, params_per_out=1 if module.bias is not None else 0)

    def prune_out(self, module: nn.Linear, idx: torch.Tensor) -> None:
        _replace_param(module, "weight", idx, 0)
        _replace_param(module, "bias", idx, 0)
        module.out_features = len(idx)

    def prune_in(self, module: nn.Linear, idx: torch.Tensor) -> None:
        _replace_param(module, "weight", idx, 1)
        module.in_features = len(idx)


@register_rule(nn.modules.batchnorm._BatchNorm)
class BatchNormRule(LayerRule):
    def cost(self, module: nn.modules.batchnorm._BatchNorm, output_shape: Sequence[int]) -> LayerCost:
        return LayerCost(params_per_out=2 if module.affine else 0)

    def prune_out(self, module: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            _replace_param(module, name, idx, 0)
        module.num_features = len(idx)


@register_rule(nn.LayerNorm)
class ChannelNormRule(LayerRule):
    """A norm whose statistics run over the channels: ``nn.LayerNorm`` on channels-last tensors (ConvNeXt's
    ``permute -> LayerNorm -> Linear``), timm's ``LayerNorm2d`` on channels-first ones. Every output channel
    depends on all of them, so removing any changes the kept ones too: the group stays whole (exactness first),
    and the layers around it (ConvNeXt's MLP hidden widths) are pruned."""

    def channel_dim(self, module: nn.LayerNorm) -> int:
        if len(module.normalized_shape) != 1:
            raise UnsupportedLayerError(f"normalises over {len(module.normalized_shape)} dims, not the channels alone")
        return -1

    def fixes_channels(self, module: nn.Module) -> str | None:
        return f"{type(module).__name__} normalises over these channels: removing any would change the others"

    def cost(self, module: nn.Module, output_shape: Sequence[int]) -> LayerCost:
        return LayerCost(params_per_out=2 if module.elementwise_affine else 0)

    def prune_out(self, module: nn.Module, idx: torch.Tensor) -> None:
        for name in ("weight", "bias"):
            _replace_param(module, name, idx, 0)
        module.normalized_shape = (len(idx),)


def _register_channel_norms() -> None:
    from timm.layers import LayerNorm2d

    @register_rule(LayerNorm2d)
    class ChannelsFirstNormRule(ChannelNormRule):
        def channel_dim(self, module: nn.Module) -> int:
            return 1


_register_channel_norms()


def _pointwise_types() -> list[type]:
    """Parameter-free modules that act on each element alone (activations, dropout): any dim may hold channels."""
    import timm.layers as tl
    import timm.layers.activations as ta

    types = [
        nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
        nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Dropout, tl.DropPath,
    ]
    names = ["GELU", "GELUTanh", "HardMish", "HardSigmoid", "HardSwish", "Mish", "QuickGELU", "Sigmoid", "Swish", "Tanh"]
    types += [getattr(ta, n) for n in names if hasattr(ta, n)]
    return types


@register_rule(nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
class ElementwiseRule(LayerRule):
    """Parameter-free, channel-preserving modules (pooling, channel dropout) on channels-first tensors. The graph
    checks that the channel dim keeps its size."""


@register_rule(*_pointwise_types())
class PointwiseRule(ElementwiseRule):
    """Parameter-free modules acting on each element alone: they run on channels-first or channels-last tensors."""

    def channel_dim(self, module: nn.Module) -> None:
        return None


def _check_pool(module: nn.Module) -> None:
    if getattr(module, "pool_type", "avg") in ("catavgmax", "avgmaxc"):
        raise UnsupportedLayerError(f"global pool type {module.pool_type!r} concatenates channels")


def _register_timm_pool() -> None:
    from timm.layers import SelectAdaptivePool2d

    @register_rule(SelectAdaptivePool2d)
    class SelectAdaptivePoolRule(ElementwiseRule):
        def channel_map(self, module: nn.Module) -> ChannelMap:
            _check_pool(module)
            return ChannelMap.CHANNELWISE


_register_timm_pool()
