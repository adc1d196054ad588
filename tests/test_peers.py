"""Torch-Pruning as a peer baseline: driven to a MACs target the same way our methods are, parent untouched."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL
from pruning.count import count_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def test_torch_pruning_meets_the_macs_target(model_cache):
    pytest.importorskip("torch_pruning")
    from peers import torch_pruning_to_macs

    parent = model_cache("efficientnet_b0").eval()
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    full = count_model(parent, SMALL).macs
    target = int(0.6 * full)
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, SMALL, SMALL), torch.randint(0, 1000, (4,)))]
    pruned = torch_pruning_to_macs(parent, SMALL, target, "taylor", batches, iterations=7)
    macs = count_model(pruned, SMALL).macs
    assert 0.93 * target <= macs <= target  # bisection lands just under the budget, not anywhere below it
    assert pruned.conv_stem.out_channels == parent.conv_stem.out_channels  # protected layers stay whole
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in parent.parameters())
    assert pruned(torch.randn(1, 3, SMALL, SMALL)).shape == (1, 1000)


def test_a_torch_pruning_model_becomes_an_app_checkpoint(model_cache, tmp_path):
    """kept_channels reads Torch-Pruning's choice in our groups; the checkpoint rebuilds the same model."""
    pytest.importorskip("torch_pruning")
    from peers import kept_channels, torch_pruning_to_macs
    from pruning import artifacts, build_channel_graph

    parent = model_cache("efficientnet_b0").eval()
    graph = build_channel_graph(parent, SMALL)
    pruned = torch_pruning_to_macs(parent, SMALL, int(0.6 * count_model(parent, SMALL).macs), "magnitude",
                                   iterations=5).eval()
    keep = kept_channels(parent, pruned, graph)  # checks that prune_model(keep) computes what `pruned` does
    assert keep and all(len(k) < graph.groups[g].width for g, k in keep.items())
    assert keep != {g: list(range(len(k))) for g, k in keep.items()}  # the choice is read off, not assumed
    artifacts.save_pruned(pruned, str(tmp_path), "efficientnet_b0", SMALL, keep, "pruned")
    loaded, _ = artifacts.load_pruned(str(tmp_path / artifacts.CHECKPOINT), parent)
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.allclose(loaded(x), pruned(x), atol=1e-5)


def test_kept_channels_refuses_a_model_it_cannot_rebuild(model_cache):
    pytest.importorskip("torch_pruning")
    from peers import kept_channels, torch_pruning_to_macs
    from pruning import build_channel_graph

    parent = model_cache("efficientnet_b0").eval()
    pruned = torch_pruning_to_macs(parent, SMALL, int(0.6 * count_model(parent, SMALL).macs), "magnitude",
                                   iterations=3).eval()
    conv = pruned.blocks[2][0].conv_pwl
    with torch.no_grad():
        conv.weight.mul_(2)  # no longer a slice of the parent
    with pytest.raises(ValueError, match="do not rebuild the Torch-Pruning model"):
        kept_channels(parent, pruned, build_channel_graph(parent, SMALL))
