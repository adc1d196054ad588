"""Where do the fine-tuned students of ``compare.py`` put their predictions? A check for class collapse.

compare.py fine-tunes on Imagenette train (5000 images of 10 classes) plus imagenet-sample-1000 (one image
per class), so 83% of the training images come from 10 classes. A student that forgets its parent drifts
towards those classes. This script rebuilds every student (each method's pruning is deterministic: the
same scores, solver and seed give the same widths), loads its fine-tuned weights from ``compare.py``'s run folders,
and reports how many imagenet-val-1300 predictions fall into the 10 Imagenette classes (their true share of
the labels is under 1%).

    python experiments/prediction_bias.py --runs experiments/results/compare
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare import _data, _prune, _scores, target_macs  # noqa: E402
from distill.checkpoint import LAST, load_checkpoint  # noqa: E402
from pruning import build_channel_graph  # noqa: E402
from pruning.data import eval_loader  # noqa: E402
from pruning.weights import load_pretrained_lite0  # noqa: E402


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="experiments/results/compare", help="compare.py's --out folder")
    ap.add_argument("--out", default=None, help="where to write prediction_bias.md (default: --runs)")
    return ap.parse_args()


@torch.no_grad()
def _predictions(model, val, workers) -> torch.Tensor:
    return torch.cat([model(x).argmax(1) for x, _ in eval_loader(val, 64, workers)])


def _student(method, parent, graph, scores, target, train, run_args, checkpoint):
    model = _prune(method, parent, graph, scores, target, train, run_args).eval()  # deterministic: same widths
    model.load_state_dict(checkpoint["student"])
    return model


def main() -> None:
    args = _args()
    with open(os.path.join(args.runs, "environment.json")) as f:
        run_args = argparse.Namespace(**json.load(f)["args"])
    parent = load_pretrained_lite0().eval()
    graph = build_channel_graph(parent, run_args.img_size)
    train, val = _data(run_args, parent)
    scores = _scores(parent, graph, train, run_args)
    counts = collections.Counter(label for _, label in train.samples)
    dominant = torch.tensor(sorted(label for label, n in counts.items() if n > 1))
    labels = torch.tensor([label for _, label in val.samples])
    lines = ["| budget | method | top-1 | predictions in the 10 Imagenette classes | most predicted class (share) |",
             "|---|---|---|---|---|"]
    for budget in run_args.budgets:
        target = target_macs(budget, graph, parent)
        for method in run_args.methods:
            checkpoint = load_checkpoint(os.path.join(args.runs, f"budget_{budget:g}", "runs", method, LAST))
            if checkpoint is None:
                continue
            student = _student(method, parent, graph, scores, target, train, run_args, checkpoint)
            p = _predictions(student, val, run_args.workers)
            top, n = collections.Counter(p.tolist()).most_common(1)[0]
            lines.append(f"| {budget:g} | {method} | {(p == labels).float().mean() * 100:.2f} | "
                         f"{torch.isin(p, dominant).float().mean() * 100:.1f}% | {top} ({n / len(p) * 100:.1f}%) |")
            print(lines[-1], flush=True)
    share = torch.isin(labels, dominant).float().mean() * 100
    head = [f"Command: `python {' '.join(sys.argv)}`", "",
            f"True share of the 10 Imagenette classes among the {len(labels)} val labels: {share:.1f}%.", ""]
    with open(os.path.join(args.out or args.runs, "prediction_bias.md"), "w") as f:
        f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
