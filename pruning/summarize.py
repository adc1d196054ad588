"""Summarise a sweep: every run's report.json under a folder into one table (markdown + CSV) and plots.

    python -m pruning.summarize multirun/2026-11-25_10-00-00 [--out DIR]
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

COLUMNS = ["run", "model", "img_size", "budget", "target_macs", "macs_after", "achieved_over_target", "params_after",
           "method", "gap", "student_top1", "student_top5", "teacher_top1", "student_images_per_s",
           "teacher_images_per_s"]


def _row(path: str, root: str) -> dict:
    r = read_json(path)
    model, budget, solve = r.get("model", {}), r.get("budget", {}), r.get("solve", {})
    val = r.get("validate", {})
    student, teacher = val.get("student", {}), val.get("teacher", {})
    method = f"{r.get('importance', {}).get('criterion', '?')}+{solve.get('solver', '?')}"
    if "finetune" in r:
        method += f"+{r['finetune'].get('method')}"
    return {"run": os.path.relpath(os.path.dirname(path), root), "model": model.get("name"),
            "img_size": model.get("img_size"), "budget": budget.get("spec"), "target_macs": budget.get("target_macs"),
            "macs_after": model.get("macs_after"), "achieved_over_target": model.get("achieved_over_target"),
            "params_after": model.get("params_after"), "method": method, "gap": solve.get("gap"),
            "student_top1": student.get("top1"), "student_top5": student.get("top5"), "teacher_top1": teacher.get("top1"),
            "student_images_per_s": student.get("images_per_s"), "teacher_images_per_s": teacher.get("images_per_s")}


def collect(root: str) -> list[dict]:
    """One row per run under ``root`` (any depth), sorted by achieved MACs."""
    paths = sorted(glob.glob(os.path.join(root, "**", REPORT), recursive=True))
    rows = [_row(p, root) for p in paths]
    return sorted(rows, key=lambda r: (r["method"], r["macs_after"] or 0))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(root: str, out: str | None = None) -> list[str]:
    """Write summary.md, summary.csv and the plots into ``out`` (default ``root``); returns the files."""
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no {REPORT} under {root!r}: point at a sweep folder (multirun/<date>)")
    out = out or root
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, "summary.md"), os.path.join(out, "summary.csv")]
    with open(files[0], "w") as f:
        f.write(to_markdown(rows))
    with open(files[1], "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plots = [plot_against_macs(rows, "student_top1", "student top-1 (%)", os.path.join(out, "accuracy_vs_macs.png"), "accuracy"),
             plot_against_macs(rows, "student_images_per_s", "images/s", os.path.join(out, "speed_vs_macs.png"), "throughput")]
    return files + [p for p in plots if p]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pruning.summarize", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="a folder holding run directories (a Hydra multirun folder)")
    ap.add_argument("--out", default=None, help="where to write the table and plots (default: root)")
    args = ap.parse_args(argv)
    try:
        files = write_summary(args.root, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(open(files[0]).read())
    print("wrote " + ", ".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
