"""timm's pruned-architecture format: export our pruned models, import timm's published ones.

timm describes a pruned model by one line ``key:[shape]***key:[shape]...`` listing the shape of every
state_dict entry (``timm/models/_pruned/*.txt``); ``timm.models._prune.adapt_model_from_string`` rebuilds
the layers from it. A pruned model saved as spec + state_dict therefore loads with timm alone::

    model = timm.create_model("efficientnet_b1")
    model = adapt_model_from_string(model, open("pruned_spec.txt").read().strip())
    model.load_state_dict(torch.load("pruned.pth"), strict=True)

A model with removed residual blocks (:mod:`pruning.blocks`) has no such spec: the spec lists state_dict
shapes, and timm's adapter can only resize layers, not drop a block. Those models raise
:class:`SpecUnsupportedError`.
"""
from __future__ import annotations

import importlib.resources
import os
import re
from collections import Counter
from typing import Mapping

from torch import nn

from ._io import atomic_torch_save, atomic_write_text, read_torch_file
from .blocks import removed_blocks
from .errors import UserInputError
from .graph import ChannelGraph
from .layers import is_grouped
from .splits import resized_modules

SEPARATOR = "***"
_ENTRY = re.compile(r"^([\w.\-]+):\[([\d,\s]*)\]$")


class SpecUnsupportedError(UserInputError):
    """The model cannot be written as a timm pruned spec (removed blocks, grouped convs, resized channel splits, a
    layer timm's adapter does not resize); other formats hold it."""


def _unsupported(why: str) -> SpecUnsupportedError:
    return SpecUnsupportedError(f"{why}, so no timm-format files were written. pruned_checkpoint.pth (load it with "
                                "pruning.artifacts.load_pruned) and the ONNX file hold this model.")


def check_spec_expressible(model: nn.Module) -> None:
    """Raise :class:`SpecUnsupportedError` when ``model`` has removed blocks, grouped convs or resized channel cuts
    (:mod:`pruning.splits`), naming them.

    Detected from the model itself (the replacement modules carry a marker), so any pruned model is checked
    the same way whatever produced it.
    """
    names = removed_blocks(model)
    grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and is_grouped(m)]
    resized = resized_modules(model)
    if names:
        why = (f"the model has {len(names)} removed residual block(s) ({', '.join(names)}); timm's pruned spec lists "
               "state_dict shapes and cannot express a removed block")
    elif grouped:
        why = (f"the model has {len(grouped)} grouped conv(s) (e.g. {grouped[0]!r}); timm's pruned spec rebuilds "
               "every conv with groups > 1 as a depthwise one, so it cannot express them")
    elif resized:
        why = (f"{len(resized)} module(s) cut their channels at sizes pruning changed (e.g. {resized[0]!r}); timm's "
               "pruned spec only resizes layers, so those modules would keep their old split sizes")
    else:
        return
    raise _unsupported(why)


def spec_from_model(model: nn.Module) -> str:
    """The one-line timm spec of ``model``: every state_dict key with its shape.

    Raises:
        SpecUnsupportedError: the model has removed blocks, grouped convs or resized channel splits.
    """
    check_spec_expressible(model)
    return SEPARATOR.join(f"{k}:{list(v.shape)}" for k, v in model.state_dict().items())


def parse_spec(text: str) -> dict[str, list[int]]:
    """Parse a timm spec into ``{state_dict key: shape}``; a malformed entry raises ValueError naming it."""
    shapes = {}
    for entry in text.strip().split(SEPARATOR):
        m = _ENTRY.match(entry.strip())
        if m is None:
            raise ValueError(
                f"malformed timm spec entry {entry[:80]!r}: expected 'key:[d0, d1, ...]' entries joined by "
                f"'{SEPARATOR}' (the format of timm/models/_pruned/*.txt)"
            )
        dims = m.group(2).strip()
        shapes[m.group(1)] = [int(d) for d in dims.split(",")] if dims else []
    return shapes


def read_spec(path: str) -> str:
    """Read and validate a spec file; returns its text."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"spec file {path!r} does not exist")
    with open(path) as f:
        text = f.read().strip()
    parse_spec(text)
    return text


def timm_shipped_spec(pruned_name: str) -> str:
    """The spec timm ships for one of its pruned models, e.g. ``efficientnet_b1_pruned``."""
    resource = importlib.resources.files("timm.models") / "_pruned" / f"{pruned_name}.txt"
    if not resource.is_file():
        raise ValueError(f"timm ships no pruned spec named {pruned_name!r}")
    return resource.read_text().strip()


def adapt_to_spec(model: nn.Module, spec: str) -> nn.Module:
    """Rebuild ``model``'s layers to the widths in ``spec`` with timm's own adapter (random weights)."""
    from timm.models._prune import adapt_model_from_string

    shapes = parse_spec(spec)
    missing = set(model.state_dict()) - set(shapes)
    if missing:
        raise ValueError(f"spec does not describe this model: {len(missing)} keys missing, e.g. {sorted(missing)[:3]}")
    return adapt_model_from_string(model, spec)


def save_timm_format(model: nn.Module, spec_path: str, state_dict_path: str, base_model: str | None = None) -> None:
    """Write ``model`` as a timm spec file and a state_dict file, each atomically.

    Args:
        model: the pruned model.
        spec_path, state_dict_path: where to write.
        base_model: the timm name it was cut from: timm's adapter is then run on a fresh one, and the spec is
            written only if it rebuilds every layer at the pruned shape (the adapter resizes convs, norms and the
            classifier's input, not a hidden ``Linear``'s outputs: ConvNeXt's MLP).

    Raises:
        SpecUnsupportedError: the model has removed blocks, grouped convs or resized channel splits, or timm's
            adapter would rebuild a layer at another shape; nothing is written.
    """
    spec = spec_from_model(model)  # checks that the spec can express the model
    if base_model is not None:
        _check_adapter_rebuilds(model, base_model, spec)
    atomic_write_text(spec_path, spec + "\n")
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, state_dict_path)


def _check_adapter_rebuilds(model: nn.Module, base_model: str, spec: str) -> None:
    import timm

    rebuilt = adapt_to_spec(timm.create_model(base_model), spec).state_dict()
    wrong = next((k for k, v in model.state_dict().items() if k in rebuilt and rebuilt[k].shape != v.shape), None)
    if wrong is not None:
        raise _unsupported(
            f"timm's pruned-spec adapter rebuilds {wrong!r} at {list(rebuilt[wrong].shape)}, not at the pruned "
            f"{list(model.state_dict()[wrong].shape)} (it resizes convs, norms and the classifier's input only)")


def load_timm_format(base_model: str, spec_path: str, state_dict_path: str) -> nn.Module:
    """Rebuild a pruned model with timm alone: create ``base_model``, adapt it to the spec, load strictly."""
    import timm
    from timm.models._prune import adapt_model_from_string

    model = timm.create_model(base_model)
    model = adapt_model_from_string(model, read_spec(spec_path))
    state = read_torch_file(state_dict_path, "pruned state_dict", "write it with save_timm_format")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _member_width(shapes: Mapping[str, list[int]], module: str, role: str) -> int:
    key = f"{module}.weight"
    if key not in shapes:
        raise ValueError(f"spec has no entry {key!r}; it was made for another architecture")
    return shapes[key][1 if role == "in" else 0]


def widths_from_spec(graph: ChannelGraph, spec: str) -> dict[str, int]:
    """Per-group widths of a pruned model described by ``spec`` (a timm spec of ``graph``'s architecture).

    Raises:
        ValueError: the spec does not fit the groups (members of a group disagree, or a fixed group
            changed width), naming the group and layers.
    """
    shapes = parse_spec(spec)
    # a layer side holding several groups (concatenated channels) gives only their sum: not used
    sides = Counter((m.module, m.role == "in") for g in graph.groups.values() for m in g.members)
    widths = {}
    for name, group in graph.groups.items():
        found = {m.module + (":in" if m.role == "in" else ""): _member_width(shapes, m.module, m.role)
                 for m in group.members if sides[m.module, m.role == "in"] == 1}
        values = set(found.values())
        if len(values) > 1:
            raise ValueError(f"spec gives group {name!r} inconsistent widths across its layers: {found}")
        width = values.pop() if values else group.width
        if width != group.width and not group.prunable:
            raise ValueError(f"spec changes group {name!r} ({group.reason}) from {group.width} to {width}")
        widths[name] = width
    return widths
