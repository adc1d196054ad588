"""Files of a run: report.json, the pruned model (timm format, this framework's checkpoint, ONNX), solutions.

Everything is written atomically, so an interrupted run never leaves a half-written artifact behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import torch
from torch import nn

from ._io import atomic_torch_save, atomic_write_text
from .export import export_onnx
from .timm_spec import SpecUnsupportedError, save_timm_format

REPORT = "report.json"
SPEC = "pruned_spec.txt"
STATE_DICT = "pruned.pth"
CHECKPOINT = "pruned_checkpoint.pth"
ONNX = "pruned.onnx"
SOLUTION = "solution.json"


def config_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
                stage: str) -> tuple[list[str], str | None]:
    """Write the pruned model as timm spec + state_dict, this framework's checkpoint and ``pruned.onnx``.

    The ONNX file (dynamic batch, ``img_size`` fixed) is exported from a CPU eval copy, so ``model`` may be on
    any device or in train mode. timm's spec cannot express removed blocks: then the spec files are not
    written (stale ones are deleted) and the reason is returned; the other formats always are.

    Returns:
        ``(files written, why the timm spec was not written or None)``.
    """
    spec, weights, ckpt, onnx_path = (os.path.join(run_dir, f) for f in (SPEC, STATE_DICT, CHECKPOINT, ONNX))
    files, skipped = [], None
    try:
        save_timm_format(model, spec, weights)
        files += [spec, weights]
    except SpecUnsupportedError as e:
        skipped = str(e)
        for stale in (spec, weights):
            if os.path.isfile(stale):
                os.remove(stale)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"base_model": base_model, "img_size": img_size, "keep": dict(keep), "stage": stage,
                       "state_dict": state}, ckpt)
    export_onnx(model, onnx_path, img_size)
    return files + [ckpt, onnx_path], skipped


def load_pruned(path: str, parent: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a pruned model from this framework's checkpoint; returns ``(model, checkpoint metadata)``.

    Args:
        path: a ``pruned_checkpoint.pth``.
        parent: the unpruned model to cut from (default: a fresh timm model of the recorded base).
    """
    from .graph import build_channel_graph
    from .models import create_model, read_torch_file
    from .prune import prune_model

    ckpt = read_torch_file(path, "pruned checkpoint", "(re)run the prune stage to write it")
    parent = parent if parent is not None else create_model(ckpt["base_model"])
    graph = build_channel_graph(parent, ckpt["img_size"])
    model = prune_model(parent, graph, ckpt["keep"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}
