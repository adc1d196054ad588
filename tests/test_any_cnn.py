"""timm CNNs beyond EfficientNet: grouped convolutions (RegNet, ResNeXt), channel norms with layer scale
(ConvNeXt, channels first and last), channel concatenation (DenseNet, GhostNet) and channel splits and slices
(MixNet's grouped kernels, ReXNet's partial residual, CSP's partial blocks) are pruned exactly.

Each model, at a small resolution, with random weights and random norm statistics: a random pruning equals the
masked original; a searched 0.6 MACs budget is met within 0.995-1.0; the pruned model reloads from its
checkpoint; every grouped conv keeps its number of groups.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _utils import masked_reference, random_keep
from conftest import SMALL
from pruning import build_channel_graph, prune_model
from pruning.artifacts import load_pruned, save_pruned
from pruning.cost import macs_cost
from pruning.count import count_model
from pruning.importance import create_importance
from pruning.layers import UnsupportedLayerError, is_grouped
from pruning.search import search
from pruning.splits import resized_modules
from pruning.timm_spec import load_timm_format

GROUPED = ["regnetx_002", "resnext26ts"]
CONCAT = ["densenet121", "ghostnet_100"]  # channel concatenation (issue 16)
SPLIT = ["mixnet_s", "rexnet_100", "cs3darknet_s", "cspresnet50", "res2net50_26w_4s"]  # channel splits and slices at held sizes
CONVNEXT = ["convnext_atto", "convnext_tiny"]  # LayerNorm2d; permute -> LayerNorm -> Linear (channels last)
MODELS = [*GROUPED, *CONVNEXT, *CONCAT, *SPLIT]


def _images(n=2):
    return torch.randn(n, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(0))


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def _groups(model: nn.Module) -> dict[str, int]:
    """Groups of every grouped (not depthwise) conv: a depthwise conv's groups are its channels."""
    return {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and is_grouped(m)}


@pytest.mark.parametrize("name", MODELS)
def test_pruning_equals_the_masked_model(model_cache, graph_of, name):
    model, graph = model_cache(name).eval(), graph_of(name)
    if name in GROUPED:
        assert any(g.blocks > 1 and g.prunable for g in graph.groups.values())  # grouped convs are pruned
    for seed in (1, 2):
        keep = random_keep(graph, seed=seed)
        pruned = prune_model(model, graph, keep).eval()
        with torch.no_grad():
            assert _close(pruned(_images()), masked_reference(model, graph, keep).eval()(_images()))
        assert _groups(pruned) == _groups(model)
        widths = {g: len(idx) for g, idx in keep.items()}
        assert macs_cost(graph)(widths) == count_model(pruned, SMALL).macs  # the cost model is exact
        if name in SPLIT:
            assert resized_modules(pruned)  # the cuts' sizes shrank with the channels


@pytest.mark.parametrize("name", MODELS)
def test_a_searched_budget_is_met_and_the_model_reloads(model_cache, graph_of, name, tmp_path):
    model, graph = model_cache(name).eval(), graph_of(name)
    result = search(model, graph, create_importance("l1")(model, graph), 0.6, time_limit=3)
    ratio = count_model(result.pruned, SMALL).macs / (0.6 * count_model(model, SMALL).macs)
    assert 0.995 <= ratio <= 1.0
    assert result.solution.bound >= result.solution.objective and result.solution.gap < 0.01  # honest and close
    for g, idx in result.solution.keep.items():
        blocks = graph.groups[g].blocks
        per_block = torch.bincount(torch.tensor(idx) // (graph.groups[g].width // blocks), minlength=blocks)
        assert (per_block == per_block[0]).all(), g
    files, skipped = save_pruned(result.pruned, str(tmp_path), name, SMALL, result.solution.keep, "pruned",
                                 graph.protected_patterns, 0)
    if name in GROUPED:
        assert skipped and "grouped conv" in skipped  # timm's spec would rebuild them as depthwise convs
    if name in SPLIT:  # timm's adapter only resizes layers: a model whose split sizes changed has no spec
        assert ("old split sizes" in (skipped or "")) == bool(resized_modules(result.pruned))
    reloaded, _ = load_pruned(str(tmp_path / "pruned_checkpoint.pth"), model, name)
    with torch.no_grad():
        assert _close(reloaded(_images()), result.pruned.eval()(_images()))
    if not skipped:  # a timm spec is written only when timm's adapter rebuilds this very model
        in_timm = load_timm_format(name, str(tmp_path / "pruned_spec.txt"), str(tmp_path / "pruned.pth"))
        with torch.no_grad():
            assert _close(in_timm(_images()), result.pruned(_images()))


def test_unequal_counts_per_group_are_refused(model_cache, graph_of):
    graph = graph_of("resnext26ts")
    group = next(g for g in graph.prunable_groups() if g.blocks > 1)
    with pytest.raises(ValueError, match="same number of channels in each"):
        prune_model(model_cache("resnext26ts"), graph, {group.name: [0]})


@pytest.mark.parametrize("name", CONVNEXT)
def test_channel_norms_and_layer_scale_keep_the_stream_whole(graph_of, name):
    """ConvNeXt: LayerNorm2d (atto) or a channels-last LayerNorm (tiny) normalises over the stream's channels and
    gamma scales them, so only the MLP hidden widths are pruned; each fixed group says why."""
    graph = graph_of(name)
    assert {g.name.rsplit(".", 1)[-1] for g in graph.prunable_groups()} == {"fc1"}
    reasons = " ".join(g.reason for g in graph.groups.values() if not g.prunable)
    assert "gamma" in reasons or "normalises over these channels" in reasons


def test_latency_tables_time_grouped_convs_at_equal_counts(model_cache):
    """The profiler samples a grouped conv's groups at multiples of its groups, so every timed layer is a valid
    grouped conv, and the table prices any allowed widths."""
    from pruning.latency import profile_latency

    model = model_cache("regnetx_002")
    graph = build_channel_graph(model, 32)
    table = profile_latency(model, graph, batch=1, threads=1, progress=False, repeats=1, passes=1, rounds=1,
                            calibration=(0.5,), align=1)
    blocked = [g for g in graph.prunable_groups() if g.blocks > 1]
    assert blocked and all(w % g.blocks == 0 for g in blocked for w in table.grids[g.name])
    half = {g.name: g.width // 2 - (g.width // 2) % g.blocks for g in graph.prunable_groups()}
    assert 0 < table.cost(graph)(half) < table.cost(graph)(None)


@pytest.mark.parametrize("name", [*CONCAT, "mixnet_s", "rexnet_100"])
def test_concatenated_or_split_channels_are_refused_by_latency_tables(model_cache, graph_of, name):
    """A node reading concatenated or split channels depends on more than two groups: the profiler refuses before any work."""
    from pruning.latency import profile_latency

    graph = graph_of(name)
    assert any(u.segmented for u in graph.nodes)
    with pytest.raises(UnsupportedLayerError, match="concatenated or split channels"):
        profile_latency(model_cache(name), graph, align=8, progress=False)


def test_channels_last_tensors_are_refused_by_latency_tables(model_cache, graph_of):
    """The profiler resizes dim 1 of every tensor it times: channels-last nodes are refused before any work."""
    from pruning.latency import profile_latency

    graph = graph_of("convnext_tiny")
    assert any(u.channels_last for u in graph.nodes)
    with pytest.raises(UnsupportedLayerError, match="channels-last"):
        profile_latency(model_cache("convnext_tiny"), graph, align=8, progress=False)
