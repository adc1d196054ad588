"""Allocation against criterion, through the app: which part of knapsack pruning buys the accuracy?

Every method is one run of ``python -m pruning.run +experiment=quickstart`` (tf_efficientnet_lite0 with real
weights at 128 px, the class-balanced pools with every copy of a validation image dropped, BN recalibration,
label-free inner distillation, validation on imagenet-val-1300) with only the criterion and the allocation
changed, so nothing is re-implemented here:

* allocation ``uniform`` (one keep ratio), ``threshold`` (one global score threshold), ``threshold_norm`` (the
  same after dividing each layer's scores by their mean, Torch-Pruning's default), ``exact`` (the knapsack) or
  ``greedy`` (the paper's greedy knapsack and cost model);
* criterion ``l1`` (weight magnitude) or ``taylor_weight`` (the authors');
* ``torch_pruning``: Torch-Pruning's own dependency graph, importance (GroupMagnitudeImportance for ``l1``,
  GroupTaylorImportance for ``taylor``, gradients on the same images the app scores on) and global allocation,
  its ratio bisected to the budget (``peers.py``). Its model is saved as the app's ``pruned_checkpoint.pth``
  (:func:`peers.kept_channels` checks that it rebuilds exactly), and the app fine-tunes and validates it
  (``stages=[finetune,validate]``) like the others; the app recalibrates its BN statistics first, as its prune
  stage does for its own models (the checkpoint records none).

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
ALLOCATIONS = ("uniform", "threshold", "threshold_norm", "exact", "greedy", "torch_pruning")
PEER_IMPORTANCE = {"l1": "magnitude", "taylor": "taylor"}  # Torch-Pruning's counterpart of each criterion


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="0.7", help="budget.target: a fraction of the parent's MACs")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning updates of 32 images per method")
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    ap.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=list(ALLOCATIONS))
    ap.add_argument("--distill", default="inner", choices=["inner", "kd", "ce"],
                    help="the fine-tuning loss (distill=...); kd and ce show whether inner distillation's projections "
                         "are what fails on a narrowed residual stream")
    ap.add_argument("--latency-runs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the saved results")
    ap.add_argument("--measure-only", action="store_true",
                    help="run nothing: measure the latency of every saved method again (on a quiet machine)")
    ap.add_argument("--latency-only", nargs=2, metavar=("BUDGET", "JSON"), help=argparse.SUPPRESS)
    return ap.parse_args()


def _method(criterion: str, allocation: str, distill: str = "inner") -> str:
    return f"{allocation}-{criterion}" + ("" if distill == "inner" else f"-{distill}")


def _row_method(row: dict) -> str:
    return _method(row["criterion"], row["allocation"], row.get("distill", "inner"))


def _run_dir(budget: str, method: str) -> str:
    return os.path.join(OUT, "runs", f"budget-{budget}", method)


def app_overrides(budget: str, criterion: str, distill: str = "inner") -> list[str]:
    """What every method's run shares: the quickstart at this budget, scored with this criterion."""
    loss = [] if distill == "inner" else [f"distill={distill}"]  # inner: the quickstart's own
    return ["+experiment=quickstart", f"budget.target={budget}", f"importance={CRITERIA[criterion]}", *loss]


def app_command(budget: str, criterion: str, allocation: str, steps: int, distill: str = "inner") -> list[str]:
    """The app's command line for one method (everything else is the quickstart's)."""
    peer = allocation == "torch_pruning"  # pruned here; the app fine-tunes and validates it
    return [sys.executable, "-m", "pruning.run", *app_overrides(budget, criterion, distill),
            "stages=[finetune,validate]" if peer else f"solver={allocation}", f"trainer.max_steps={steps}",
            f"hydra.run.dir={_run_dir(budget, _method(criterion, allocation, distill))}", "logger=none"]


def prune_with_torch_pruning(budget: str, criterion: str, run_dir: str) -> None:
    """Torch-Pruning's model at the budget, written as the app's ``pruned_checkpoint.pth`` in ``run_dir``.

    The parent, the budget, the pool and the images Taylor gradients are taken on are the app's own, read
    through :func:`pruning.pipeline.preflight`'s checks (the first ``importance.num_images`` of the pool in the
    app's seeded order, the validation images' copies excluded). Its BN statistics are left to the app's fine-tuning
    stage, which recalibrates a checkpoint saved without recalibration before it fine-tunes.
    """
    from hydra import compose, initialize_config_dir

    from peers import kept_channels, torch_pruning_to_macs
    from pruning import artifacts
    from pruning.data import eval_loader, eval_transform, take_images
    from pruning.loggers import NullLogger
    from pruning.pipeline import preflight
    from pruning.prune import prune_model

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*app_overrides(budget, criterion), "stages=[finetune]", "logger=none"])
    app = preflight(cfg, run_dir, NullLogger())  # the checks only: parent, budget, pool (stages=[finetune] reads data)
    size, n = cfg.model.img_size, cfg.importance.num_images
    loader = eval_loader(app.data.pool.dataset, cfg.importance.batch_size, cfg.data.workers, shuffle_seed=cfg.seed,
                         transform=eval_transform(app.parent, size))
    batches = list(take_images(loader, n, "Torch-Pruning importance images", progress=False))
    pruned = torch_pruning_to_macs(app.parent, size, app.budget.macs, PEER_IMPORTANCE[criterion], batches).eval()
    keep = kept_channels(app.parent, pruned, app.graph)
    artifacts.save_pruned(prune_model(app.parent, app.graph, keep), run_dir, cfg.model.name, size, keep, "pruned",
                          app.graph.protected_patterns)


def _macs(run_dir: str, report: dict) -> int:
    if "model" in report:
        return report["model"]["macs_after"]
    from pruning.artifacts import load_pruned
    from pruning.count import count_model

    model, meta = load_pruned(os.path.join(run_dir, "pruned_checkpoint.pth"))
    return count_model(model, meta["img_size"]).macs


def run_method(budget: str, criterion: str, allocation: str, steps: int, distill: str = "inner") -> dict:
    """Run (or resume) one method through the app; its report."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    run_dir = _run_dir(budget, _method(criterion, allocation, distill))
    os.makedirs(run_dir, exist_ok=True)
    if allocation == "torch_pruning" and not os.path.isfile(os.path.join(run_dir, "pruned_checkpoint.pth")):
        prune_with_torch_pruning(budget, criterion, run_dir)
    with open(os.path.join(run_dir, "app.log"), "w") as log:
        done = subprocess.run(app_command(budget, criterion, allocation, steps, distill), cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode:  # a method that fails (a diverging fine-tune) is a result too: its row says why
        errors = [line for line in open(os.path.join(run_dir, "app.log")) if "Error" in line]
        return {"failed": errors[-1].strip() if errors else f"exit code {done.returncode}"}
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def _finished(budget: str) -> list[str]:
    base = os.path.join(OUT, "runs", f"budget-{budget}")
    return sorted(m for m in os.listdir(base) if os.path.isfile(os.path.join(base, m, "pruned_checkpoint.pth")))


def measure_once(budget: str, rounds: int) -> dict[str, float]:
    """ms per batch-1 forward pass of the parent and every finished method's model, interleaved (this process)."""
    from pruning.artifacts import load_pruned
    from pruning.latency import measure_latency
    from pruning.lite_packages import load_pretrained_lite0

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
             f"--criteria {' '.join(args.criteria)} --allocations {' '.join(args.allocations)} --distill {args.distill} "
             f"--latency-runs {args.latency_runs} --rounds {args.rounds}",
             "# each method (criterion l1 or taylor_weight; solver uniform, threshold, threshold_norm, exact, greedy):",
             f"python -m pruning.run +experiment=quickstart budget.target={args.budget} importance=<criterion> "
             f"solver=<allocation> trainer.max_steps={args.steps} logger=none hydra.run.dir=<run dir>",
             "# torch_pruning: pruned by Torch-Pruning into <run dir>/pruned_checkpoint.pth, then",
             f"python -m pruning.run +experiment=quickstart budget.target={args.budget} importance=<criterion> "
             f"stages=[finetune,validate] trainer.max_steps={args.steps} logger=none hydra.run.dir=<run dir>",
             "```", "",
             f"tf_efficientnet_lite0 (real weights) at 128 px, {args.budget} of its MACs; every method BN-recalibrated "
             f"and fine-tuned alike ({args.steps} updates, label-free distillation on the pools: inner unless the "
             f"fine-tuning column says kd, logit distillation at T=4). Top-1 on "
             f"imagenet-val-1300 (parent: {parent_top1:.2f}). Latency: batch 1, 2 threads, ratio to the parent, median "
             f"of {args.latency_runs} processes x {args.rounds} interleaved rounds (range).", "",
             "| allocation | criterion | fine-tuning | MACs | top-1 | latency / parent |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -(r["top1"] if r["top1"] is not None else -1)):
        lat = r.get("latency") or []
        speed = f"{statistics.median(lat):.3f} ({min(lat):.3f}-{max(lat):.3f})" if lat else "not measured"
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else f"failed: {r['failed']}"
        lines.append(f"| {r['allocation']} | {r['criterion']} | {r.get('distill', 'inner')} | {r['macs'] / 1e6:.1f}M | "
                     f"{top1} | {speed} |")
    path = os.path.join(OUT, f"budget-{args.budget}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _parent_top1(rows: list[dict]) -> float:
    return next(r["parent_top1"] for r in rows if "parent_top1" in r)


def main() -> None:
    args = _args()
    if serve_latency_request(args.latency_only, args.rounds, measure_once):
        return
    path = os.path.join(OUT, f"budget-{args.budget}.json")
    if args.table_only:
        rows = json.load(open(path))
        print(open(write_readme(rows, args, _parent_top1(rows))).read())
        return
    done = json.load(open(path)) if os.path.isfile(path) else []  # methods of earlier calls at this budget stay
    redone = {_method(c, a, args.distill) for c in args.criteria for a in args.allocations}
    rows = [r for r in done if _row_method(r) not in redone]
    if args.measure_only:
        rows = done
    for criterion in ([] if args.measure_only else args.criteria):
        for allocation in args.allocations:
            report = run_method(args.budget, criterion, allocation, args.steps, args.distill)
            run_dir = _run_dir(args.budget, _method(criterion, allocation, args.distill))
            row = {"criterion": criterion, "allocation": allocation, "distill": args.distill,
                   "macs": _macs(run_dir, report)}
            if "failed" in report:
                row |= {"top1": None, "failed": report["failed"]}
            else:
                row |= {"top1": report["validate"]["student"]["top1"],
                        "parent_top1": report["validate"]["teacher"]["top1"]}
            rows.append(row)
            print(rows[-1], flush=True)
    if args.latency_runs:  # 0: keep what was measured before (a busy machine); --measure-only later
        ratios = latency_ratios(args.budget, args.latency_runs, args.rounds)
        for r in rows:
            r["latency"] = ratios[_row_method(r)]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(open(write_readme(rows, args, _parent_top1(rows))).read())


if __name__ == "__main__":
    main()
