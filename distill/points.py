"""Matched points: where the student's features are compared with the teacher's, and hooks that capture them.

The points come from the model's structure, not from a table per architecture. The model's top-level
children are walked in order; a child named as a stage container by timm's ``feature_info`` (``blocks`` in
``blocks.3``) is expanded into its stages. Then:

* everything before the first stage is the **stem** (one point: the output of its last module),
* every stage is one point,
* after the last stage, each layer is a point together with the normalisation, activation, flatten and
  dropout layers that follow it: EfficientNet gives ``bn2`` (head), ``global_pool`` (pooled features) and
  ``classifier`` (logits); MobileNetV3 gives ``global_pool``, ``flatten`` (head) and ``classifier``.

This list, ``"all"``, is the default: stem, each stage, head, pooled features, logits (EfficientNet: ``bn1``,
``blocks.0`` ... ``blocks.6``, ``bn2``, ``global_pool``, ``classifier``). ``"authors"`` is the list of the
authors' code: the output of every top-level child and of every stage, followers included (EfficientNet adds
``conv_stem`` and ``conv_head``, the pre-normalisation outputs). ``"last"`` keeps only the last stage's output.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pruning.errors import UserInputError

POINTS = ("all", "authors", "last")

# layers that only transform their input elementwise or per channel: they belong to the point before them
_FOLLOWERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.Identity, nn.Flatten, nn.Dropout,
              nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU)


def check_points(points: str) -> None:
    """Raise a :class:`~pruning.errors.UserInputError` naming ``points`` unless it is one of :data:`POINTS`."""
    if points not in POINTS:
        raise UserInputError(f"unknown matched points {points!r}; choose one of {list(POINTS)}")


def _stage_names(model: nn.Module) -> list[str]:
    """Module names of the stages named by timm's ``feature_info``, containers expanded to all their stages."""
    modules = dict(model.named_modules())
    stages: list[str] = []
    for info in getattr(model, "feature_info", None) or []:
        name = info["module"] if isinstance(info, dict) else str(info)
        container, _, index = name.rpartition(".")
        if container and index.isdigit() and container in modules:
            names = [f"{container}.{n}" for n, _ in modules[container].named_children()]
        else:
            names = [name]
        stages += [n for n in names if n not in stages]
    return stages


def _walk(model: nn.Module, stages: list[str]) -> list[str]:
    """Top-level children in order, stage containers replaced by their stages."""
    containers = {s.rpartition(".")[0] for s in stages if "." in s}
    order = []
    for name, child in model.named_children():
        order += [f"{name}.{n}" for n, _ in child.named_children()] if name in containers else [name]
    return order


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_follower(module: nn.Module) -> bool:
    return isinstance(module, _FOLLOWERS) or type(module).__name__.lower().endswith(("act", "activation"))


def _overwritten(following: list[str], modules: dict[str, nn.Module]) -> bool:
    """True when an in-place activation among the parameter-free followers overwrites this output (it is then
    the same point as that activation's output)."""
    for name in following:
        if getattr(modules[name], "inplace", False):
            return True
        if _has_params(modules[name]) or not _is_follower(modules[name]):
            return False
    return False


def matched_points(model: nn.Module, points: str = "all") -> list[str]:
    """Module names whose outputs are matched between student and teacher, in execution order.

    Args:
        model: a timm CNN (the student or the teacher: pruning keeps module names, so both give the same list).
        points: ``"all"`` (the default: stem, stages, head, pooled features, logits), ``"authors"`` (every
            top-level child and every stage) or ``"last"`` (last stage only).

    Raises:
        ValueError: unknown ``points``, or a model without a stage the rule can find.
    """
    check_points(points)
    modules = dict(model.named_modules())
    # a stage holds parameters: ResNet's feature_info also names the stem's activation (``act1``)
    stages = [s for s in _stage_names(model) if s in modules and s.count(".") <= 1 and _has_params(modules[s])]
    order = _walk(model, stages)
    if not stages or stages[-1] not in order:
        raise ValueError(f"{type(model).__name__} has no stages in timm's feature_info; cannot match inner features")
    if points == "last":
        return [stages[-1]]
    if points == "authors":
        return [n for i, n in enumerate(order) if not _overwritten(order[i + 1:], modules)]
    stage_set = set(stages)
    first = order.index(next(s for s in order if s in stage_set))
    result = [order[first - 1]] if first > 0 else []  # the stem: its last module's output
    for i in range(first, len(order)):
        name, nxt = order[i], order[i + 1] if i + 1 < len(order) else None
        if name in stage_set or nxt is None or not _is_follower(modules[nxt]):
            result.append(name)
    return result


class FeatureCapture:
    """Forward hooks that keep a reference to the outputs of the named modules (no copies).

    Use as a context manager; :meth:`pop` returns the outputs of the last forward, in the given order,
    and drops the references so the activations can be freed as soon as the loss is done with them.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"matched points {missing} are not modules of {type(model).__name__}")
        self.names = list(names)
        self._outputs: dict[str, tuple[torch.Tensor, int]] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            self._outputs[name] = (output, output._version)

        return hook

    def pop(self) -> list[torch.Tensor]:
        """The captured outputs, in ``names`` order; raises if a point did not run or was overwritten.

        A reference is only as good as the tensor behind it: a later in-place op (``x += ...``, an in-place
        activation) would silently change a kept feature, so the tensors' version counters are checked.
        """
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"matched points {missing} produced no output in the last forward pass")
        changed = [n for n in self.names if self._outputs[n][0]._version != self._outputs[n][1]]
        if changed:
            raise RuntimeError(f"the outputs of {changed} were modified in place later in the forward pass; "
                               "they cannot be matched by reference")
        out = [self._outputs[n][0] for n in self.names]
        self._outputs.clear()
        return out

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._outputs.clear()

    def __enter__(self) -> "FeatureCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
