"""timm-format round trip and the import of timm's published pruned EfficientNets."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models._prune import adapt_model_from_string

from _utils import random_keep
from conftest import SMALL
from pruning import CostModel, build_channel_graph, prune_model, prune_to_widths
from pruning.count import Count, count_model
from pruning.paper import PAPER_CONFIGS, paper_widths
from pruning.timm_spec import (
    SpecUnsupportedError, load_timm_format, parse_spec, save_timm_format, spec_from_model, timm_shipped_spec,
    widths_from_spec,
)


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_lite0", "mobilenetv3_large_100", "resnet18"])
def test_round_trip_with_timm_alone(model_cache, tmp_path, name):
    model = model_cache(name)
    graph = build_channel_graph(model, SMALL)
    pruned = prune_model(model, graph, random_keep(graph, seed=3)).eval()
    save_timm_format(pruned, tmp_path / "pruned_spec.txt", tmp_path / "pruned.pth")

    # exactly what a user does with timm alone
    rebuilt = timm.create_model(name)
    rebuilt = adapt_model_from_string(rebuilt, (tmp_path / "pruned_spec.txt").read_text().strip())
    rebuilt.load_state_dict(torch.load(tmp_path / "pruned.pth", weights_only=True), strict=True)
    rebuilt.eval()

    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))
    assert torch.equal(load_timm_format(name, tmp_path / "pruned_spec.txt", tmp_path / "pruned.pth")(x), pruned(x))
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temp files


def test_a_spec_timms_adapter_would_rebuild_at_other_shapes_is_not_written(model_cache, tmp_path):
    """timm's adapter resizes convs, norms and the classifier's input, not a hidden Linear's outputs (ConvNeXt's
    channels-last MLP): such a model gets no spec, and the reason names the layer."""
    model = model_cache("convnext_tiny")
    graph = build_channel_graph(model, SMALL)
    fc1 = "stages.0.blocks.0.mlp.fc1"
    pruned = prune_model(model, graph, {fc1: list(range(100))})
    with pytest.raises(SpecUnsupportedError, match=rf"rebuilds '{fc1}.weight' at \[384, 96\], not at the pruned \[100, 96\]"):
        save_timm_format(pruned, tmp_path / "pruned_spec.txt", tmp_path / "pruned.pth", "convnext_tiny")
    assert not list(tmp_path.iterdir())
    stream = prune_model(model_cache("efficientnet_b0"), build_channel_graph(model_cache("efficientnet_b0"), SMALL),
                         {"blocks.2.0.conv_pwl": list(range(30))})
    save_timm_format(stream, tmp_path / "pruned_spec.txt", tmp_path / "pruned.pth", "efficientnet_b0")  # expressible


@pytest.mark.parametrize("budget", list(PAPER_CONFIGS))
def test_paper_configs_reproduce_published_counts(budget):
    cfg = PAPER_CONFIGS[budget]
    model = timm.create_model(cfg.base_model)
    graph = build_channel_graph(model, cfg.img_size)
    widths = paper_widths(budget, graph)
    assert CostModel(graph, model).macs(widths) == cfg.macs
    assert CostModel(graph, model).params(widths) == cfg.params
    pruned = prune_to_widths(model, graph, widths)
    assert count_model(pruned, cfg.img_size) == Count(cfg.macs, cfg.params)
    published = timm.create_model(cfg.timm_pruned).state_dict()
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in published.items()}


def test_paper_pattern_matches_reference():
    """timm's b1_pruned keeps stage widths 24->12, 40->35, 80->74, 112->67 and leaves stage 0 whole."""
    graph = build_channel_graph(timm.create_model("efficientnet_b1"), SMALL)
    widths = paper_widths("flops_490M", graph)
    assert [widths[f"blocks.{s}.0.conv_pwl"] for s in (1, 2, 3, 4)] == [12, 35, 74, 67]
    assert all(widths[g.name] == g.width for g in graph.groups.values() if not g.prunable)


def test_spec_format_matches_timm_files():
    text = timm_shipped_spec("efficientnet_b1_pruned")
    assert spec_from_model(timm.create_model("efficientnet_b1_pruned")) == text
    assert parse_spec(text)["conv_stem.weight"] == [32, 3, 3, 3]
    assert parse_spec(text)["bn1.num_batches_tracked"] == []


def test_spec_errors_are_clear():
    graph = build_channel_graph(timm.create_model("efficientnet_b0"), SMALL)
    with pytest.raises(ValueError, match="malformed timm spec entry"):
        parse_spec("conv_stem.weight:[32, 3***bn1.weight:[32]")
    with pytest.raises(ValueError, match="another architecture"):
        widths_from_spec(graph, timm_shipped_spec("efficientnet_b1_pruned").replace("conv_head.weight", "x.weight"))
    spec = parse_spec(spec_from_model(timm.create_model("efficientnet_b0")))
    spec["blocks.1.0.conv_pwl.weight"][1] = 50  # the expansion group now disagrees with itself
    text = "***".join(f"{k}:{v}" for k, v in spec.items())
    with pytest.raises(ValueError, match="inconsistent widths"):
        widths_from_spec(graph, text)
