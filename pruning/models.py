"""Creating timm models by name, with clear errors for unknown names and local weight files."""
from __future__ import annotations

import difflib
import hashlib
from typing import Any, Mapping

import timm
import torch
from torch import nn

from ._io import read_torch_file
from .errors import UserInputError
from .lite_packages import package_model


def check_model_name(name: str) -> None:
    """Raise a :class:`UserInputError` naming ``name`` and close timm names when timm does not know it."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean one of {close}?" if close else ""
    raise UserInputError(f"unknown timm model {name!r}.{hint} `timm.list_models('*pattern*')` lists the valid names.")


def create_model(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """Create timm model ``name`` (eval mode), optionally loading a local state_dict file strictly.

    Args:
        name: timm model name.
        pretrained: download timm's weights (needs the hub; use ``checkpoint`` offline).
        checkpoint: path of a state_dict (or a dict holding one under ``state_dict``/``model``).
        **kwargs: passed to ``timm.create_model``.

    Raises:
        UserInputError: an unknown name, or a checkpoint that is missing, unreadable, of another architecture
            or holding NaN/inf (the message names the first offending key).
    """
    check_model_name(name)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        check_state_dict(model, state, f"model.checkpoint {checkpoint!r}",
                         f"give a state_dict of timm's {name!r} (model.name={name}) or set model.name to its model")
        model.load_state_dict(state, strict=True)
    return model.eval()


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path``, with an error naming the path if it is missing, corrupt or not one."""
    fix = "pass an existing torch state_dict file (model.checkpoint=/path/to/weights.pth)"
    obj = read_torch_file(path, "checkpoint", fix)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserInputError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state_dict (names -> tensors), "
                             f"nor a dict with one under 'state_dict', 'model' or 'state_dict_ema'; {fix}")
    return dict(obj)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    """Check that ``state`` loads strictly into ``model`` and holds finite values only.

    Args:
        model: the model the weights are for.
        state: the weights (names -> tensors).
        what: the weights as the user knows them, e.g. ``"model.checkpoint '/w.pth'"``.
        fix: what to do about a mismatch (the non-finite case says its own fix).

    Raises:
        UserInputError: naming the first key (in the model's order) that is missing or of another shape, else the
            first key the model does not have, else the first tensor holding NaN or inf.
    """
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise UserInputError(f"{what} does not fit {type(model).__name__}: it has no {key!r} "
                                 f"(shape {tuple(ref.shape)}); the weights are of another architecture. {fix}")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise UserInputError(f"{what} does not fit {type(model).__name__}: {key!r} has shape "
                                 f"{tuple(state[key].shape)}, the model's is {tuple(ref.shape)}. {fix}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise UserInputError(f"{what} does not fit {type(model).__name__}: the model has no {unexpected[0]!r} "
                             f"({len(unexpected)} unexpected keys); the weights are of another architecture. {fix}")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserInputError(f"{what} holds NaN or inf values, first in {key!r}; the weights are broken (a "
                                 "diverged training run or a damaged file): use an earlier or another checkpoint")


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
    if package_model(name, checkpoint) is not None:
        from .lite_packages import lite_state_dict_path

        lite_state_dict_path(name)
    elif checkpoint is not None:
        load_state_dict(checkpoint)
    elif pretrained and not _hub_weights_reachable(name):
        raise UserInputError(
            f"the pretrained weights of {name!r} are not in the local cache and timm's weight hub cannot be reached. "
            "Give a local state_dict with model.checkpoint=/path/to/weights.pth, or model.pretrained=false to "
            "start from random init (enough for the search stages with a data-free criterion such as importance=l1)"
        )


def load_parent(name: str, pretrained: bool, checkpoint: str | None, seed: int = 0) -> nn.Module:
    """The unpruned parent: timm's weights, a local state_dict, or a Lite0/1/2 package's weights.

    Its random initialisation (the weights themselves with ``pretrained=false``) is drawn from ``seed`` without
    touching the global random state: the same command gives the same parent, hence the same channels.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if package_model(name, checkpoint) is not None:
            from .lite_packages import load_pretrained_lite

            return load_pretrained_lite(name)
        return create_model(name, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint)


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter and buffer (names, shapes, values): what keys caches of anything computed
    from these weights (importance scores, the teacher's accuracy), whatever config produced them."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
