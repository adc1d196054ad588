"""Allocation against criterion, through the app: which part of knapsack pruning buys the accuracy?

Every method is one run of ``python -m pruning.run +experiment=quickstart`` (tf_efficientnet_lite0 with real
weights at 128 px, the class-balanced pools with every copy of a validation image dropped, BN recalibration,
label-free inner distillation, validation on imagenet-val-1300) with only the criterion and the allocation
changed, so nothing is re-implemented here:

* allocation ``uniform`` (one keep ratio), ``threshold`` (one global score threshold), ``threshold_norm`` (the
  same after dividing each layer's scores by their mean, Torch-Pruning's default), ``exact`` (the knapsack) or
  ``greedy`` (the paper's greedy knapsack and cost model);
* criterion ``l1`` (weight magnitude) or ``taylor_weight`` (the authors').

Latency is then measured for every pruned model and the parent in ``--latency-runs`` separate processes of
``--rounds`` interleaved rounds each (batch 1, 2 threads), and reported as the median ratio to the parent with
its range over the processes.

    python experiments/compare_app.py                       # 70% of the MACs, 150 updates per method
    python experiments/compare_app.py --budget 0.5 --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from separate_runs import measured_in_processes, serve_latency_request  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "experiments", "results", "compare_app")
CRITERIA = {"l1": "l1", "taylor": "taylor_weight"}
ALLOCATIONS = ("uniform", "threshold", "threshold_norm", "exact", "greedy")


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="0.7", help="budget.target: a fraction of the parent's MACs")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning updates of 32 images per method")
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    ap.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=list(ALLOCATIONS))
    ap.add_argument("--latency-runs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the saved results")
    ap.add_argument("--latency-only", nargs=2, metavar=("BUDGET", "JSON"), help=argparse.SUPPRESS)
    return ap.parse_args()


def _method(criterion: str, allocation: str) -> str:
    return f"{allocation}-{criterion}"


def _run_dir(budget: str, method: str) -> str:
    return os.path.join(OUT, "runs", f"budget-{budget}", method)


def app_command(budget: str, criterion: str, allocation: str, steps: int) -> list[str]:
    """The app's command line for one method (everything else is the quickstart's)."""
    return [sys.executable, "-m", "pruning.run", "+experiment=quickstart", f"budget.target={budget}",
            f"importance={CRITERIA[criterion]}", f"solver={allocation}", f"trainer.max_steps={steps}",
            f"hydra.run.dir={_run_dir(budget, _method(criterion, allocation))}", "logger=none"]


def run_method(budget: str, criterion: str, allocation: str, steps: int) -> dict:
    """Run (or resume) one method through the app; its report."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    run_dir = _run_dir(budget, _method(criterion, allocation))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "app.log"), "w") as log:
        subprocess.run(app_command(budget, criterion, allocation, steps), cwd=ROOT, env=env, check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def _finished(budget: str) -> list[str]:
    base = os.path.join(OUT, "runs", f"budget-{budget}")
    return sorted(m for m in os.listdir(base) if os.path.isfile(os.path.join(base, m, "pruned_checkpoint.pth")))


def measure_once(budget: str, rounds: int) -> dict[str, float]:
    """ms per batch-1 forward pass of the parent and every finished method's model, interleaved (this process)."""
    from pruning.artifacts import load_pruned
    from pruning.latency import measure_latency
    from pruning.weights import load_pretrained_lite0

    parent = load_pretrained_lite0()
    models = {"parent": parent}
    for method in _finished(budget):
        models[method], _ = load_pruned(os.path.join(_run_dir(budget, method), "pruned_checkpoint.pth"), parent)
    size = json.load(open(os.path.join(_run_dir(budget, _finished(budget)[0]), "report.json")))["model"]["img_size"]
    return measure_latency(models, size, batch=1, threads=2, rounds=rounds)


def latency_ratios(budget: str, runs: int, rounds: int) -> dict[str, list[float]]:
    """Per method, its latency over the parent's in each of ``runs`` separate processes."""
    ratios: dict[str, list[float]] = {}
    for ms in measured_in_processes(__file__, budget, runs, rounds, OUT):
        for name, value in ms.items():
            ratios.setdefault(name, []).append(value / ms["parent"])
    return ratios


def write_readme(rows: list[dict], args: argparse.Namespace, parent_top1: float) -> str:
    lines = ["# Allocation against criterion, through the app", "",
             "The table merges every call of the script at this budget (each call adds or redoes its methods and "
             "re-measures the latency of all of them); the last call was:", "",
             "```", f"python experiments/compare_app.py --budget {args.budget} --steps {args.steps} "
             f"--criteria {' '.join(args.criteria)} --allocations {' '.join(args.allocations)} "
             f"--latency-runs {args.latency_runs} --rounds {args.rounds}",
             "# each method (criterion l1 or taylor_weight; solver uniform, threshold, threshold_norm, exact, greedy):",
             f"python -m pruning.run +experiment=quickstart budget.target={args.budget} importance=<criterion> "
             f"solver=<allocation> trainer.max_steps={args.steps} logger=none hydra.run.dir=<run dir>", "```", "",
             f"tf_efficientnet_lite0 (real weights) at 128 px, {args.budget} of its MACs; every method BN-recalibrated "
             f"and fine-tuned alike ({args.steps} updates, label-free inner distillation on the pools). Top-1 on "
             f"imagenet-val-1300 (parent: {parent_top1:.2f}). Latency: batch 1, 2 threads, ratio to the parent, median "
             f"of {args.latency_runs} processes x {args.rounds} interleaved rounds (range).", "",
             "| allocation | criterion | MACs | top-1 | latency / parent |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["top1"]):
        lo, hi = min(r["latency"]), max(r["latency"])
        lines.append(f"| {r['allocation']} | {r['criterion']} | {r['macs'] / 1e6:.1f}M | {r['top1']:.2f} | "
                     f"{statistics.median(r['latency']):.3f} ({lo:.3f}-{hi:.3f}) |")
    path = os.path.join(OUT, f"budget-{args.budget}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main() -> None:
    args = _args()
    if serve_latency_request(args.latency_only, args.rounds, measure_once):
        return
    path = os.path.join(OUT, f"budget-{args.budget}.json")
    if args.table_only:
        rows = json.load(open(path))
        print(open(write_readme(rows, args, rows[0]["parent_top1"])).read())
        return
    done = json.load(open(path)) if os.path.isfile(path) else []  # methods of earlier calls at this budget stay
    rows = [r for r in done if (r["criterion"], r["allocation"]) not in
            {(c, a) for c in args.criteria for a in args.allocations}]
    for criterion in args.criteria:
        for allocation in args.allocations:
            report = run_method(args.budget, criterion, allocation, args.steps)
            rows.append({"criterion": criterion, "allocation": allocation, "macs": report["model"]["macs_after"],
                         "top1": report["validate"]["student"]["top1"],
                         "parent_top1": report["validate"]["teacher"]["top1"]})
            print(rows[-1], flush=True)
    ratios = latency_ratios(args.budget, args.latency_runs, args.rounds)
    for r in rows:
        r["latency"] = ratios[_method(r["criterion"], r["allocation"])]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(open(write_readme(rows, args, rows[0]["parent_top1"])).read())


if __name__ == "__main__":
    main()
