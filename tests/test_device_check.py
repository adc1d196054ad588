"""benchmarks/device_check.py in its CPU mode: every section runs its code path at tiny sizes and passes, the
CUDA-only parts are named as skipped, and a failing section is reported (exit 1) without stopping the others."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")


def _run(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "device_check.json"
    # no shared data: the app section must run on its own synthetic folders, as on a bare GPU machine
    env = {**os.environ, "KP_SHARED_DATA": str(tmp_path / "no-shared-data"), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--out", str(out), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("device_check"))


def test_every_section_passes_on_cpu(tiny):
    proc, report = tiny
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == ["finetune", "throughput", "step_costs", "app", "latency"]
    assert all(s["status"] == "passed" for s in sections.values())
    assert "| section | status | seconds | result |" in proc.stdout
    if not torch.cuda.is_available():  # the CUDA parts are named, with why
        for name in ("finetune", "throughput", "app", "latency"):
            assert sections[name]["skipped"] and "CUDA" in sections[name]["skipped"][0]


def test_finetune_is_interrupted_and_resumed_with_finite_losses(tiny):
    modes = {s["name"]: s for s in tiny[1]["sections"]}["finetune"]["details"]["modes"]
    assert set(modes) == {"fp32", "bf16"}
    for mode in modes.values():
        assert mode["resumed_from"] == 2 and mode["steps"] == 4 and mode["projections"] > 0
        assert math.isfinite(mode["first_loss"]) and math.isfinite(mode["last_loss"])
    assert modes["bf16"]["channels_last"] and modes["bf16"]["amp"] == "bf16"


def test_throughput_and_app_report_what_ran(tiny):
    sections = {s["name"]: s for s in tiny[1]["sections"]}
    rows = sections["throughput"]["details"]["models"]
    assert rows["dense b1"]["vs_dense"] == 1.0
    assert rows["timm b1_pruned"]["macs"] < rows["dense b1"]["macs"] and rows["ours"]["macs"] < rows["dense b1"]["macs"]
    app = sections["app"]["details"]
    assert app["distributed"] == {"processes": 1, "backend": "gloo", "device": "cpu"}  # torchrun's group of one
    assert app["finetune_steps"] == 2 and app["data"] == "synthetic"


def test_a_failing_section_is_reported_and_the_rest_still_run(tmp_path):
    proc, report = _run(tmp_path, "--sections", "app", "throughput", "--data-dir", str(tmp_path / "missing"))
    assert proc.returncode == 1
    app, throughput = report["sections"]
    assert app["status"] == "failed" and "the app exited" in app["error"]
    assert "missing" in app["details"]["log_tail"]  # the app's own message names the data folder it refused
    assert throughput["status"] == "passed"
