"""Channel groups discovered from the graph, protection, clear errors, and the exact cost model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _utils import random_keep
from conftest import MODELS, SMALL
from pruning import CostModel, UnsupportedLayerError, build_channel_graph
from pruning.count import count_model


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
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)

    def forward(self, x):
        return self.grouped(self.conv(x))


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
    (_Concat(), "'cat'"),
    (_Grouped(), "'grouped'"),
    (_NoRule(), "'norm' of type GroupNorm"),
    (_ChannelMean(), "reduces over the batch or channel dim"),
])
def test_unsupported_operations_are_named(model, needle):
    with pytest.raises(UnsupportedLayerError, match=needle.replace("(", r"\(")):
        build_channel_graph(model, 8, protected=[])


def test_graph_building_leaves_model_unchanged(model_cache):
    model = model_cache("efficientnet_b0").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_channel_graph(model, SMALL)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
