"""Channel groups discovered from the model's graph (torch.fx), not written by hand per architecture.

A *channel group* is a set of channels that must be kept or removed together: every tensor whose channel
dimension is tied to another's (residual adds, a depthwise conv and its producer, an SE gate multiplying
the expansion channels) falls into one group. Each group lists its *members*, the layers that must be
sliced when the group shrinks:

* ``out``: a channel-mixing layer (dense conv, linear) that produces the group's channels,
* ``in``: a channel-mixing layer that consumes them,
* ``channel``: a channelwise layer with per-channel parameters (batch norm, depthwise conv).

A concatenation along the channel dim (``torch.cat``: DenseNet, GhostNet) holds several groups side by side; a
layer on it is a member of each, with the group's ``offset`` inside the layer, and its cost is one term per pair
of groups.

Every layer's MACs are ``coefficient * out_width * in_width`` (``* width`` for channelwise layers), so the
model's MACs are an exact function of the group widths; :mod:`pruning.cost` evaluates it.
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .errors import UserInputError
from .layers import ChannelMap, LayerCost, UnsupportedLayerError, find_rule

INPUT_GROUP = "input"


@dataclass(frozen=True)
class Member:
    """One layer slice of a group: ``role`` is ``out``, ``in`` or ``channel`` (see module docstring).

    ``offset`` is where the group's channels start inside that side of the layer (non-zero when the layer reads
    or writes a concatenation of several groups: DenseNet's convs reading the concatenated features).
    """

    module: str
    role: str
    offset: int = 0


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together.

    Attributes:
        name: the first layer producing the group's channels (``input`` for the image channels).
        width: number of channels in the unpruned model.
        members: layers sliced when the group shrinks, in execution order.
        prunable: False when the group touches the model's input or output, or is protected.
        reason: why the group is not prunable (empty when it is).
        blocks: the channels form this many equal contiguous blocks, each keeping as many channels as every
            other (a grouped conv's groups); kept widths are multiples of it.
    """

    name: str
    width: int
    members: list[Member] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""
    blocks: int = 1


@dataclass(frozen=True)
class LayerUse:
    """A layer with parameters, the groups of its output and input channels, and its cost coefficients."""

    module: str
    channel_map: ChannelMap
    out_group: str
    in_group: str | None  # None for channelwise layers
    cost: LayerCost


@dataclass(frozen=True)
class NodeUse:
    """One fx node that does work (a module call, a function or a method on tensors), with its groups.

    Attributes:
        name: the fx node's name (stable across traces of the same model).
        op: ``call_module``, ``call_function`` or ``call_method``.
        target: the module's qualified name, or the function's or method's name.
        module_scope: the innermost module the node runs in (the module itself for ``call_module``).
        out_group: the channel group of the output.
        in_groups: the channel group of each tensor input, in argument order.
        input_shapes: the unpruned shape of each tensor input (batch 1).
        output_shape: the unpruned output shape (batch 1).
        inputs: the fx names of the tensor inputs, in argument order.
        segmented: True when a tensor of the node holds several groups side by side (a concatenation); its
            ``in_groups`` then list every segment's group, flattened (so they no longer match ``inputs``).
        channels_last: True when a tensor of the node holds its channels on a dim other than 1 (after a permute).
    """

    name: str
    op: str
    target: str
    module_scope: str
    out_group: str
    in_groups: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    inputs: tuple[str, ...] = ()
    segmented: bool = False
    channels_last: bool = False

    @property
    def groups(self) -> tuple[str, ...]:
        """Every group the node's work depends on: the output's, then the inputs' (no repeats)."""
        return tuple(dict.fromkeys((self.out_group, *self.in_groups)))


@dataclass(frozen=True)
class ChannelCut:
    """A channel split or slice whose sizes its module holds (:mod:`pruning.splits` resizes it after pruning).

    Attributes:
        module: the module whose forward makes the cut (its split rule is told the new sizes).
        node: the fx node of the cut.
        parts: the consecutive parts the channels are cut into, each as the groups it holds in channel order
            (a slice ``x[:, a:b]`` has three parts: before, selected, after; an empty part holds none).
    """

    module: str
    node: str
    parts: tuple[tuple[str, ...], ...]


@dataclass
class ChannelGraph:
    """Groups and layers of one model at one input size; ``groups`` is in execution order.

    ``nodes`` lists every fx node that does work, in execution order (empty when built by hand). ``cuts`` lists
    the channel splits and slices whose sizes a module holds.
    """

    model_name: str
    input_size: tuple[int, int, int]
    groups: dict[str, ChannelGroup]
    layers: list[LayerUse]
    protected_patterns: tuple[str, ...]
    nodes: list[NodeUse] = field(default_factory=list)
    cuts: list[ChannelCut] = field(default_factory=list)

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.prunable]

    def full_widths(self) -> dict[str, int]:
        return {name: g.width for name, g in self.groups.items()}


# ---------------------------------------------------------------------------------------------- tracing


class _LeafTracer(fx.Tracer):
    """Stops at layers that have a rule (and at timm's no-trace modules), so every call_module is a layer."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from timm.layers import _fx as timm_fx

        if find_rule(m) is not None or timm_fx.is_notrace_module(type(m)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with layers as leaves."""
    from timm.layers import _fx as timm_fx

    tracer = _LeafTracer(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types; all mean "dynamic control flow we cannot follow"
        raise UnsupportedLayerError(
            f"torch.fx could not trace {type(model).__name__}: {e}. Channel groups are derived from the fx "
            "graph; models with data-dependent control flow are not supported."
        ) from e
    return fx.GraphModule(model, graph)


# --------------------------------------------------------------------------------- channel union-find


class _Classes:
    """Union-find over channel spaces. Each class has a width and a number of equal blocks (grouped convs);
    unions require equal widths and take the finer blocks.

    A class may be *segmented*: its channels are, in order, those of other classes (its ``parts``), as for a
    concatenation, or for a class tied to one. :meth:`leaves` gives the unsegmented classes a class is made of;
    channel groups are the leaves. Tying two classes ties their leaves one by one, first splitting leaves so
    that both sides have the same segment boundaries (an SE gate or a shortcut conv added to a concatenation).
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.width: list[int] = []
        self.blocks: list[int] = []
        self.parts: dict[int, list[int]] = {}  # segmented root -> its parts, in channel order

    def new(self, width: int) -> int:
        self.parent.append(len(self.parent))
        self.width.append(width)
        self.blocks.append(1)
        return len(self.parent) - 1

    def concat(self, parts: Sequence[int]) -> int:
        """A new class made of ``parts``' channels, in order."""
        c = self.new(sum(self.width[self.find(p)] for p in parts))
        self.parts[c] = list(parts)
        return c

    def leaves(self, c: int) -> list[int]:
        """The unsegmented root classes ``c`` is made of, in channel order (``[root of c]`` when unsegmented)."""
        r = self.find(c)
        if r not in self.parts:
            return [r]
        return [leaf for p in self.parts[r] for leaf in self.leaves(p)]

    def segments(self, c: int) -> list[tuple[int, int]]:
        """``(leaf, offset)`` for each leaf of ``c``."""
        out, offset = [], 0
        for leaf in self.leaves(c):
            out.append((leaf, offset))
            offset += self.width[leaf]
        return out

    def _split(self, leaf: int, widths: Sequence[int], where: str) -> None:
        if self.blocks[leaf] > 1:
            raise UnsupportedLayerError(f"{where}: splits channels that feed a grouped conv; not supported")
        self.parts[leaf] = [self.new(w) for w in widths]

    def _cut_leaves(self, c: int, cuts: set[int], where: str) -> None:
        """Split ``c``'s leaves so that every offset in ``cuts`` falls on a boundary between leaves. A leaf may
        appear twice in ``c`` (tied parts), so the segments are read again after each split."""
        while True:
            for leaf, offset in self.segments(c):
                end = offset + self.width[leaf]
                inner = sorted(x - offset for x in cuts | {end} if offset < x <= end)
                if len(inner) > 1:
                    self._split(leaf, [hi - lo for lo, hi in zip([0, *inner], inner)], where)
                    break
            else:
                return

    def cut(self, c: int, widths: Sequence[int], where: str) -> list[int | None]:
        """Cut class ``c`` into consecutive parts of ``widths`` channels (a channel split or slice); returns each
        part's class (None for an empty part). A part spanning several leaves is a segmented class of them."""
        bounds = [sum(widths[:k]) for k in range(len(widths) + 1)]
        self._cut_leaves(c, set(bounds[1:-1]), where)
        segments = self.segments(c)
        parts: list[int | None] = []
        for lo, hi in zip(bounds, bounds[1:]):
            inside = [leaf for leaf, offset in segments if lo <= offset < hi]
            parts.append(None if lo == hi else inside[0] if len(inside) == 1 else self.concat(inside))
        return parts

    def split_into(self, c: int, blocks: int, where: str) -> None:
        """Require class ``c`` to keep the same number of channels in each of ``blocks`` equal blocks."""
        if blocks > 1 and len(self.leaves(c)) > 1:
            raise UnsupportedLayerError(f"{where}: a grouped conv on concatenated channels is not supported")
        r = self.find(c)
        self.blocks[r] = math.lcm(self.blocks[r], blocks)
        if self.width[r] % self.blocks[r]:
            raise UnsupportedLayerError(f"{where}: {self.width[r]} channels do not split into {self.blocks[r]} "
                                        "equal groups")

    def find(self, c: int) -> int:
        while self.parent[c] != c:
            self.parent[c] = self.parent[self.parent[c]]
            c = self.parent[c]
        return c

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if self.width[ra] != self.width[rb]:
            raise UnsupportedLayerError(f"{where}: ties channel spaces of widths {self.width[ra]} and {self.width[rb]}")
        if ra in self.parts or rb in self.parts:  # tie segment by segment, on common boundaries
            cuts = {o for c in (ra, rb) for _, o in self.segments(c)}
            for c in (ra, rb):
                self._cut_leaves(c, cuts, where)
            for x, y in zip(self.leaves(ra), self.leaves(rb)):
                self.union(x, y, where)
            return ra
        self.parent[max(ra, rb)] = min(ra, rb)  # the earlier class stays root: names follow execution order
        self.split_into(min(ra, rb), self.blocks[max(ra, rb)], where)
        return min(ra, rb)


# ------------------------------------------------------------------------------ function-level op rules

_UNARY = {
    torch.sigmoid, torch.relu, torch.tanh, F.relu, F.relu6, F.silu, F.gelu, F.hardsigmoid, F.hardswish, F.mish,
    F.sigmoid, F.tanh, F.dropout, F.leaky_relu, F.elu, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    F.avg_pool2d, F.max_pool2d, torch.clone,
}
_UNARY_METHODS = {
    "sigmoid", "sigmoid_", "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "to", "type_as",
}
_BINARY = {
    operator.add, operator.mul, operator.sub, operator.truediv, operator.iadd, operator.imul, operator.isub,
    operator.itruediv, torch.add, torch.mul, torch.sub, torch.div,
}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
_REDUCE = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_SPLITS = {torch.split: "split", torch.chunk: "chunk"}
_POOLS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d}
# ops that act on each element (with the pointwise unary functions), so any dim may hold the channels
_CHANNELS_LAST = _BINARY | {torch.permute}
_CHANNELS_LAST_METHODS = _UNARY_METHODS | _BINARY_METHODS | {"permute"}
_RESHAPE = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}


def _timm_unary() -> set:
    import timm.layers.activations as ta

    names = ["swish", "sigmoid", "tanh", "hard_sigmoid", "hard_swish", "mish", "hard_mish", "gelu", "gelu_tanh"]
    return {getattr(ta, n) for n in names if hasattr(ta, n)}


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _returns_several_tensors(node: fx.Node) -> bool:
    """True when ``node`` returns a tuple/list/dict holding tensors rather than one tensor.

    ShapeProp stores one :class:`TensorMetadata` for a tensor, a container of them for several, and nothing
    for values without tensors (ints, ``torch.Size``): shape queries are therefore not counted.
    """
    meta = node.meta.get("tensor_meta")
    return meta is not None and not isinstance(meta, TensorMetadata)


def _scope(node: fx.Node) -> str:
    """The innermost module ``node`` runs in ("" at the top level)."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()), ("", None))[0] if stack else ""


def _where(node: fx.Node) -> str:
    scope = _scope(node)
    target = getattr(node.target, "__name__", node.target)
    return f"operation {target!r} (node {node.name!r}{', in module ' + repr(scope) if scope else ''})"


class _Discovery:
    """One pass over the fx graph: assigns a channel class to every tensor and records layers."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, protected: Sequence[str] = ()) -> None:
        self.gm = gm
        self.protected = tuple(protected)
        self.opaque_tuples: set[fx.Node] = set()
        self.modules = dict(model.named_modules())  # the traced copy holds plain containers above its leaves
        self.classes = _Classes()
        self.chan: dict[fx.Node, int] = {}
        self.layers: list[tuple[str, ChannelMap, int, int | None, LayerCost]] = []
        self.fixed: dict[int, str] = {}
        self.seen_modules: set[str] = set()
        self.unary = _UNARY | _timm_unary()
        self.vectors: set[fx.Node] = set()  # per-channel parameters used directly
        self.sources: dict[int, str] = {}  # classes born outside a layer (parameters, opaque ops) -> their name
        self.pieces: dict[fx.Node, list[int]] = {}  # a split node -> the class of each tensor it returns
        self.cdims: dict[fx.Node, int] = {}  # tensors whose channels are not on dim 1 (channels last) -> their dim
        self.cuts: list[tuple[str, str, list[int | None]]] = []  # (module, node, part classes) with held sizes

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self._visit(node)
            except UnsupportedLayerError:
                if not self._opaque(node):
                    raise

    def _visit(self, node: fx.Node) -> None:
        if node.op in ("call_module", "call_function", "call_method"):
            if any(a in self.opaque_tuples for a in _flatten_nodes((node.args, node.kwargs))):
                raise UnsupportedLayerError(f"{_where(node)} reads a piece of an unmodelled operation's output")
            self._check_operands(node)
            self._check_channels_last(node)
            if _returns_several_tensors(node) and self._channel_inputs(node):
                self._on_channel_split(node)
                return
        getattr(self, f"_on_{node.op}")(node)

    def cdim(self, node: fx.Node) -> int:
        """The dim holding ``node``'s channels (1 unless a permute moved them)."""
        return self.cdims.get(node, 1)

    def _set_cdim(self, node: fx.Node, dim: int) -> None:
        rank = len(_shape(node))
        if dim % rank != 1:
            self.cdims[node] = dim % rank

    def _check_channels_last(self, node: fx.Node) -> None:
        """On a channels-last tensor (after ``permute``) only permute, pointwise and elementwise ops, and layers
        whose rule reads the last dim (``nn.Linear``, ``nn.LayerNorm``) are modelled: the others assume dim 1."""
        moved = [a for a in self._channel_inputs(node) if self.cdim(a) != 1]
        if not moved:
            return
        if node.op == "call_module":
            rule = find_rule(self.modules[node.target])
            try:
                ok = rule is not None and rule.channel_dim(self.modules[node.target]) != 1
            except UnsupportedLayerError:
                ok = True  # _on_call_module refuses it, naming the module
        else:
            ok = (node.target in _CHANNELS_LAST_METHODS if node.op == "call_method"
                  else node.target in _CHANNELS_LAST or node.target in self.unary - _POOLS)
        if not ok:
            raise UnsupportedLayerError(
                f"{_where(node)} runs on a channels-last tensor (channels on dim {self.cdim(moved[0])}); there only "
                "permute, pointwise activations, elementwise arithmetic and layers reading the last dim (Linear, "
                "LayerNorm) are modelled")

    def _opaque(self, node: fx.Node) -> bool:
        """An operation discovery does not model, inside a protected module: its inputs and outputs keep every
        channel (fixed groups), so pruning elsewhere stays exact. False (refuse) outside protected modules, and
        for a layer without a rule that holds convs or linears (its MACs would go uncounted)."""
        pattern = is_protected(_scope(node), self.protected) if node.op.startswith("call_") else None
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if pattern is None or (module is not None and any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())):
            return False
        reason = f"used by {_where(node)}, which pruning does not model, inside protected {pattern!r}"
        for arg in self._channel_inputs(node):
            self.fixed.setdefault(self.chan[arg], reason)
        shape = _shape(node)
        if _returns_several_tensors(node):
            self.opaque_tuples.add(node)
        elif shape is not None and len(shape) >= 2:
            self.chan[node] = self.classes.new(shape[1])
            self.fixed[self.chan[node]] = reason
            self.sources[self.chan[node]] = f"{_scope(node)}:{node.name}"
        return True

    # -- guards: every tensor that carries channels must be modelled, or discovery stops
    def _on_channel_split(self, node: fx.Node) -> None:
        """A node that turns a channel tensor into several: ``split`` and ``chunk`` are modelled (each piece is a
        part of the input's channels, or all of them for a split along another dim); anything else (unbind, a
        tuple-returning layer) would leave its outputs without channels, so it is refused."""
        where = _where(node)
        kind = node.target if node.op == "call_method" else _SPLITS.get(node.target)
        src = node.args[0] if node.args else None
        if kind not in ("split", "chunk") or src not in self.chan:
            raise UnsupportedLayerError(
                f"{where} turns the channel tensor into several outputs, which is not modelled (split and chunk "
                "are); protect the module it runs in (model.protected=[...]) to keep its channels whole")
        rank, widths = len(_shape(src)), [m.shape[1] for m in node.meta["tensor_meta"]]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim % rank != 1:  # a split along the spatial dims: every piece keeps every channel
            self.pieces[node] = [self.chan[src]] * len(widths)
            return
        sizes = node.args[1] if len(node.args) > 1 else next(
            (node.kwargs[k] for k in ("split_size_or_sections", "split_size", "chunks") if k in node.kwargs), None)
        if _flatten_nodes(sizes) or 0 in widths:
            raise UnsupportedLayerError(f"{where} splits the channels into {widths} at sizes computed in the forward "
                                        "pass (or empty pieces); only constant sizes are supported")
        parts = self.classes.cut(self.chan[src], widths, where)
        if kind == "chunk" or isinstance(sizes, int):  # the sizes follow the first piece's: keep them equal
            self._tie_equal(parts, widths, where)
        if kind == "split":  # the sizes are constants: the module must be told the new ones
            self._record_cut(node, parts, where)
        self.pieces[node] = parts

    def _tie_equal(self, parts: list[int], widths: list[int], where: str) -> None:
        if len(set(widths)) > 1:
            raise UnsupportedLayerError(f"{where} cuts {sum(widths)} channels into unequal pieces {widths}, whose "
                                        "sizes cannot stay consistent once pruned")
        for p in parts[1:]:
            self.classes.union(parts[0], p, where)

    def _record_cut(self, node: fx.Node, parts: list[int | None], where: str) -> None:
        """A cut at sizes held by the module it runs in: that module needs a split rule to be told new ones."""
        from .splits import find_split_rule

        scope = _scope(node)
        module = self.modules[scope]
        if find_split_rule(module) is None:
            what = f"{type(module).__name__}{'' if scope else ', the model'}"
            raise UnsupportedLayerError(
                f"{where} cuts the channels at sizes held by module {scope!r} ({what}), which must shrink with "
                "them, and no split rule says how that module stores them: register one "
                f"with pruning.splits.register_split_rule, or protect the module (model.protected=[..., {scope!r}]) "
                "to keep its channels whole")
        self.cuts.append((scope, node.name, parts))

    def _check_operands(self, node: fx.Node) -> None:
        """Reject a node that consumes a tensor without a channel class (it came from an unmodelled node).

        Every op rule looks only at operands with a channel class; an unmodelled operand would be skipped and
        its channel tie lost. Scalar-like tensors (one element) scale every channel alike, so they may pass.
        """
        for arg in _flatten_nodes((node.args, node.kwargs)):
            shape = _shape(arg)
            if arg not in self.chan and shape is not None and math.prod(shape) > 1:
                raise UnsupportedLayerError(
                    f"{_where(node)} uses tensor {arg.name!r} of shape {shape}, produced by an operation the "
                    "channel-group discovery does not model; its channels are unknown, so pruning through it "
                    "could silently break the model"
                )

    def _channel_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The node's operands that carry channels (have a channel class), in argument order."""
        return [a for a in _flatten_nodes(node.args) + _flatten_nodes(node.kwargs) if a in self.chan]

    # -- node kinds
    def _on_placeholder(self, node: fx.Node) -> None:
        shape = _shape(node)
        c = self.classes.new(shape[1])
        self.chan[node] = c
        self.fixed[c] = "model input"

    def _on_get_attr(self, node: fx.Node) -> None:
        value = operator.attrgetter(node.target)(self.gm)
        if isinstance(value, torch.Tensor) and sum(d > 1 for d in value.shape) == 1:
            # per-channel values used directly (ConvNeXt's layer scale ``gamma``): the channels they scale are
            # kept whole, since the values are not sliced with them
            c = self.classes.new(max(value.shape))
            self.chan[node] = c
            self.vectors.add(node)
            self.fixed[c] = (f"scaled by parameter {node.target!r}, used directly in the forward pass (a layer rule for "
                             "its module would prune them with it)")
            self.sources[c] = node.target
            return
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            raise UnsupportedLayerError(
                f"tensor {node.target!r} is used directly in the forward pass, outside a layer with a rule; "
                "its channel semantics are unknown. Register a layer rule for the module that owns it."
            )

    def _on_output(self, node: fx.Node) -> None:
        for arg in _flatten_nodes(node.args):
            if arg in self.chan:
                self.fixed[self.chan[arg]] = "model output"

    def _on_call_module(self, node: fx.Node) -> None:
        module = self.modules[node.target]
        rule = find_rule(module)
        if rule is None:
            raise UnsupportedLayerError(
                f"module {node.target!r} of type {type(module).__name__} has no layer rule, so its channel "
                "semantics are unknown; register one with pruning.layers.register_rule"
            )
        src = self._single_input(node, f"module {node.target!r}")
        try:
            cmap, dim = rule.channel_map(module), rule.channel_dim(module)
        except UnsupportedLayerError as e:
            raise UnsupportedLayerError(f"module {node.target!r} ({type(module).__name__}): {e}") from None
        has_params = any(True for _ in module.parameters(recurse=True))
        if has_params and node.target in self.seen_modules:
            raise UnsupportedLayerError(f"module {node.target!r} is called more than once; shared layers are not supported")
        self.seen_modules.add(node.target)
        out_shape = _shape(node)
        if dim is not None and dim % len(out_shape) != self.cdim(src):
            raise UnsupportedLayerError(f"module {node.target!r} ({type(module).__name__}) reads channels on dim {dim}, "
                                        f"but its input {_shape(src)} has them on dim {self.cdim(src)}")
        self._set_cdim(node, self.cdim(src) if dim is None else dim)
        if cmap is ChannelMap.MIX:
            out_c = self.classes.new(out_shape[self.cdim(node)])
            for c in (out_c, self.chan[src]):  # a grouped conv keeps its groups on both sides
                self.classes.split_into(c, rule.blocks(module), f"module {node.target!r}")
            self.layers.append((node.target, cmap, out_c, self.chan[src], rule.cost(module, out_shape)))
            self.chan[node] = out_c
            return
        self._check_channels_kept(src, node, f"module {node.target!r} ({type(module).__name__})")
        self.chan[node] = self.chan[src]
        if reason := rule.fixes_channels(module):
            self.fixed.setdefault(self.chan[src], f"{reason} (layer {node.target!r})")
        if has_params:
            self.layers.append((node.target, cmap, self.chan[src], None, rule.cost(module, out_shape)))

    def _on_call_function(self, node: fx.Node) -> None:
        self._on_op(node, node.target, is_method=False)

    def _on_call_method(self, node: fx.Node) -> None:
        self._on_op(node, node.target, is_method=True)

    # -- ops
    def _on_op(self, node: fx.Node, target: Any, is_method: bool) -> None:
        if target is operator.getitem and node.args[0] in self.pieces:  # one piece of a split
            if not isinstance(node.args[1], int):
                raise UnsupportedLayerError(f"{_where(node)} takes {node.args[1]!r} of a split's pieces; index one")
            self.chan[node] = self.pieces[node.args[0]][node.args[1]]
            return
        if target is torch.cat and not is_method:
            return self._concat(node, _where(node))
        tensor_inputs = self._channel_inputs(node)
        if _shape(node) is None or not tensor_inputs:
            return  # shape queries and other non-tensor values carry no channels
        where = _where(node)
        if target in (_BINARY_METHODS if is_method else _BINARY):
            return self._broadcast(node, tensor_inputs, where)
        if target == "permute" if is_method else target is torch.permute:
            return self._permute(node, tensor_inputs, where)
        if target in (_UNARY_METHODS if is_method else self.unary):
            return self._passthrough(node, tensor_inputs, where)
        if target in (_REDUCE_METHODS if is_method else _REDUCE):
            self._check_reduce_dims(node, where)
            return self._passthrough(node, tensor_inputs, where)
        if target is operator.getitem and not is_method:
            return self._slice(node, tensor_inputs, where)
        if target in (_RESHAPE_METHODS if is_method else _RESHAPE):
            if tensor_inputs[0] in self.vectors:
                return self._vector_to_channels(node, tensor_inputs[0], where)
            self._check_reshape(node, tensor_inputs[0], where)
            return self._passthrough(node, tensor_inputs, where)
        raise UnsupportedLayerError(
            f"{where} is not known to the channel-group discovery, so pruning through it could silently "
            "break the model. Supported: elementwise activations, add/mul/sub/div with channel broadcasting, "
            "spatial pooling and means, flatten of spatial dims, concatenation, split, chunk and step-1 slices "
            "along the channel dim, and layers with a registered rule. To keep its "
            "channels whole instead, protect the module it runs in (model.protected=[..., 'that.module'])."
        )

    def _permute(self, node: fx.Node, inputs: list[fx.Node], where: str) -> None:
        """``x.permute(0, 2, 3, 1)`` and back: the channels move to another dim (ConvNeXt's channels-last MLP)."""
        dims = node.args[1:] or node.kwargs.get("dims", ())
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        if len(dims) != len(_shape(node)) or not all(isinstance(d, int) for d in dims):
            raise UnsupportedLayerError(f"{where} permutes by {dims!r}; only constant dims are supported")
        dims = [d % len(dims) for d in dims]
        if dims[0] != 0:
            raise UnsupportedLayerError(f"{where} permutes the batch dim ({tuple(dims)}); not supported")
        self.chan[node] = self.chan[inputs[0]]
        self._set_cdim(node, dims.index(self.cdim(inputs[0])))

    def _concat(self, node: fx.Node, where: str) -> None:
        """``torch.cat`` along the channel dim: the output's channels are the inputs' segments, in order. Along
        another dim the inputs' channels are tied (channel i of each is channel i of the output)."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        if isinstance(tensors, fx.Node) and tensors in self.pieces:  # the pieces of a split, put back together
            classes = self.pieces[tensors]
        elif isinstance(tensors, (list, tuple)) and all(isinstance(t, fx.Node) and t in self.chan for t in tensors):
            classes = [self.chan[t] for t in tensors]
        else:
            raise UnsupportedLayerError(f"{where} concatenates tensors whose channels are unknown")
        if rank < 2 or not isinstance(dim, int) or dim % rank == 0:
            raise UnsupportedLayerError(f"{where} concatenates along dim {dim}, the batch; not supported")
        if dim % rank != 1:
            for c in classes[1:]:
                self.classes.union(classes[0], c, where)
            self.chan[node] = classes[0]
            return
        self.chan[node] = self.classes.concat(classes)

    def _slice(self, node: fx.Node, inputs: list[fx.Node], where: str) -> None:
        """``x[...]`` with step-1 slices keeping the batch: channels pass through unchanged, or, for a slice of
        the channels ``x[:, a:b]`` (ReXNet's partial residual), the output is that part of the input's channels,
        cut at sizes its module holds."""
        src, index = node.args[0], node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        whole = all(i is Ellipsis or (isinstance(i, slice) and i.step in (None, 1)) for i in index)
        a, b = _shape(src), _shape(node)
        if not (whole and src in self.chan and len(inputs) == 1 and len(a) == len(b) >= 2 and a[0] == b[0]):
            raise UnsupportedLayerError(f"{where} indexes {a} to {b}; only step-1 slices keeping the batch are "
                                        "supported")
        if a[1] == b[1]:
            self.chan[node] = self.chan[src]
            return
        channel = index[1] if len(index) > 1 and index[0] is not Ellipsis else None
        if not isinstance(channel, slice) or not all(v is None or isinstance(v, int) for v in (channel.start, channel.stop)):
            raise UnsupportedLayerError(f"{where} slices the channels of {a} through {index}; only x[:, a:b] with "
                                        "constant a and b is supported")
        start, stop, _ = channel.indices(a[1])
        parts = self.classes.cut(self.chan[src], [start, stop - start, a[1] - stop], where)
        self._record_cut(node, parts, where)
        self.chan[node] = parts[1]

    def _vector_to_channels(self, node: fx.Node, src: fx.Node, where: str) -> None:
        """A per-channel parameter reshaped to broadcast over the channel dim (``gamma.reshape(1, -1, 1, 1)``)."""
        shape, width = _shape(node), self.classes.width[self.chan[src]]
        if len(shape) < 2 or shape[1] != width or math.prod(shape) != width:
            raise UnsupportedLayerError(f"{where} reshapes per-channel parameter {src.target!r} to {shape}, not to "
                                        "(1, channels, 1, ...)")
        self.chan[node] = self.chan[src]

    def _passthrough(self, node: fx.Node, inputs: list[fx.Node], where: str) -> None:
        if len(inputs) != 1:
            raise UnsupportedLayerError(f"{where}: expected one tensor input, got {len(inputs)}")
        self._set_cdim(node, self.cdim(inputs[0]))
        self._check_channels_kept(inputs[0], node, where)
        self.chan[node] = self.chan[inputs[0]]

    def _broadcast(self, node: fx.Node, inputs: list[fx.Node], where: str) -> None:
        out_shape = _shape(node)
        tied, dims = None, set()
        for a in inputs:
            shape = _shape(a)
            if len(shape) == 0 or math.prod(shape) == 1:
                continue  # a scalar tensor scales every channel alike
            if len(shape) != len(out_shape):
                raise UnsupportedLayerError(f"{where}: operand of rank {len(shape)} broadcast to rank {len(out_shape)}")
            dims.add(self.cdim(a))
            if shape[self.cdim(a)] == 1:
                continue  # broadcast over channels: does not tie them
            tied = self.chan[a] if tied is None else self.classes.union(tied, self.chan[a], where)
        if tied is None:
            raise UnsupportedLayerError(f"{where}: no operand carries the output's channels")
        if len(dims) > 1:
            raise UnsupportedLayerError(f"{where} combines tensors with channels on dims {sorted(dims)}")
        self._set_cdim(node, dims.pop())
        self.chan[node] = tied

    def _check_channels_kept(self, src: fx.Node, node: fx.Node, where: str) -> None:
        a, b = _shape(src), _shape(node)
        if len(a) < 2 or len(b) < 2 or a[self.cdim(src)] != b[self.cdim(node)]:
            raise UnsupportedLayerError(f"{where} changes the channel dim from {a} to {b}; it must keep it")

    def _check_reduce_dims(self, node: fx.Node, where: str) -> None:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        rank = len(_shape(node.args[0]))
        dims = [dims] if isinstance(dims, int) else dims
        if dims is None or any(d % rank in (0, 1) for d in dims):
            raise UnsupportedLayerError(f"{where} reduces over the batch or channel dim (dims={dims})")

    def _check_reshape(self, node: fx.Node, src: fx.Node, where: str) -> None:
        a, b = _shape(src), _shape(node)
        if len(b) < 2 or a[:2] != b[:2] or math.prod(a[2:]) != math.prod(b[2:]):
            raise UnsupportedLayerError(f"{where} reshapes {a} to {b}, mixing channels with other dims")

    def _single_input(self, node: fx.Node, where: str) -> fx.Node:
        inputs = self._channel_inputs(node)
        if len(inputs) != 1:
            raise UnsupportedLayerError(f"{where}: expected one tensor input, got {len(inputs)}")
        return inputs[0]


def _flatten_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, out.append)
    return out


# ------------------------------------------------------------------------------------------- assembly


def is_protected(module_name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that protects ``module_name`` (exact, glob, or a parent module), else None."""
    for p in patterns:
        if module_name == p or module_name.startswith(p + ".") or fnmatch.fnmatchcase(module_name, p):
            return p
    return None


def _class_names(d: _Discovery) -> dict[int, str]:
    """Leaf channel class -> group name: the first layer producing it (``LAYER@OFFSET`` for a later segment of
    its output), the parameter or opaque op it comes from, or ``input``."""
    names: dict[int, str] = {}
    used: set[str] = set()

    def name(c: int, base: str) -> None:
        for leaf, offset in d.classes.segments(c):
            if leaf not in names:
                n = base if offset == 0 and base not in used else f"{base}@{offset}"
                n0, k = n, 1
                while n in used:
                    n, k = f"{n0}#{k}", k + 1
                names[leaf] = n
                used.add(n)

    for module, cmap, out_c, _in_c, _ in d.layers:
        if cmap is ChannelMap.MIX:
            name(out_c, module)
    for c, param in d.sources.items():
        name(c, param)
    for c in d.fixed:
        name(c, INPUT_GROUP)
    return names


def _node_uses(d: _Discovery, names: dict[int, str]) -> list[NodeUse]:
    """Every node that does work, with the groups of its output and tensor inputs (``names``: leaf -> group)."""
    leaves = d.classes.leaves
    uses = []
    for node in d.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node not in d.chan:
            continue
        inputs = [a for a in _flatten_nodes(node.args) + _flatten_nodes(node.kwargs) if a in d.chan]
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        out_leaves, in_leaves = leaves(d.chan[node]), [leaves(d.chan[a]) for a in inputs]
        uses.append(NodeUse(
            name=node.name, op=node.op, target=target, module_scope=_scope(node),
            out_group=names[out_leaves[0]], in_groups=tuple(names[c] for ls in in_leaves for c in ls),
            input_shapes=tuple(_shape(a) for a in inputs), output_shape=_shape(node),
            inputs=tuple(a.name for a in inputs),
            segmented=len(out_leaves) > 1 or any(len(ls) > 1 for ls in in_leaves)
            or any(a in d.pieces for a in _flatten_nodes(node.args)),  # a piece of a split
            channels_last=any(n in d.cdims for n in (node, *inputs)),
        ))
    return uses


def _assemble(d: _Discovery, names: dict[int, str],
              patterns: Sequence[str]) -> tuple[dict[str, ChannelGroup], list[LayerUse]]:
    """Groups (one per leaf class) and layer uses: a layer on concatenated channels is one member per segment,
    with the segment's offset, and one cost term per pair of segments (their sum is the layer's exact cost)."""
    segments = d.classes.segments
    groups: dict[str, ChannelGroup] = {}
    for leaf in sorted(names):  # leaves are created in execution order
        groups[names[leaf]] = ChannelGroup(name=names[leaf], width=d.classes.width[leaf], blocks=d.classes.blocks[leaf])
    layers = []
    for module, cmap, out_c, in_c, cost in d.layers:
        if cmap is ChannelMap.MIX:
            ins = segments(in_c)
            for out, out_offset in segments(out_c):
                groups[names[out]].members.append(Member(module, "out", out_offset))
                for k, (inp, _) in enumerate(ins):  # per-output parameters (a bias) counted once
                    layers.append(LayerUse(module, cmap, names[out], names[inp], cost if k == 0 else
                                           replace(cost, params_per_out=0)))
            for inp, in_offset in ins:
                groups[names[inp]].members.append(Member(module, "in", in_offset))
        else:
            for leaf, offset in segments(out_c):
                layers.append(LayerUse(module, cmap, names[leaf], None, cost))
                groups[names[leaf]].members.append(Member(module, "channel", offset))
    for c, reason in d.fixed.items():
        for leaf in d.classes.leaves(c):
            g = groups[names[leaf]]
            g.prunable, g.reason = False, reason
    for g in groups.values():
        _apply_protection(g, patterns)
    return groups, layers


def _channel_cuts(d: _Discovery, names: dict[int, str]) -> list[ChannelCut]:
    parts = lambda cs: tuple(() if c is None else tuple(names[leaf] for leaf in d.classes.leaves(c)) for c in cs)  # noqa: E731
    return [ChannelCut(module, node, parts(cs)) for module, node, cs in d.cuts]


def _apply_protection(group: ChannelGroup, patterns: Sequence[str]) -> None:
    if not group.prunable:
        return
    for m in group.members:
        if m.role in ("out", "channel") and (p := is_protected(m.module, patterns)):
            group.prunable, group.reason = False, f"protected by pattern {p!r} (layer {m.module!r})"
            return


def build_channel_graph(
    model: nn.Module,
    img_size: int | Sequence[int],
    protected: Sequence[str] | None = None,
) -> ChannelGraph:
    """Discover the channel groups of ``model`` and the cost coefficients of its layers at ``img_size``.

    Args:
        model: a CNN (any timm model made of layers with registered rules). Its state is not changed.
        img_size: input resolution, an int (square) or ``(H, W)``.
        protected: module-name patterns whose produced channels are never pruned (a name, its parent
            module, or a glob). ``None`` uses the family default (stem, first stage and head).

    Returns:
        The model's :class:`ChannelGraph`.

    Raises:
        UnsupportedLayerError: an operation whose channel semantics are unknown, naming it.
    """
    from .protect import default_protected

    patterns = tuple(default_protected(model) if protected is None else protected)
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
    gm = trace(model)
    was_training = model.training
    model.eval()
    try:
        # ShapeProp prints the traceback of a failing node itself; the error below carries its cause instead
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            param = next(model.parameters())
            ShapeProp(gm).propagate(torch.zeros(1, in_chans, *hw, device=param.device, dtype=param.dtype))
    except Exception as e:  # a kernel larger than the feature map, a model asserting its input size, ...
        cause = e.__cause__ or e
        raise UserInputError(
            f"{type(model).__name__} does not run on a {in_chans}x{hw[0]}x{hw[1]} input ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else 'no message'}); choose an input size it accepts "
            "(model.img_size), e.g. the one it was trained at") from e
    finally:
        model.train(was_training)
    discovery = _Discovery(gm, model, patterns)
    discovery.run()
    names = _class_names(discovery)  # leaf class -> group name, once for groups, node uses and cuts
    groups, layers = _assemble(discovery, names, patterns)
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    return ChannelGraph(name, (in_chans, *hw), groups, layers, patterns, _node_uses(discovery, names),
                        _channel_cuts(discovery, names))
