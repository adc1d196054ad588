"""Channel groups discovered from the graph, protection, clear errors, and the exact cost model."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _utils import masked_reference, random_keep, randomize_norms_and_biases
from conftest import MODELS, SMALL
from pruning import CostModel, UnsupportedLayerError, build_channel_graph, prune_model
from pruning.count import count_model
from pruning.layers import LayerRule, register_rule
from pruning.splits import SplitRule, register_split_rule


@pytest.fixture(scope="module")
def graphs(model_cache):
    cache = {}

    def get(name, protected=None):
        key = (name, tuple(protected) if protected is not None else None)
        if key not in cache:
            cache[key] = build_channel_graph(model_cache(name), SMALL, protected)
        return cache[key]

    return get


def _group_of(graph, module, role):
    hits = [g.name for g in graph.groups.values() for m in g.members if (m.module, m.role) == (module, role)]
    assert len(hits) == 1, (module, role, hits)
    return hits[0]


@pytest.mark.parametrize("name", MODELS)
def test_every_layer_with_params_belongs_to_groups(graphs, model_cache, name):
    graph = graphs(name)
    in_groups = {m.module for g in graph.groups.values() for m in g.members}
    with_params = {n for n, mod in model_cache(name).named_modules() if list(mod.parameters(recurse=False))}
    assert with_params == in_groups
    assert sum(1 for g in graph.groups.values() for m in g.members if m.role == "out") == sum(
        1 for layer in graph.layers if layer.in_group is not None
    )


@pytest.mark.parametrize("name", ["efficientnet_b0", "efficientnet_b2"])
def test_efficientnet_block_grouping(graphs, model_cache, name):
    graph = graphs(name)
    model = model_cache(name)
    for s, stage in enumerate(model.blocks):
        if s == 0:
            continue
        residual = {_group_of(graph, f"blocks.{s}.{b}.conv_pwl", "out") for b in range(len(stage))}
        assert len(residual) == 1, f"stage {s} outputs must be one group (residual adds)"
        for b in range(len(stage)):
            p = f"blocks.{s}.{b}"
            expansion = _group_of(graph, f"{p}.conv_pw", "out")
            assert _group_of(graph, f"{p}.conv_dw", "channel") == expansion
            assert _group_of(graph, f"{p}.se.conv_expand", "out") == expansion  # SE gate tied to expansion
            assert _group_of(graph, f"{p}.conv_pwl", "in") == expansion
            assert _group_of(graph, f"{p}.se.conv_reduce", "out") not in (expansion, *residual)
            assert graph.groups[expansion].prunable


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100", "tf_efficientnet_lite0"])
def test_stem_first_stage_and_head_protected_by_default(graphs, name):
    graph = graphs(name)
    for g in graph.groups.values():
        producers = [m.module for m in g.members if m.role == "out"]
        touches = any(p.startswith(("conv_stem", "blocks.0.", "conv_head")) for p in producers)
        assert g.prunable == (not touches and g.name not in ("input", "classifier")), g.name
    assert not graph.groups[_group_of(graph, "classifier", "in")].prunable


def test_resnet_stage_grouping(graphs):
    graph = graphs("resnet50")
    residual = _group_of(graph, "layer2.0.downsample.0", "out")
    assert {_group_of(graph, f"layer2.{b}.conv3", "out") for b in range(4)} == {residual}
    assert _group_of(graph, "layer2.1.conv1", "out") != residual  # inner bottleneck widths are free
    assert not graph.groups[_group_of(graph, "conv1", "out")].prunable
    assert graph.groups[residual].prunable


def test_protection_is_configurable(graphs):
    graph = graphs("efficientnet_b0", protected=[])
    assert graph.groups["conv_stem"].prunable
    assert not graph.groups["input"].prunable and not graph.groups["classifier"].prunable
    glob = graphs("efficientnet_b0", protected=["blocks.*.0.conv_pw"])
    assert not glob.groups["blocks.1.0.conv_pw"].prunable
    assert "blocks.*.0.conv_pw" in glob.groups["blocks.1.0.conv_pw"].reason
    assert glob.groups["blocks.1.1.conv_pw"].prunable


@pytest.mark.parametrize("name", MODELS)
def test_cost_model_is_exact(graphs, model_cache, name):
    """MACs/params predicted from widths equal the counter on the full model and on a pruned one."""
    from pruning import prune_model

    model, graph = model_cache(name), graphs(name)
    cost = CostModel(graph, model)
    full = count_model(model, SMALL)
    assert (cost.macs(), cost.params()) == (full.macs, full.params)
    keep = random_keep(graph, seed=1)
    pruned = count_model(prune_model(model, graph, keep), SMALL)
    widths = {g: len(idx) for g, idx in keep.items()}
    assert (cost.macs(widths), cost.params(widths)) == (pruned.macs, pruned.params)
    assert pruned.macs < full.macs


def test_cost_model_counts_input_side_savings(graphs, model_cache):
    graph, model = graphs("efficientnet_b0"), model_cache("efficientnet_b0")
    cost = CostModel(graph, model)
    name = "blocks.2.0.conv_pwl"  # a residual width: consumed by the next blocks' expansions
    w = graph.groups[name].width
    own_layers_only = sum(
        layer.cost.macs_per_pair * graph.groups[layer.in_group].width
        for layer in graph.layers if layer.out_group == name and layer.in_group is not None
    )
    saving = cost.macs() - cost.macs({name: w - 1})
    assert saving > own_layers_only  # the consumers' input side is saved too


def test_cost_model_rejects_unknown_group(graphs, model_cache):
    with pytest.raises(KeyError, match="blocks.99"):
        CostModel(graphs("efficientnet_b0")).macs({"blocks.99": 3})


class _Concat(nn.Module):
    """Two convs concatenated, a norm on the concatenation, a conv added to it (split to match its segments)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1)
        self.bn, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(F.relu(self.bn(y)) + self.c(x)[:, :, ...])


def test_a_concatenation_is_pruned_exactly_segment_by_segment():
    model = randomize_norms_and_biases(_Concat(), img_size=16).eval()
    graph = build_channel_graph(model, 16, protected=[])
    assert {g.name: g.width for g in graph.prunable_groups()} == {"a": 4, "b": 4}
    members = {name: {(m.module, m.role, m.offset) for m in graph.groups[name].members} for name in ("a", "b")}
    assert members["a"] == {("a", "out", 0), ("c", "out", 0), ("bn", "channel", 0), ("head", "in", 0)}
    assert members["b"] == {("b", "out", 0), ("c", "out", 4), ("bn", "channel", 4), ("head", "in", 4)}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for keep in (random_keep(graph, seed=1), {"b": [1, 3]}):
        pruned = prune_model(model, graph, keep).eval()
        with torch.no_grad():
            assert torch.allclose(pruned(x), masked_reference(model, graph, keep).eval()(x), atol=1e-5)
        widths = {g: len(idx) for g, idx in keep.items()}
        assert CostModel(graph).macs(widths) == count_model(pruned, 16).macs
        assert CostModel(graph, model).params(widths) == sum(p.numel() for p in pruned.parameters())
    assert torch.equal(pruned.a.weight, model.a.weight)  # a layer whose segments are all kept is untouched
    assert pruned.c.weight.shape[0] == pruned.bn.num_features == pruned.head.weight.shape[1] == 6


class _PartialSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.head(self.a(x)[:, :2])


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)

    def forward(self, x):
        return self.grouped(self.conv(x))


def test_a_grouped_conv_splits_both_sides_into_equal_blocks():
    graph = build_channel_graph(_Grouped(), 16)
    assert graph.groups["conv"].blocks == 2 and graph.groups["conv"].prunable  # its input: the dense conv's output
    assert graph.groups["grouped"].blocks == 2  # its output (the model's output: not prunable)


class _Flip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return torch.flip(torch.cat([self.a(x), self.b(x)], 1), [1])  # reverses the channels: not modelled


class _ProtectedConcat(nn.Module):
    """Dense convs feeding an unknown operation inside ``fuse``, then a head: only ``fuse`` is out of reach."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.fuse = _Flip()
        self.head = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))

    def forward(self, x):
        return self.head(self.fuse(self.stem(x)))


def test_an_unknown_operation_inside_a_protected_module_keeps_its_channels_whole():
    model = randomize_norms_and_biases(_ProtectedConcat(), img_size=16).eval()
    with pytest.raises(UnsupportedLayerError, match="protect the module it runs in"):
        build_channel_graph(model, 16, protected=[])
    graph = build_channel_graph(model, 16, protected=["fuse"])
    assert {g.name for g in graph.prunable_groups()} == {"stem.0", "head.0"}  # around the concatenation
    assert "inside protected 'fuse'" in graph.groups["fuse.a"].reason
    keep = random_keep(graph, seed=3)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(prune_model(model, graph, keep).eval()(x), masked_reference(model, graph, keep).eval()(x),
                              atol=1e-5)


class _NoRule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8)

    def forward(self, x):
        return self.norm(self.conv(x))


class _ChannelMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.conv(x).mean(1, keepdim=True)


@pytest.mark.parametrize("model,needle", [
    (_PartialSlice(), "sizes held by module '' (_PartialSlice, the model), which must shrink with them, and no split rule"),
    (_NoRule(), "'norm' of type GroupNorm"),
    (_ChannelMean(), "reduces over the batch or channel dim"),
])
def test_unsupported_operations_are_named(model, needle):
    with pytest.raises(UnsupportedLayerError, match=re.escape(needle)):
        build_channel_graph(model, 8, protected=[])


def test_an_input_size_the_model_cannot_run_is_named(capsys):
    from pruning.errors import UserInputError

    with pytest.raises(UserInputError, match=r"Sequential does not run on a 3x2x2 input \(RuntimeError: .*model.img_size"):
        build_channel_graph(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)), 2, protected=[])
    assert "Traceback" not in capsys.readouterr().err  # the cause is in the message, not a traceback dump


def test_graph_building_leaves_model_unchanged(model_cache):
    model = model_cache("efficientnet_b0").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_channel_graph(model, SMALL)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


# ---------------------------------------------------------------- channel splits and unmodelled tensors (issue 12)


class _Net(nn.Module):
    """conv ``a`` (8 channels) -> ``body`` (a function of the module and ``a``'s output) -> conv ``head``.

    ``b`` (3 -> 4) and ``c`` (8 -> 8) are spare convs a body may use, ``bn`` (8) a norm, and the rest
    parameter-free modules (fx calls only modules installed in the model)."""

    def __init__(self, body, head_in=8):
        super().__init__()
        self.body = body
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu6, self.drop = nn.ReLU6(), nn.Dropout(0.5)
        self.max_pool, self.amax_pool = nn.MaxPool2d(2), nn.AdaptiveMaxPool2d(2)
        self.halves, self.twice, self.split_at = _Halves(), _Twice(), _SplitAt([4, 4])
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 6), nn.Linear(6, 8)  # channels-last MLP
        self.head = nn.Conv2d(head_in, 2, 1)

    def forward(self, x):
        return self.head(self.body(self, x, self.a(x)))


def _chunk(m, x, y):  # issue 12: the halves of ``a`` were not tied to anything
    y1, y2 = torch.chunk(y, 2, dim=1)
    return m.b(x) * y1 + y2


def _chunk_method(m, x, y):
    y1, y2 = y.chunk(2, 1)
    return m.b(x) * y1 + y2


def _split(m, x, y):
    y1, y2 = torch.split(y, [4, 4], dim=1)
    return m.b(x) + y1 * y2


def _split_method(m, x, y):
    y1, y2 = y.split(4, dim=1)
    return m.b(x) - y1 + y2


def _tensor_split(m, x, y):
    y1, y2 = torch.tensor_split(y, 2, dim=1)
    return m.b(x) * y1 + y2


def _unbind(m, x, y):
    parts = torch.unbind(y, dim=1)
    return m.b(x) * parts[0].unsqueeze(1)


def _unmodelled_operand(m, x, y):
    return y * torch.ones((x.shape[0], 8, 1, 1))  # a tensor made from nothing, tied to ``a``'s channels


def _split_of_unmodelled(m, x, y):
    ones, _ = torch.ones((x.shape[0], 16, 1, 1)).chunk(2, 1)
    return y * ones


class _Halves(nn.Module):
    """A sub-module returning a tuple of channel slices (traced through: fx sees the slicing)."""

    def forward(self, y):
        return y[:, :4], y[:, 4:]


class _Twice(nn.Module):
    """A sub-module returning the same tensor twice (traced through: fx sees only the tensor)."""

    def forward(self, y):
        return y, y


class _PairLayer(nn.Module):
    """A leaf layer (it has a rule) whose output is a tuple: discovery cannot follow its channels."""

    def forward(self, y):
        return y, y


register_rule(_PairLayer)(type("_PairLayerRule", (LayerRule,), {}))


@pytest.mark.parametrize("body,node", [(_tensor_split, "tensor_split"), (_unbind, "unbind")])
def test_unmodelled_channel_splits_are_rejected_naming_the_node(body, node):
    with pytest.raises(UnsupportedLayerError, match=rf"node '{node}'.*several outputs, which is not modelled"):
        build_channel_graph(_Net(body, head_in=4), 8, protected=[])


@pytest.mark.parametrize("body,node", [(_split, "split"), (_split_method, "split")])
def test_a_split_at_sizes_held_by_a_module_without_a_split_rule_is_rejected(body, node):
    with pytest.raises(UnsupportedLayerError, match=rf"node '{node}'.*no split rule.*register_split_rule"):
        build_channel_graph(_Net(body, head_in=4), 8, protected=[])


def test_layer_returning_a_tuple_is_rejected():
    net = _Net(lambda m, x, y: m.b(x) * m.pair(y)[0][:, :4], head_in=4)
    net.pair = _PairLayer()
    with pytest.raises(UnsupportedLayerError, match=r"node 'pair'.*several outputs, which is not modelled"):
        build_channel_graph(net, 8, protected=[])


class _SplitAt(nn.Module):
    """Cuts its input at sizes it holds (as MixNet's, CSP's and ReXNet's blocks do); its split rule resizes it."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes = list(sizes)

    def forward(self, y):
        a, b = torch.split(y, self.sizes, 1)
        return a, b, y[:, self.sizes[0]:]


@register_split_rule(_SplitAt)
class _SplitAtRule(SplitRule):
    def resize(self, module, cuts):
        module.sizes = list(cuts[0])
        assert cuts[1][1] == cuts[0][1]  # the slice [sizes[0]:] is the split's second part


def _channels_last_mlp(m, x, y):  # ConvNeXt's block: permute -> LayerNorm -> Linear -> GELU -> Linear -> permute
    z = m.fc2(F.gelu(m.fc1(m.ln(y.permute(0, 2, 3, 1)))))
    return y + z.permute(0, 3, 1, 2)


def _split_with_rule(m, x, y):
    a, b, c = m.split_at(y)  # c (the slice) is b
    return torch.cat([m.b(x) * a, m.bn(torch.cat([c, b], 1))], 1)


@pytest.mark.parametrize("body,node", [(_unmodelled_operand, "mul"), (_split_of_unmodelled, "chunk")])
def test_operand_without_channel_class_is_rejected(body, node):
    with pytest.raises(UnsupportedLayerError, match=rf"node '{node}'.*uses tensor .* does not model"):
        build_channel_graph(_Net(body), 8, protected=[])


def test_shape_queries_are_allowed():
    def body(m, x, y):
        n, c = y.size(0), y.shape[1]
        return m.c(y).view(n, c, y.size(2), -1) * (y.dim() - 3)

    graph = build_channel_graph(_Net(body), 8, protected=[])
    assert graph.groups["a"].prunable and [m.module for m in graph.groups["a"].members] == ["a", "c"]


def _se(m, x, y):  # squeeze-excitation: the gate's channels are tied to the gated tensor's
    gate = m.c(F.relu(y.mean((2, 3), keepdim=True))).sigmoid()
    return y * gate


def _residual(m, x, y):
    return F.relu(m.bn(m.c(F.relu(y))) + y)


_PRUNES = {  # every op the discovery models, each in a small model: pruning must equal masking
    "relu": lambda m, x, y: F.relu(y),
    "torch_sigmoid": lambda m, x, y: torch.sigmoid(y),
    "method_relu": lambda m, x, y: y.relu(),
    "silu_hardswish_gelu": lambda m, x, y: F.gelu(F.hardswish(F.silu(y))),
    "tanh_inplace": lambda m, x, y: m.c(y).tanh_(),
    "module_act_dropout": lambda m, x, y: m.drop(m.relu6(y)),
    "batchnorm": lambda m, x, y: m.bn(y),
    "residual": _residual,
    "residual_add_method": lambda m, x, y: m.c(y).add(m.bn(y)).add_(y),
    "sub_div_scalars": lambda m, x, y: (m.c(y) * 0.5 + 1.0) / 2 - y,
    "div_two_tensors": lambda m, x, y: m.c(y) / (m.bn(y).sigmoid() + 1),
    "se_mean": _se,
    "se_adaptive_pool": lambda m, x, y: y * torch.sigmoid(m.c(F.adaptive_avg_pool2d(y, 1))),
    "mul_by_spatial_max": lambda m, x, y: y * torch.amax(m.c(y), dim=(2, 3), keepdim=True),
    "mul_by_spatial_sum": lambda m, x, y: y * torch.sum(y, dim=[-1, -2], keepdim=True),
    "pools": lambda m, x, y: F.avg_pool2d(F.max_pool2d(m.c(y), 2), 2, ceil_mode=True),
    "pool_modules": lambda m, x, y: m.amax_pool(m.max_pool(y)),
    "clone_contiguous": lambda m, x, y: m.c(y.clone()).contiguous(),
    "tuple_module_traced_through": lambda m, x, y: (lambda p: p[0] * m.c(p[1]))(m.twice(y)),
    "cat": lambda m, x, y: torch.cat([y, m.b(x)], 1),
    "cat_neg_dim_full_slice": lambda m, x, y: torch.cat([m.bn(y), m.c(y)], dim=-3)[:, :16],
    "chunk": _chunk,  # the halves keep the same channels, so chunk still cuts them in equal halves
    "chunk_method": _chunk_method,
    "cat_along_space": lambda m, x, y: torch.cat([y, m.c(y)], 2),
    "split_along_space": lambda m, x, y: torch.cat(torch.split(m.c(y), 4, dim=2), 2) * y,
    "split_at_sizes_held_by_a_module_with_a_rule": _split_with_rule,
    "channels_last_mlp": _channels_last_mlp,
    "channels_last_mlp_torch_permute_residual": lambda m, x, y: torch.permute(
        m.fc2(F.gelu(m.fc1(torch.permute(m.c(y), (0, 2, 3, 1))))) + torch.permute(y, (0, 2, 3, 1)), (0, 3, 1, 2)),
}
_HEADS = {  # pooled heads: mean, pool + flatten/view/reshape into a linear layer
    "mean_linear": lambda m, y: y.mean((2, 3)),
    "pool_flatten": lambda m, y: torch.flatten(F.adaptive_avg_pool2d(y, 1), 1),
    "pool_view": lambda m, y: F.adaptive_avg_pool2d(y, 1).view(y.size(0), -1),
    "pool_reshape_method": lambda m, y: m.gap(y).reshape(y.shape[0], -1),
    "pool_flatten_method": lambda m, y: m.gap(y).flatten(1),
    "pool_flatten_module": lambda m, y: m.flat(m.gap(y)),
}
_HEAD_IN = {"chunk": 4, "chunk_method": 4, "split_at_sizes_held_by_a_module_with_a_rule": 12, "split": 4, "tensor_split": 4, "unbind": 4, "slice_halves_module": 4, "cat": 12,
            "cat_neg_dim_full_slice": 16, "partial_channel_slice": 4,
            "split_at_a_computed_size": 4, "slice_at_a_computed_bound": 4, "strided_channel_slice": 4,
            "pool_on_channels_last": 4}
_RAISES = {
    "split": _split, "tensor_split": _tensor_split, "unbind": _unbind,
    "unmodelled_operand": _unmodelled_operand,
    "slice_halves_module": lambda m, x, y: (lambda p: p[0] * p[1])(m.halves(y)),
    "flatten_channels_with_space": lambda m, x, y: torch.flatten(y, 1).view(x.shape[0], 8, 8, 8),
    "partial_channel_slice": lambda m, x, y: y[:, :4],
    "split_at_a_computed_size": lambda m, x, y: (lambda p: p[0] * p[1])(y.split(y.shape[1] // 2, dim=1)),
    "slice_at_a_computed_bound": lambda m, x, y: y[:, :y.shape[1] // 2],
    "strided_channel_slice": lambda m, x, y: y[:, ::2],
    "pool_on_channels_last": lambda m, x, y: F.avg_pool2d(y.permute(0, 2, 3, 1), 2).permute(0, 3, 1, 2),
    "conv_on_channels_last": lambda m, x, y: m.c(y.permute(0, 3, 1, 2)),
    "batch_norm_on_channels_last": lambda m, x, y: m.bn(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
    "channels_last_mixed_with_first": lambda m, x, y: (y.permute(0, 2, 3, 1) + y.permute(0, 2, 1, 3)).permute(0, 3, 1, 2),
    "permute_the_batch": lambda m, x, y: y.permute(1, 0, 2, 3).permute(1, 0, 2, 3),
    "cat_along_batch": lambda m, x, y: torch.cat([y, y], 0),
}


class _LinearHead(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool, self.a, self.c, self.fc = pool, nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)
        self.gap, self.flat = nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()

    def forward(self, x):
        return self.fc(self.pool(self, self.c(F.relu(self.a(x)))))


def _construct(kind: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "head":
        return _LinearHead(_HEADS[name])
    body = {**_PRUNES, **_RAISES}[name]
    return _Net(body, head_in=_HEAD_IN.get(name, 8))


_CONSTRUCTS = (
    [pytest.param("body", n, True, id=n) for n in _PRUNES]
    + [pytest.param("head", n, True, id=f"head_{n}") for n in _HEADS]
    + [pytest.param("body", n, False, id=f"raises_{n}") for n in _RAISES]
)


@pytest.mark.parametrize("kind,name,supported", _CONSTRUCTS)
def test_every_construct_raises_or_prunes_exactly(kind, name, supported):
    """The discovery's contract: a model is rejected at build time, or pruning it equals masking it."""
    model = randomize_norms_and_biases(_construct(kind, name), seed=1, img_size=8)
    try:
        graph = build_channel_graph(model, 8, protected=[])
    except UnsupportedLayerError:
        assert not supported, "a supported construct was rejected"
        return
    assert supported, "an unsupported construct was accepted"
    keep = random_keep(graph, seed=3)
    assert keep and all(len(idx) < graph.groups[g].width for g, idx in keep.items())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = masked_reference(model, graph, keep).eval()(x)
        got = prune_model(model, graph, keep).eval()(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
