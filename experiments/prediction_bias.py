"""Where do the fine-tuned students of the app put their predictions? A check for class collapse.

A student that forgets its parent drifts towards the classes it saw most while fine-tuning. For every app run
under ``--runs`` (each a folder with ``report.json`` and ``pruned_checkpoint.pth``, e.g. ``compare_app.py``'s), this
loads the fine-tuned model with :func:`pruning.artifacts.load_pruned`, predicts the run's own validation images at
its resolution, and reports how many predictions fall into the 10 classes with the most images in the run's
training pool (the same count for the parent shows the share that is not collapse), how many distinct classes
it predicts and its most predicted class.

    python experiments/prediction_bias.py --runs experiments/results/compare_app/runs/budget-0.7 \
        --out experiments/results/compare_app/prediction_bias-0.7.md
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="a folder of app run directories")
    ap.add_argument("--out", required=True, help="the markdown file to write")
    ap.add_argument("--workers", type=int, default=2)
    return ap.parse_args()


def _finished(runs: str) -> list[str]:
    """Run directories whose fine-tuned model and report are both written."""
    def done(d: str) -> bool:
        report = os.path.join(runs, d, "report.json")
        return os.path.isfile(report) and "validate" in json.load(open(report))
    return sorted(d for d in os.listdir(runs) if os.path.isdir(os.path.join(runs, d)) and done(d))


@torch.no_grad()
def predictions(model: torch.nn.Module, root: str, img_size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted, true)`` labels of ``model`` on the images of ``root`` (timm's eval transform at ``img_size``)."""
    from pruning.data import eval_loader, eval_transform, image_dataset

    data = image_dataset(root, eval_transform(model, img_size))
    pairs = [(model(x).argmax(1), y) for x, y in eval_loader(data, 64, workers)]
    return torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])


def crowded_classes(config: dict, n: int = 10) -> torch.Tensor:
    """The ``n`` labelled classes with the most images in the run's training pool."""
    from pruning.pools import training_pool

    data = config["data"]
    roots = data["train_roots"] or [os.path.join(data["root"], data["train_split"])]
    counts = collections.Counter(label for label in training_pool(list(roots)).labels() if label >= 0)
    return torch.tensor([label for label, _ in counts.most_common(n)])


def bias_row(name: str, predicted: torch.Tensor, true: torch.Tensor, crowded: torch.Tensor) -> str:
    top, count = collections.Counter(predicted.tolist()).most_common(1)[0]
    return (f"| {name} | {(predicted == true).float().mean() * 100:.2f} | "
            f"{torch.isin(predicted, crowded).float().mean() * 100:.1f}% | {predicted.unique().numel()} | "
            f"{top} ({count / len(predicted) * 100:.1f}%) |")


def main() -> None:
    from pruning.artifacts import load_pruned
    from pruning.models import load_parent

    args = _args()
    names = _finished(args.runs)
    if not names:
        sys.exit(f"no finished app runs (report.json with a validate section) under {args.runs}")
    config = json.load(open(os.path.join(args.runs, names[0], "report.json")))["run"]["config"]
    m, root = config["model"], config["data"]["val_root"]
    parent = load_parent(m["name"], m["pretrained"], m["checkpoint"]).eval()
    crowded = crowded_classes(config)
    predicted, true = predictions(parent, root, m["img_size"], args.workers)
    lines = ["| model | top-1 | predictions in the 10 most trained classes | classes predicted | most predicted "
             "class (share) |", "|---|---|---|---|---|", bias_row("parent (unpruned)", predicted, true, crowded)]
    for name in names:
        student, _ = load_pruned(os.path.join(args.runs, name, "pruned_checkpoint.pth"), parent)
        lines.append(bias_row(name, *predictions(student.eval(), root, m["img_size"], args.workers), crowded))
        print(lines[-1], flush=True)
    head = [f"Command: `python {' '.join(sys.argv)}`", "",
            f"Validation: {root} ({len(true)} images). The 10 most trained classes ({crowded.tolist()}) are "
            f"{torch.isin(true, crowded).float().mean() * 100:.1f}% of its labels.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
