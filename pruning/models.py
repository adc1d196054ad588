"""Creating timm models by name, with clear errors for unknown names and local weight files."""
from __future__ import annotations

import difflib
import os
from typing import Any

import timm
import torch
from torch import nn


def check_model_name(name: str) -> None:
    """Raise a ValueError naming ``name`` and close timm names when timm does not know it."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ValueError(f"unknown timm model {name!r}.{hint} `timm.list_models('*pattern*')` lists the valid names.")


def create_model(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """Create timm model ``name`` (eval mode), optionally loading a local state_dict file strictly.

    Args:
        name: timm model name.
        pretrained: download timm's weights (needs the hub; use ``checkpoint`` offline).
        checkpoint: path of a state_dict (or a dict holding one under ``state_dict``/``model``).
        **kwargs: passed to ``timm.create_model``.
    """
    check_model_name(name)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        model.load_state_dict(load_state_dict(checkpoint), strict=True)
    return model.eval()


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path``, with an error naming the path if it is missing or corrupt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass an existing state_dict file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} could not be read ({e}); is it a torch state_dict file?") from e
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj
