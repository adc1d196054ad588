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
