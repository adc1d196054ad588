"""Files of a run: report.json, the pruned model (timm format, this framework's checkpoint, ONNX), solutions.

Everything is written atomically, so an interrupted run never leaves a half-written artifact behind.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from torch import nn

from ._io import atomic_torch_save, atomic_write_text, read_torch_file
from .errors import UserInputError
from .export import export_onnx
from .timm_spec import SpecUnsupportedError, save_timm_format

REPORT = "report.json"
SPEC = "pruned_spec.txt"
STATE_DICT = "pruned.pth"
CHECKPOINT = "pruned_checkpoint.pth"
ONNX = "pruned.onnx"
SOLUTION = "solution.json"


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def update_report(run_dir: str, section: str, values: Mapping[str, Any]) -> dict:
    """Merge ``values`` into ``section`` of the run's report.json (kept across resumed and partial runs)."""
    path = os.path.join(run_dir, REPORT)
    report = read_json(path) if os.path.isfile(path) else {}
    report[section] = {**report.get(section, {}), **values}
    write_json(path, report)
    return report


def save_pruned(model: nn.Module, run_dir: str, base_model: str, img_size: int, keep: Mapping[str, list[int]],
                stage: str, protected: Sequence[str] | None = None,
                bn_recalibrated_images: int | None = None) -> tuple[list[str], str | None]:
    """Write the pruned model as timm spec + state_dict, this framework's checkpoint and ``pruned.onnx``.

    The checkpoint holds what :func:`load_pruned` needs to cut the same model from the parent again: the kept
    channels and the protected-layer patterns the channel graph was built with (``protected``: the graph's
    ``protected_patterns``; None records the model's defaults). ``bn_recalibrated_images``: how many images its
    BN statistics were re-estimated on after pruning (0: not at all); None (a model pruned elsewhere) lets the
    app's fine-tuning recalibrate it first, as its prune stage would have.

    The ONNX file (dynamic batch, ``img_size`` fixed) is exported from a CPU eval copy, so ``model`` may be on
    any device or in train mode. timm's spec cannot express removed blocks: then the spec files are not
    written (stale ones are deleted) and the reason is returned; the other formats always are.

    Returns:
        ``(files written, why the timm spec was not written or None)``.
    """
    spec, weights, ckpt, onnx_path = (os.path.join(run_dir, f) for f in (SPEC, STATE_DICT, CHECKPOINT, ONNX))
    files, skipped = [], None
    try:
        save_timm_format(model, spec, weights, base_model)
        files += [spec, weights]
    except SpecUnsupportedError as e:
        skipped = str(e)
        for stale in (spec, weights):
            if os.path.isfile(stale):
                os.remove(stale)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"base_model": base_model, "img_size": img_size, "keep": dict(keep), "stage": stage,
                       "protected": None if protected is None else list(protected),
                       "bn_recalibrated_images": bn_recalibrated_images, "state_dict": state}, ckpt)
    export_onnx(model, onnx_path, img_size)
    return files + [ckpt, onnx_path], skipped


def load_pruned(path: str, parent: nn.Module | None = None, base_model: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a pruned model from this framework's checkpoint; returns ``(model, checkpoint metadata)``.

    Args:
        path: a ``pruned_checkpoint.pth``.
        parent: the unpruned model to cut from (default: a fresh timm model of the recorded base).
        base_model: the timm name of ``parent``, when known: a checkpoint cut from another model is refused.

    Raises:
        UserInputError: the file is missing, unreadable or not such a checkpoint, was cut from another model, or
            holds weights that do not fit the model it describes (naming the first mismatching key or group) or
            that are NaN/inf.
    """
    from .graph import build_channel_graph
    from .models import check_state_dict, create_model
    from .prune import prune_model

    fix = "(re)run the prune stage to write it"
    ckpt = read_torch_file(path, "pruned checkpoint", fix)
    needed = ("base_model", "img_size", "keep", "state_dict")
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserInputError(f"pruned checkpoint {path!r} is not one of this framework's (no {missing}); {fix} or "
                             "write it with pruning.artifacts.save_pruned")
    if base_model is not None and ckpt["base_model"] != base_model:
        raise UserInputError(f"pruned checkpoint {path!r} was cut from {ckpt['base_model']!r}, not from this run's "
                             f"model {base_model!r}; set model.name={ckpt['base_model']} or use another run directory")
    parent = parent if parent is not None else create_model(ckpt["base_model"])
    graph = build_channel_graph(parent, ckpt["img_size"], ckpt.get("protected"))  # older checkpoints: defaults
    try:
        model = prune_model(parent, graph, ckpt["keep"])
    except (KeyError, ValueError) as e:  # prune_model's checks of the kept channels, naming the group
        raise UserInputError(f"pruned checkpoint {path!r} does not fit {ckpt['base_model']!r}: "
                             f"{e.args[0] if e.args else e}; {fix}") from e
    check_state_dict(model, ckpt["state_dict"], f"pruned checkpoint {path!r}", fix)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}
