"""Shared fixtures: models are created once per session (random init) and never mutated by tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# every architecture the group discovery must handle (issue: foundation)
MODELS = [
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "tf_efficientnet_lite0",
    "mobilenetv3_large_100", "resnet18", "resnet50",
]
SMALL = 64  # input size for fast tests


@pytest.fixture(scope="session")
def model_cache():
    """Random-init timm models whose norm statistics, affine parameters and biases are random too
    (:func:`_utils.randomize_norms_and_biases`): a slice with wrong indices then changes the output."""
    from _utils import randomize_norms_and_biases
    from pruning import create_model

    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = randomize_norms_and_biases(create_model(name))
        return cache[name]

    return get


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repo (or $KP_SHARED_DATA)."""
    return Path(os.environ.get("KP_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="module")
def graph_of(model_cache):
    """Channel graphs of ``model_cache``'s models at ``SMALL``, built once per test module."""
    from pruning import build_channel_graph

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_channel_graph(model_cache(name), SMALL)
        return cache[name]

    return get
