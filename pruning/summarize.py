"""Summarise a sweep: every run's report.json under a folder into one table (markdown + CSV) and plots.

    python -m pruning.summarize multirun/2026-11-25_10-00-00 [--out DIR]

Runs are labelled by the overrides that differ across the sweep (``budget.target=0.5``). A sweep's folder
records every run it launched (``multirun.yaml``), so a run that has not finished (not started, still running,
or failed: no ``report.json``, or one without its final section) is named, never silently left out: the summary
then says the sweep is incomplete, and the command exits with code 3 (0: every run finished; 2: no runs).
A SLURM launcher can return before its last job ends (without SLURM accounting, its status checks guess).
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from typing import Sequence

from .artifacts import REPORT, read_json
from .plots import plot_against_macs
from .sweep import MULTIRUN, OVERRIDES, differing, launched_jobs, run_overrides

COLUMNS = ["run", "model", "img_size", "budget", "target_macs", "macs_after", "achieved_over_target", "params_after",
           "method", "gap", "student_top1", "student_top5", "teacher_top1", "student_images_per_s",
           "teacher_images_per_s"]
CSV_COLUMNS = COLUMNS + ["status", "dir"]
FINISHED = "finished"
INCOMPLETE_EXIT = 3  # the summary was written, but some runs have not finished


def _row(r: dict) -> dict:
    model, budget, solve = r.get("model", {}), r.get("budget", {}), r.get("solve", {})
    val = r.get("validate", {})
    student, teacher = val.get("student", {}), val.get("teacher", {})
    method = f"{r.get('importance', {}).get('criterion', '?')}+{solve.get('solver', '?')}"
    if "finetune" in r:
        method += f"+{r['finetune'].get('method')}"
    return {"model": model.get("name"),
            "img_size": model.get("img_size"), "budget": budget.get("spec"), "target_macs": budget.get("target_macs"),
            "macs_after": model.get("macs_after"), "achieved_over_target": model.get("achieved_over_target"),
            "params_after": model.get("params_after"), "method": method, "gap": solve.get("gap"),
            "student_top1": student.get("top1"), "student_top5": student.get("top5"), "teacher_top1": teacher.get("top1"),
            "student_images_per_s": student.get("images_per_s"), "teacher_images_per_s": teacher.get("images_per_s")}


def _status(run_dir: str | None) -> tuple[str, dict | None]:
    """``(finished, the report)``, or ``(why not, None)``: the run's report is written stage by stage, its ``run``
    section last."""
    if run_dir is None:
        return "not started: no run directory yet", None
    path = os.path.join(run_dir, REPORT)
    if not os.path.isfile(path):
        return f"no {REPORT} yet", None
    report = read_json(path)
    if "run" not in report:
        return f"running or failed: {REPORT} lacks its final section (see run.log)", None
    return FINISHED, report


def _run_dirs(root: str) -> list[str]:
    """Every folder under ``root`` (any depth, ``root`` itself included) that Hydra ran a job in or that holds a
    report."""
    found = {os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", REPORT), recursive=True)}
    found |= {os.path.dirname(os.path.dirname(p)) for p in glob.glob(os.path.join(root, "**", OVERRIDES), recursive=True)}
    return sorted(os.path.normpath(d) for d in found)


def _runs(root: str) -> list[tuple[str | None, list[str]]]:
    """(run directory or None, overrides) of every run under ``root``: the jobs of every sweep there (a folder
    holding ``multirun.yaml``), in job order (None: the job's directory does not exist yet), then any other run
    directory found."""
    dirs = {d: run_overrides(d) for d in _run_dirs(root)}
    runs, matched = [], set()
    for sweep in sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", MULTIRUN), recursive=True)):
        sweep = os.path.normpath(sweep)
        inside = [d for d, o in dirs.items() if o is not None and (os.path.dirname(d) + os.sep).startswith(sweep + os.sep)]
        mine = {tuple(dirs[d]): d for d in inside}
        for job in launched_jobs(sweep) or []:
            runs.append((mine.get(tuple(job)), job))
            matched.add(runs[-1][0])
    return runs + [(d, o or []) for d, o in dirs.items() if d not in matched]


def collect(root: str) -> list[dict]:
    """One row per run under ``root``: finished runs first, sorted by method and achieved MACs, then the runs
    that have not finished (``status`` says why; no metrics). ``run`` is the overrides that differ across the
    runs (the directory when they are the same)."""
    runs = _runs(os.path.normpath(root))
    rows = []
    for (run_dir, _), label in zip(runs, differing([o for _, o in runs])):
        status, report = _status(run_dir)
        where = os.path.relpath(run_dir, root) if run_dir is not None else ""
        row = _row(report) if report is not None else {c: None for c in COLUMNS}
        rows.append(row | {"run": label or where, "status": status, "dir": where})
    done = sorted((r for r in rows if r["status"] == FINISHED), key=lambda r: (r["method"], r["macs_after"] or 0))
    return done + [r for r in rows if r["status"] != FINISHED]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def to_markdown(rows: list[dict]) -> str:
    """The finished runs' table, after a line saying whether every run finished and, if not, which did not."""
    done = [r for r in rows if r["status"] == FINISHED]
    waiting = [r for r in rows if r["status"] != FINISHED]
    if waiting:
        lines = [f"**Incomplete: {len(done)} of {len(rows)} runs finished.** Not finished:", ""]
        lines += [f"- `{r['run']}`: {r['status']}" + (f" (`{r['dir']}`)" if r["dir"] else "") for r in waiting]
        lines.append("")
    else:
        lines = [f"All {len(rows)} runs finished.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in done]
    return "\n".join(lines) + "\n"


def write_summary(root: str, out: str | None = None) -> list[str]:
    """Write summary.md, summary.csv and the plots into ``out`` (default ``root``); returns the files.

    Raises:
        FileNotFoundError: ``root`` holds no run (no report, no run directory, no sweep record).
    """
    files, _ = _write(root, out)
    return files


def _write(root: str, out: str | None) -> tuple[list[str], list[dict]]:
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no {REPORT} under {root!r}: point at a sweep folder (multirun/<date>)")
    out = out or root
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, "summary.md"), os.path.join(out, "summary.csv")]
    with open(files[0], "w") as f:
        f.write(to_markdown(rows))
    with open(files[1], "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    done = [r for r in rows if r["status"] == FINISHED]
    plots = [plot_against_macs(done, "student_top1", "student top-1 (%)", os.path.join(out, "accuracy_vs_macs.png"), "accuracy"),
             plot_against_macs(done, "student_images_per_s", "images/s", os.path.join(out, "speed_vs_macs.png"), "throughput")]
    return files + [p for p in plots if p], rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pruning.summarize", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="a folder holding run directories (a Hydra multirun folder)")
    ap.add_argument("--out", default=None, help="where to write the table and plots (default: root)")
    args = ap.parse_args(argv)
    try:
        files, rows = _write(args.root, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(open(files[0]).read())
    print("wrote " + ", ".join(files))
    waiting = [r["run"] for r in rows if r["status"] != FINISHED]
    if waiting:
        print(f"incomplete: {len(waiting)} of {len(rows)} runs have not finished: {', '.join(waiting)}", file=sys.stderr)
        return INCOMPLETE_EXIT
    return 0

if __name__ == "__main__":
    sys.exit(main())
