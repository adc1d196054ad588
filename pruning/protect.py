"""Which layers are never pruned by default: the stem, the first stage and the head, as in the paper.

Defaults are looked up by the timm model class; a new family adds its patterns to ``_DEFAULTS``. Patterns name a
module, a parent module (``blocks.0`` protects every layer under it) or a glob.
"""
from __future__ import annotations

from torch import nn

_DEFAULTS: dict[str, tuple[str, ...]] = {
    "EfficientNet": ("conv_stem", "blocks.0", "conv_head"),
    "MobileNetV3": ("conv_stem", "blocks.0", "conv_head"),
    "ResNet": ("conv1", "layer1"),  # the head is the classifier, whose outputs are never pruned anyway
}


def default_protected(model: nn.Module) -> tuple[str, ...]:
    """Default protected patterns for ``model``: its family's, else timm's first conv and classifier."""
    for cls in type(model).__mro__:
        if cls.__name__ in _DEFAULTS:
            return _DEFAULTS[cls.__name__]
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    found = [cfg.get("first_conv"), cfg.get("classifier")]
    return tuple(p for p in found if isinstance(p, str))
