"""Helpers for tests: random kept channels, the masked reference model, models whose every slice matters."""
from __future__ import annotations

import copy

import torch
from torch import nn

from pruning.graph import ChannelGraph


def random_keep(graph: ChannelGraph, seed: int = 0, low: float = 0.3, high: float = 0.9) -> dict[str, list[int]]:
    """Random kept channel indices (a random fraction in [low, high]) for every prunable group."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in graph.prunable_groups():
        frac = low + (high - low) * torch.rand(1, generator=gen).item()
        size = g.width // g.blocks  # a grouped conv's groups keep equal counts
        n = max(1, round(frac * size))
        keep[g.name] = sorted(b * size + i for b in range(g.blocks) for i in torch.randperm(size, generator=gen)[:n].tolist())
    return keep


def masked_reference(model: nn.Module, graph: ChannelGraph, keep: dict[str, list[int]]) -> nn.Module:
    """A copy of ``model`` with removed channels zeroed where they are consumed (consumer weight columns)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name, idx in keep.items():
        removed = sorted(set(range(graph.groups[name].width)) - set(idx))
        for m in graph.groups[name].members:
            if m.role == "in":
                _zero_inputs(modules[m.module], [m.offset + r for r in removed])
    return ref


@torch.no_grad()
def _zero_inputs(module: nn.Module, removed: list[int]) -> None:
    """Zero the weights that read input channels ``removed`` (a grouped conv: in its own group's rows)."""
    groups = getattr(module, "groups", 1)
    if groups == 1:
        module.weight[:, removed] = 0
        return
    per_in, per_out = module.weight.shape[1], module.weight.shape[0] // groups
    for r in removed:
        g, j = divmod(r, per_in)
        module.weight[g * per_out:(g + 1) * per_out, j] = 0


NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def randomize_norms_and_biases(model: nn.Module, seed: int = 0, img_size: int = 64) -> nn.Module:
    """Give every norm layer random affine parameters and running statistics, every layer bias and every layer
    scale (``gamma``) a random value, in place. A fresh timm model has gamma 1, beta 0, mean 0, var 1 and zero biases, under which a
    norm or bias sliced with the wrong indices computes the same thing: tests of slicing could not see it.

    The running statistics are first measured on random images (so activations keep their scale through a
    deep network instead of fading into a constant output), then perturbed per channel."""
    gen = torch.Generator().manual_seed(seed)
    uniform = lambda t, lo, hi: lo + (hi - lo) * torch.rand(t.shape, generator=gen)  # noqa: E731
    norms = [m for m in model.modules() if isinstance(m, NORMS)]
    for m in model.modules():
        if isinstance(m, NORMS) and m.weight is not None:
            m.weight.copy_(uniform(m.weight, 0.5, 1.5))
            m.bias.copy_(uniform(m.bias, -0.2, 0.2))
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.copy_(uniform(m.bias, -0.2, 0.2))
    for name, p in model.named_parameters():  # layer scales (ConvNeXt's gamma starts at 1e-6: the branch vanishes)
        if name.rsplit(".", 1)[-1] == "gamma" and p.dim() == 1:
            p.copy_(uniform(p, 0.5, 1.5))
    _measure_running_stats(model, [m for m in norms if getattr(m, "running_var", None) is not None], img_size, gen)
    for m in norms:
        if getattr(m, "running_var", None) is not None:
            m.running_mean.add_(uniform(m.running_mean, -0.2, 0.2) * m.running_var.sqrt())
            m.running_var.mul_(uniform(m.running_var, 0.7, 1.3))
    return model.eval()


def _measure_running_stats(model: nn.Module, norms: list, img_size: int, gen: torch.Generator) -> None:
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batch
    model.train()
    model(torch.randn(8, 3, img_size, img_size, generator=gen))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
