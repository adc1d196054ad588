"""Same command, same channels: a random-init parent is drawn from ``seed``, and cached scores are keyed by the
parent's weights, so two fresh processes choose identical channels (issue 16, item 8)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from pruning.models import load_parent, weights_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _solve(tmp_path, name: str, *overrides: str) -> dict:
    run_dir = tmp_path / name
    cmd = [sys.executable, "-m", "pruning.run", "model.name=lcnet_050", "model.img_size=64", "budget.target=0.6",
           "model.pretrained=false", "importance=l1", "stages=[importance,solve]", "logger=none",
           f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / (name + '-cache')}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "solution.json").read_text())


def test_two_fresh_processes_choose_the_same_channels(tmp_path):
    first, second = _solve(tmp_path, "a"), _solve(tmp_path, "b")  # separate caches: nothing is shared
    assert first["keep"] == second["keep"] and first["costs"] == second["costs"]
    assert _solve(tmp_path, "c", "seed=1")["keep"] != first["keep"]  # the seed draws the parent


def test_the_parent_is_drawn_from_the_seed_without_touching_the_global_state():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = (weights_fingerprint(load_parent("lcnet_050", False, None, seed)) for seed in (0, 0, 1))
    assert a == b != c
    assert torch.equal(torch.get_rng_state(), state)
