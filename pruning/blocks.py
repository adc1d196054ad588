"""Whole-block removal: residual blocks whose branch can lose every inner channel.

A residual block computes ``post_add(x + branch(x))``. When every channel group that lives wholly inside the
branch keeps width 0, the branch's last conv has no input left, so in eval mode the branch outputs a constant
per channel: the shift of its last batch norm applied to the last conv's bias (zero when it has none),
``bn.bias + bn.weight * (conv_bias - bn.running_mean) / sqrt(bn.running_var + bn.eps)``. The block then
reduces to ``post_add(x + bias)`` and is replaced by a tiny module (or folded away entirely, see
:func:`remove_blocks`).

Which block types can be removed is a registry, in the style of :mod:`pruning.layers`::

    @register_block(MyBlock)
    class MyBlockRule(BlockRule):
        entry, exit, norm, post_add = "conv_a", "conv_b", "bn_b", "act"
        def removable(self, block): return block.shortcut is None
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .graph import ChannelGraph
from ._registry import TypeRegistry
from .layers import ChannelMap, ElementwiseRule, LayerCost, LayerRule, UnsupportedLayerError, find_rule, register_rule


@dataclass(frozen=True)
class ResidualBlock:
    """A block that can be removed whole.

    Attributes:
        module: qualified module name of the block, e.g. ``blocks.2.1`` or ``layer2.1``.
        inner: the prunable channel groups that live wholly inside the block's residual branch, the group
            produced first first. Removing the block means every one of them keeps width 0.
        stream: the residual stream group (the block's input and output channels).
    """

    module: str
    inner: tuple[str, ...]
    stream: str


# ----------------------------------------------------------------------------------------- block rules


class BlockRule:
    """How one residual block type is laid out. Attribute names are relative to the block.

    Attributes:
        entry: the first conv of the branch (reads the residual stream).
        exit: the last conv of the branch (writes the residual stream's width).
        norm: the batch norm right after ``exit``; nothing but identities (in eval) may follow it in the branch.
        post_add: the module applied after the residual add, or None when the block returns the sum.
    """

    entry: str = ""
    exit: str = ""
    norm: str = ""
    post_add: str | None = None

    def removable(self, block: nn.Module) -> bool:
        """True when ``block`` has an identity skip, so its branch alone can disappear."""
        return False

    def output_bias(self, block: nn.Module) -> torch.Tensor | None:
        """A parameter that a constant added to the block's *output* can be folded into exactly, else None.

        That holds when the block returns ``bn(...)`` or ``skip + bn(...)`` with nothing after the batch norm's
        affine shift: then ``out + b == skip + bn'(...)`` with ``bn'.bias = bn.bias + b``, in eval and in
        training mode alike (the shift is applied after normalisation).
        """
        if self.post_add is not None:
            return None
        return _foldable_bias(getattr(block, self.norm))


BLOCK_RULES: TypeRegistry[BlockRule] = TypeRegistry("block rule")


def register_block(*module_types: type) -> Callable[[type[BlockRule]], type[BlockRule]]:
    """Class decorator registering a block rule (instantiated once) for ``module_types`` and subclasses."""
    return BLOCK_RULES.register(*module_types)


def find_block_rule(module: nn.Module) -> BlockRule | None:
    """The block rule for ``module``'s type or its nearest registered base class, else None."""
    return BLOCK_RULES.find(module)


def _foldable_bias(norm: nn.Module) -> torch.Tensor | None:
    """``norm.bias`` when a constant added after ``norm`` equals one added to that bias, else None."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.bias is None:
        return None
    # timm's BatchNormAct2d applies drop and act after the affine shift; only identities keep folding exact
    for tail in ("drop", "act"):
        if not isinstance(getattr(norm, tail, nn.Identity()), nn.Identity):
            return None
    return norm.bias


def _register_timm_blocks() -> None:
    from timm.models._efficientnet_blocks import InvertedResidual
    from timm.models.resnet import BasicBlock, Bottleneck

    @register_block(InvertedResidual)
    class InvertedResidualRule(BlockRule):
        """EfficientNet / MobileNetV3 / Lite MBConv: ``x + bn3(conv_pwl(...))``, nothing after the add."""

        entry, exit, norm, post_add = "conv_pw", "conv_pwl", "bn3", None

        def removable(self, block: nn.Module) -> bool:
            # has_skip already folds in timm's noskip flag; the getattr guards forks that store it
            return bool(block.has_skip) and not getattr(block, "noskip", False)

    class _ResNetRule(BlockRule):
        def removable(self, block: nn.Module) -> bool:
            # An attention module after the last BN would have to be evaluated on the constant; not supported.
            return block.downsample is None and getattr(block, "se", None) is None

    @register_block(BasicBlock)
    class BasicBlockRule(_ResNetRule):
        """ResNet-18/34: ``act2(x + bn2(conv2(...)))``."""

        entry, exit, norm, post_add = "conv1", "conv2", "bn2", "act2"

    @register_block(Bottleneck)
    class BottleneckRule(_ResNetRule):
        """ResNet-50 and deeper: ``act3(x + bn3(conv3(...)))``."""

        entry, exit, norm, post_add = "conv1", "conv3", "bn3", "act3"


_register_timm_blocks()


# ------------------------------------------------------------------------------------ finding blocks


def _inside(module: str, block: str) -> bool:
    return module.startswith(block + ".")


def removable_blocks(model: nn.Module, graph: ChannelGraph) -> list[ResidualBlock]:
    """Blocks of ``model`` that can be removed whole, in execution order.

    A block is reported when its rule says it is removable, every channel group living wholly inside it is
    prunable in ``graph`` (so protected blocks stay), those groups include the last conv's input (so zeroing
    them leaves the branch constant), and the branch reads and writes one and the same group.

    Args:
        model: the model ``graph`` was built from.
        graph: its channel graph.
    """
    order = {u.module: i for i, u in enumerate(graph.layers)}  # execution order of the layers
    counts = Counter(u.module for u in graph.layers)
    uses = {u.module: u for u in graph.layers if counts[u.module] == 1}  # not layers on concatenated channels
    found: list[tuple[int, ResidualBlock]] = []
    for name, module in model.named_modules():
        rule = find_block_rule(module)
        if rule is None or not rule.removable(module):
            continue
        entry, exit_ = uses.get(f"{name}.{rule.entry}"), uses.get(f"{name}.{rule.exit}")
        if entry is None or exit_ is None or entry.in_group != exit_.out_group:
            continue  # not traced as laid out, or the skip does not tie the block's input to its output
        inner = tuple(
            g.name for g in graph.groups.values() if g.members and all(_inside(m.module, name) for m in g.members)
        )
        # the last conv must read only inner channels, or zeroing them would not make the branch constant
        if exit_.in_group not in inner or not all(graph.groups[g].prunable for g in inner):
            continue
        found.append((order[entry.module], ResidualBlock(name, inner, exit_.out_group)))
    return [b for _, b in sorted(found, key=lambda t: t[0])]


def blocks_to_remove(blocks: Iterable[ResidualBlock], keep: dict[str, Sequence[int]]) -> list[ResidualBlock]:
    """The blocks whose inner groups all keep width 0 in ``keep``.

    Raises:
        ValueError: a block with some inner groups empty and others not (or not named, i.e. kept whole),
            naming the block and the groups.
    """
    removed = []
    for block in blocks:
        empty = [g for g in block.inner if g in keep and len(keep[g]) == 0]
        if not empty:
            continue
        rest = [g for g in block.inner if g not in empty]
        if rest:
            raise ValueError(
                f"block {block.module!r}: groups {empty} keep width 0 but {rest} do not; a block is removed only "
                f"when all its inner groups {list(block.inner)} keep width 0"
            )
        removed.append(block)
    return removed


# ------------------------------------------------------------------------------------ removed blocks


class RemovedBlock(nn.Identity):
    """A residual block removed whole; its constant branch output was folded into the preceding layer."""

    removed_block = True


class RemovedBlockBias(nn.Module):
    """A residual block removed whole: ``post_add(x + bias)``, ``bias`` the branch's constant output.

    ``bias`` is a parameter, not a buffer: graph discovery records only modules with parameters as layers, so
    a parameter keeps it sliced when the pruned model is pruned again and counted in its params; it also stays
    trainable, as the last BN's shift it replaces was.
    """

    removed_block = True

    def __init__(self, bias: torch.Tensor, post_add: nn.Module | None = None) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.post_add = post_add if post_add is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NCHW only (the blocks are conv blocks); a fixed view keeps the module traceable without a leaf rule
        return self.post_add(x + self.bias.view(1, -1, 1, 1))


@register_rule(RemovedBlockBias)
class RemovedBlockBiasRule(LayerRule):
    """Channelwise on the residual stream, one parameter per channel; sliced with the stream."""

    def channel_map(self, module: RemovedBlockBias) -> ChannelMap:
        rule = find_rule(module.post_add)
        if not isinstance(rule, ElementwiseRule) or any(True for _ in module.post_add.parameters()):
            raise UnsupportedLayerError(f"post-add module {type(module.post_add).__name__} is not elementwise")
        return ChannelMap.CHANNELWISE

    def cost(self, module: RemovedBlockBias, output_shape: Sequence[int]) -> LayerCost:
        return LayerCost(params_per_out=1)

    def prune_out(self, module: RemovedBlockBias, idx: torch.Tensor) -> None:
        module.bias = nn.Parameter(module.bias.data.index_select(0, idx.to(module.bias.device)).clone(),
                                   requires_grad=module.bias.requires_grad)


def removed_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the blocks of ``model`` that were removed by :func:`remove_blocks`."""
    return [name for name, m in model.named_modules() if getattr(m, "removed_block", False)]


def branch_constant(block: nn.Module, rule: BlockRule) -> torch.Tensor:
    """The eval-mode output of ``block``'s branch once its last conv has no input channels left."""
    conv, norm = getattr(block, rule.exit), getattr(block, rule.norm)
    width = conv.weight.shape[0]
    x = conv.bias.detach() if conv.bias is not None else conv.weight.new_zeros(width)
    was_training = norm.training
    norm.eval()  # running statistics, as in the masked model at eval; BatchNormAct's act/drop apply too
    try:
        with torch.no_grad():
            return norm(x.view(1, width, 1, 1)).flatten()
    finally:
        norm.train(was_training)


def _previous(model: nn.Module, name: str) -> str | None:
    """The module whose output is the input of module ``name``, where ``nn.Sequential`` chaining makes it certain.

    Walks to the previous sibling (or up to the parent's previous sibling when ``name`` comes first) and
    descends into the last child of non-empty Sequentials. None when the input comes from anything but a plain
    Sequential chain (e.g. the model's own forward, the stem).
    """
    if not name:
        return None  # the model itself
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        return None
    keys = list(parent._modules)
    i = keys.index(child)
    if i == 0:
        return _previous(model, parent_name) if parent_name else None
    prev = f"{parent_name}.{keys[i - 1]}" if parent_name else keys[i - 1]
    module = model.get_submodule(prev)
    while isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward and len(module):
        last = list(module._modules)[-1]
        prev, module = f"{prev}.{last}", module[-1]
    return prev


def _fold_target(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter that a constant added to module ``name``'s input can be folded into exactly, else None.

    Identities (earlier removed blocks, empty Sequentials) pass their input through unchanged, so the walk
    goes on past them: a chain of removed blocks folds into the last kept producer of the stream.
    """
    current = name
    while (prev := _previous(model, current)) is not None:
        module = model.get_submodule(prev)
        if isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and len(module) == 0):
            current = prev
            continue
        if isinstance(module, RemovedBlockBias):
            return module.bias if isinstance(module.post_add, nn.Identity) else None
        rule = find_block_rule(module)
        return rule.output_bias(module) if rule is not None else None
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def remove_blocks(model: nn.Module, blocks: Sequence[ResidualBlock]) -> None:
    """Replace each block of ``blocks`` in ``model`` (in place) by its constant-branch equivalent.

    A block becomes ``post_add(x + bias)`` (:class:`RemovedBlockBias`), ``bias`` being
    :func:`branch_constant`. When the block has no post-add module and its input is written by a layer whose
    output is ``bn(...)`` or ``skip + bn(...)`` (the previous inverted residual), ``x + bias`` equals that
    layer's output with ``bias`` added to its BN shift, so the bias is folded there and the block becomes
    :class:`RemovedBlock` (an ``nn.Identity``). Blocks are processed in execution order and replaced at once,
    so a later block of a removed chain walks past the earlier ones (now identities) to the same producer:
    ``x + b1 + b2`` folds into one BN as ``bias + b1 + b2``.

    Args:
        model: the (already channel-sliced) model; changed in place.
        blocks: blocks found by :func:`removable_blocks` on the model's graph, in execution order.
    """
    for block in blocks:
        module = model.get_submodule(block.module)
        rule = find_block_rule(module)
        bias = branch_constant(module, rule)
        post_add = getattr(module, rule.post_add) if rule.post_add is not None else None
        target = _fold_target(model, block.module) if post_add is None else None
        if target is not None and target.shape == bias.shape:
            with torch.no_grad():
                target.add_(bias.to(target))
            _set_submodule(model, block.module, RemovedBlock())
        else:
            _set_submodule(model, block.module, RemovedBlockBias(bias, post_add))
