"""Helpers for the distill tests (no tests here): a tiny labelled image folder and a tiny teacher/student pair.

Also imported by the subprocess workers of the resume and multi-process tests.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from pruning import build_channel_graph, create_model, prune_to_widths

SYNSETS = ("n01440764", "n02102040", "n02979186")  # ImageNet indices 0, 217, 482
LABELS = (0, 217, 482)
IMG = 32  # training and validation resolution of the tests


def write_images(root: str, per_class: int = 8, size: int = 40, seed: int = 0) -> str:
    """Synset folders of random images, each class tinted by one colour channel (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    for c, synset in enumerate(SYNSETS):
        os.makedirs(os.path.join(root, synset), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (size, size, 3))
            pixels[..., c] += 120
            Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, synset, f"{i}.png"))
    return root


def tiny_pair(name: str = "resnet18", seed: int = 0, keep: float = 0.5, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random-init timm teacher and its student keeping ``keep`` of every prunable group's channels."""
    torch.manual_seed(seed)
    teacher = create_model(name, **kwargs)
    graph = build_channel_graph(teacher, IMG)
    widths = {g.name: max(1, round(g.width * keep)) for g in graph.prunable_groups()}
    return teacher, prune_to_widths(teacher, graph, widths)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-for-bit equality of two state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
