"""Sweeps: one flat directory per run whatever the override values, and a summary that labels runs by what
differs and names the runs that have not finished."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pruning import artifacts
from pruning.summarize import INCOMPLETE_EXIT, collect, main as summarize
from pruning.sweep import NAME_BYTES, differing, launched_jobs, run_dirname

ROOT = Path(__file__).resolve().parents[1]


def test_run_dirname_is_one_path_component_whatever_the_values():
    name = run_dirname(["data.val_root=/data/imagenet-val-1300", "budget.target=0.5", "paths.cache_dir=/c"],
                       exclude_keys=["paths.cache_dir"])
    assert name.startswith("budget.target=0.5,data.val_root=imagenet-val-1300~") and "/" not in name
    pools = run_dirname(["data.train_roots=[/a/pool1,/b/pool2]", "model.checkpoint='/w/x.pth'"])
    assert pools.startswith("data.train_roots=[pool1,pool2]~") and ",model.checkpoint='x.pth'~" in pools
    assert run_dirname(["budget.target=0.5", "stages=[importance,solve]"]) == "budget.target=0.5,stages=[importance,solve]"
    # the same last component in two folders: two names
    assert run_dirname(["data.val_root=/a/val"]) != run_dirname(["data.val_root=/b/val"])
    assert "\\" not in run_dirname(["model.checkpoint=C:\\w\\x.pth"])
    long = [f"data.train_roots=[{','.join(f'/data/pool{i:03d}' for i in range(60))}]"]
    assert len(run_dirname(long).encode()) == NAME_BYTES and run_dirname(long) != run_dirname(long[0][:-2] + "9]")


def test_differing_overrides_label_the_runs():
    runs = [["model.name=resnet18", "budget.target=0.5"], ["model.name=resnet18", "budget.target=0.7"],
            ["model.name=resnet18", "budget.target=0.7", "+budget.limits.channels=0.5"]]
    assert differing(runs) == ["budget.target=0.5", "budget.target=0.7", "budget.target=0.7,+budget.limits.channels=0.5"]
    assert differing([["a=1", "b=2"]]) == ["a=1,b=2"]  # one run: all of its overrides


def test_launched_jobs_expand_the_sweepers_params_and_the_command_line(tmp_path):
    OmegaConf.save({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                          "max_batch_size": None, "params": {"budget.target": "0.3,0.4"}},
                              "overrides": {"task": ["seed=0,1", "model.pretrained=false"]}}},
                   tmp_path / "multirun.yaml")
    jobs = launched_jobs(str(tmp_path))
    assert len(jobs) == 4 and jobs[0] == ["budget.target=0.3", "seed=0", "model.pretrained=False"]  # as Hydra writes them
    assert launched_jobs(str(tmp_path / "nowhere")) is None


def _sweep(tmp_path, *overrides):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "pruning.run", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "model.name=resnet18",
           "model.img_size=32", "model.pretrained=false", "importance=l1", "logger=none", "stages=[importance,solve]",
           f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "sweep"


def test_a_sweep_with_path_values_has_one_flat_directory_per_run_and_a_summary_that_names_unfinished_runs(
        tmp_path, capsys):
    val = tmp_path / "deep" / "folders" / "imagenet-val-1300"
    sweep = _sweep(tmp_path, "budget.target=0.5,0.7", f"data.val_root={val}")
    reports = sorted(sweep.glob("**/" + artifacts.REPORT))
    assert len(reports) == 2 and all(r.parent.parent == sweep for r in reports)  # one level deep
    names = sorted(r.parent.name for r in reports)
    assert names[0].startswith("0_budget.target=0.5,data.val_root=imagenet-val-1300~")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == names

    assert summarize([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("All 2 runs finished.") and "| budget.target=0.5 |" in out and "| budget.target=0.7 |" in out
    assert "data.val_root" not in out.split("\n| run |")[1]  # what every run shares is not repeated

    # the launcher returned early: one job still running (its report lacks the final section), one not started
    running = json.loads(reports[0].read_text())
    del running["run"]
    reports[0].write_text(json.dumps(running))
    for f in sorted(reports[1].parent.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    reports[1].parent.rmdir()
    assert summarize([str(sweep)]) == INCOMPLETE_EXIT
    captured = capsys.readouterr()
    assert captured.out.startswith("**Incomplete: 0 of 2 runs finished.**")
    assert "- `budget.target=0.5`: running or failed" in captured.out and f"(`{names[0]}`)" in captured.out
    assert "- `budget.target=0.7`: not started: no run directory yet" in captured.out
    assert "2 of 2 runs have not finished: budget.target=0.5, budget.target=0.7" in captured.err
    rows = collect(str(sweep))
    assert [r["status"] for r in rows] == ["running or failed: report.json lacks its final section (see run.log)",
                                           "not started: no run directory yet"]
    assert "not started" in (sweep / "summary.csv").read_text()
    # a folder of sweeps: each sweep's unfinished runs are named too
    assert [r["status"] for r in collect(str(tmp_path))] == [r["status"] for r in rows]
