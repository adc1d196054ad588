"""Which layers are never pruned by default: the stem, the first stage and the head, as in the paper.

Defaults are registered per model class with :func:`register_protected` and looked up along the model's MRO
(subclasses inherit their base's), like layer rules. Patterns name a module, a parent module (``blocks.0``
protects every layer under it) or a glob. ``model.protected`` in the config overrides them for one run.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ._registry import TypeRegistry

PROTECTED: TypeRegistry[tuple[str, ...]] = TypeRegistry("protected-layer default")


def register_protected(model_types: type | Sequence[type], patterns: Sequence[str]) -> None:
    """Protect ``patterns`` by default in models of ``model_types`` (and their subclasses).

    Example: ``register_protected(MyNet, ["stem", "stages.0", "head"])``.
    """
    types = (model_types,) if isinstance(model_types, type) else tuple(model_types)
    PROTECTED.add(types, tuple(patterns))


def default_protected(model: nn.Module) -> tuple[str, ...]:
    """Default protected patterns for ``model``: its family's, else timm's first conv and classifier."""
    found = PROTECTED.find(model)
    if found is not None:
        return found
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    named = [cfg.get("first_conv"), cfg.get("classifier")]
    return tuple(p for p in named if isinstance(p, str))


def _register_timm_models() -> None:
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    register_protected((EfficientNet, MobileNetV3), ("conv_stem", "blocks.0", "conv_head"))
    register_protected(ResNet, ("conv1", "layer1"))  # the head is the classifier, whose outputs are never pruned


_register_timm_models()
