"""The quickstart, timed from a fresh run directory and cache, and its fine-tuned model checked with timm alone.

1. Runs ``python -m pruning.run +experiment=quickstart`` in a new run directory with a new cache (so importance is
   computed, not reused) and times the whole command.
2. Loads the run's ``pruned_spec.txt`` + ``pruned.pth`` (the fine-tuned model: the finetune stage overwrites the
   prune stage's) with timm alone (``adapt_model_from_string``) and
   scores it on ``imagenet-val-1300`` with timm's own eval transform at the run's resolution, beside the
   unpruned parent (timm's ``tf_efficientnet_lite0`` with the same package weights).
3. Writes ``experiments/results/quickstart.md``.

    python experiments/quickstart_check.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "experiments", "results", "quickstart.md")
COMMAND = [sys.executable, "-m", "pruning.run", "+experiment=quickstart"]


def run_quickstart(run_dir: str, cache_dir: str) -> tuple[dict, float]:
    """The app's quickstart in ``run_dir``; its report and the command's wall time in seconds."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    start = time.perf_counter()
    with open(os.path.join(os.path.dirname(run_dir), "log.txt"), "w") as log:  # progress bars stay out of the way
        subprocess.run([*COMMAND, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"], cwd=ROOT, env=env,
                       check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f), seconds


def timm_alone_top1(run_dir: str, val_root: str, img_size: int) -> dict[str, float]:
    """Top-1 of the fine-tuned model rebuilt by timm alone, and of its parent, with timm's eval transform."""
    import timm
    import torch
    from timm.models._prune import adapt_model_from_string

    from distill.evaluate import evaluate_folder
    from pruning.lite_packages import load_pretrained_lite0

    with open(os.path.join(run_dir, "pruned_spec.txt")) as f:
        pruned = adapt_model_from_string(timm.create_model("tf_efficientnet_lite0"), f.read().strip())
    pruned.load_state_dict(torch.load(os.path.join(run_dir, "pruned.pth"), weights_only=True), strict=True)
    parent = load_pretrained_lite0()
    return {name: evaluate_folder(model, val_root, img_size, batch_size=64, device="cpu")["top1"]
            for name, model in {"pruned (timm alone)": pruned, "parent": parent}.items()}


def main() -> None:
    work = tempfile.mkdtemp(prefix="quickstart-")
    try:
        report, seconds = run_quickstart(os.path.join(work, "run"), os.path.join(work, "cache"))
        val = report["validate"]
        timm_top1 = timm_alone_top1(os.path.join(work, "run"), val["dataset"]["root"], report["model"]["img_size"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    student, teacher = val["student"]["top1"], val["teacher"]["top1"]
    lines = [
        "# Quickstart result", "",
        f"Command: `{' '.join(['python', *COMMAND[1:]])}` (from a fresh run directory and cache; "
        f"`python experiments/quickstart_check.py` reruns this check).", "",
        f"- Wall time of the whole command: **{seconds:.0f} s** on this machine ({os.cpu_count()} cores); stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in report["timings"].items()) + ".",
        f"- MACs: {report['model']['macs_before']:,} -> {report['model']['macs_after']:,} "
        f"({report['model']['macs_after'] / report['model']['macs_before']:.3f} of the parent), at "
        f"{report['model']['img_size']} px.",
        f"- Training pool: {report['data']['pool']['images']} images from {len(report['data']['pool']['roots'])} "
        f"folders, {report['data']['pool']['excluded_val_copies']} copies of validation images excluded; "
        f"ce_weight {report['data']['ce_weight']}, balance {report['data']['balance']}, "
        f"{report['finetune']['steps']} updates of {report['run']['config']['trainer']['batch_size']} images.",
        f"- Validation: {val['dataset']['images']} images, {val['dataset']['classes']} classes "
        f"(`{os.path.relpath(val['dataset']['root'], ROOT)}`), same resolution and transform for both.", "",
        "| model | top-1 | ratio to the parent |", "|---|---|---|",
        f"| parent (the run's validate stage) | {teacher:.2f} | 1 |",
        f"| pruned + fine-tuned (the run's validate stage) | {student:.2f} | {student / teacher:.3f} |",
        f"| parent, timm alone | {timm_top1['parent']:.2f} | 1 |",
        f"| `pruned_spec.txt` + `pruned.pth`, timm alone | {timm_top1['pruned (timm alone)']:.2f} | "
        f"{timm_top1['pruned (timm alone)'] / timm_top1['parent']:.3f} |", "",
        f"Warnings of the run: {val['warnings'] or 'none'}.", "",
    ]
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
