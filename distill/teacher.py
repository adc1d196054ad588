"""The frozen teacher, made cheaper to run: batch norm folded into the convs before it, channels-last layout.

The teacher never trains, so its batch norms are fixed affine maps and fold exactly into the preceding
convolution (``W' = W * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``). Folding works on
a copy and only where the fx graph proves the conv's sole consumer is the norm; module names are kept, so the
matched points (:mod:`distill.points`) hook the same places. On a 2-core CPU this and channels-last take the
teacher's forward from ~1.0x to ~0.7x of its plain time (see ``benchmarks/bench_distill.py``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def freeze(teacher: nn.Module) -> nn.Module:
    """Put ``teacher`` in eval mode with gradients off (in place), and return it."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _post_norm(norm: nn.Module) -> nn.Module | None:
    """What a folded norm still has to do after normalising: timm's BatchNormAct2d keeps drop + act."""
    from timm.layers import BatchNormAct2d

    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm) is BatchNormAct2d:
        return nn.Sequential(norm.drop, norm.act)
    return None  # an unknown subclass may do more; leave it alone


def conv_norm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, norm)`` module names where the fx graph shows the conv feeds only that batch norm."""
    from pruning.graph import trace

    try:
        graph = trace(model).graph
    except Exception:  # untraceable model: fold nothing, the teacher is still correct
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        norm = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(norm, nn.BatchNorm2d) and user.args[:1] == (node,) and norm.num_features == modules[node.target].out_channels:
            pairs.append((node.target, user.target))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias, requires_grad=False)


def fold_batchnorm(model: nn.Module, keep: tuple[str, ...] = ()) -> nn.Module:
    """A copy of the eval-mode ``model`` with every provable conv -> batch norm pair folded into the conv.

    Convs named in ``keep`` (matched points) are left unfolded: folding changes what they output.
    """
    model = copy.deepcopy(model).eval()
    for conv_name, norm_name in conv_norm_pairs(model):
        if conv_name in keep:
            continue
        modules = dict(model.named_modules())
        post = _post_norm(modules[norm_name])
        if post is None:
            continue
        _fold(modules[conv_name], modules[norm_name])
        parent, _, attr = norm_name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, post)
    return model


def prepare_teacher(teacher: nn.Module, device: torch.device, fold_bn: bool = True, channels_last: bool = True,
                    points: tuple[str, ...] = ()) -> nn.Module:
    """The teacher to run during training: frozen, on ``device``, optionally folded and channels-last.

    ``points`` are the matched points: a conv among them keeps its batch norm (its output must stay the conv's).

    Works on a copy: the caller's ``teacher`` keeps its mode, device and ``requires_grad`` flags, so the same
    parent can be pruned again or teach another student afterwards.
    """
    fast = fold_batchnorm(teacher, tuple(points)) if fold_bn else copy.deepcopy(teacher)
    fast = freeze(fast).to(device)
    return fast.to(memory_format=torch.channels_last) if channels_last else fast
