"""Checkpoints of a fine-tuning run: written atomically by rank 0, read back with ``weights_only=True``.

A checkpoint holds everything that decides what happens next: the student and its projections, the
optimiser, scheduler, EMA and grad-scaler states, the position (epoch, batch in epoch, update count), the
history, the configs, and every rank's random state (torch, CUDA, numpy, python). The data order needs no
generator state of its own: it is a function of ``(seed, epoch)`` and the position (:mod:`distill.data`).
Random states are stored as tensors and plain numbers, so loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from pruning._io import atomic_torch_save, read_torch_file
from pruning.errors import UserInputError

LAST = "last.pth"
# fields that may change between a run and its resumption without changing its result
RESUMABLE_CHANGES = {"workers", "log_every", "checkpoint_every_steps", "checkpoint_minutes"}


def rng_state() -> dict[str, Any]:
    """This process's random states in a weights_only-loadable form."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    atomic_torch_save(state, path)


def load_checkpoint(path: str) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none."""
    if not os.path.isfile(path):
        return None
    return read_torch_file(path, "checkpoint", "delete it to start the run afresh")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Raise a :class:`~pruning.errors.UserInputError` naming every config field that differs from the
    checkpoint's (a different run). A saved field the current config does not have (a setting another loss
    reads, or one of an older version's flat loss config) cannot change this run's result and is not compared."""
    diffs = [f"{section}.{k}: {v!r} -> {current[section][k]!r}"
             for section in current for k, v in saved.get(section, {}).items()
             if k not in RESUMABLE_CHANGES and k in current[section] and current[section][k] != v]
    if diffs:
        raise UserInputError(f"{path} belongs to a run with another configuration ({'; '.join(diffs)}); "
                         "use a new output folder or delete the checkpoint")
