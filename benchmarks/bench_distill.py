"""One inner-distillation training step relative to a plain cross-entropy step of the same student
(goal: ratio <= 1.35).

Both steps are the trainer's own (``distill.train.Trainer.train_step``: forward, loss, backward, optimiser,
scheduler), on the same batch, in one process, interleaved round by round; medians are reported. The
distillation step adds the frozen teacher's forward, the hooks, the projections and the MSE terms.

    python benchmarks/bench_distill.py --model efficientnet_b1 --img-size 240 --budget flops_490M --batch 8

``--widths paper`` uses the widths of timm's published ``efficientnet_b1_pruned`` instead of the L1 knapsack's:
its stage outputs are narrower than the parent's, so the step also trains projections.
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from torch.utils.data import TensorDataset

from distill import TrainConfig, create_loss
from distill.loss import forward_no_grad
from distill.precision import autocast
from distill.train import Trainer
from pruning import build_channel_graph, create_model, prune_to_widths
from pruning.count import count_model
from pruning.importance import create_importance
from pruning.paper import paper_widths
from pruning.search import search
from pruning.speed import interleaved_calls


def _trainer(student, teacher, method: str, data, out: str, **train) -> Trainer:
    return Trainer(copy.deepcopy(student), teacher, data, create_loss(method), TrainConfig(workers=0, lr=1e-3, **train),
                   out, progress=False)


def _student(teacher, graph, args):
    if args.widths == "paper":
        return prune_to_widths(teacher, graph, paper_widths(args.budget, graph))
    return search(teacher, graph, create_importance("l1")(teacher, graph), args.budget).pruned


def step_times(student, teacher, x: torch.Tensor, y: torch.Tensor, rounds: int = 7, **train) -> tuple[dict[str, float], Trainer]:
    """Median seconds per training step of a cross-entropy student, an inner-distillation student (fast teacher:
    BN folded, channels-last) and one with a plain teacher, plus the teacher's forward alone; interleaved rounds,
    the first dropped. ``train``: :class:`TrainConfig` fields (batch_size, img_size, amp, channels_last, ...).
    Also returns the inner-distillation trainer (its points and projections describe the step)."""
    data = TensorDataset(x, y)
    with tempfile.TemporaryDirectory() as out:
        steps = {
            "ce": _trainer(student, None, "ce", data, out, **train),
            "inner": _trainer(student, teacher, "inner", data, out, **train),
            "inner (plain teacher)": _trainer(student, teacher, "inner", data, out, **train,
                                              teacher_fold_bn=False, teacher_channels_last=False),
        }
    fast = steps["inner"]
    calls = {name: (lambda t=t: t.train_step(x, y)) for name, t in steps.items()}
    xd = x.to(fast.device)

    def teacher_only():
        with autocast(train.get("amp"), fast.device):
            forward_no_grad(fast.teacher, fast._teacher_input(xd), fast.points)

    calls["teacher forward only"] = teacher_only
    return interleaved_calls(calls, rounds, fast.device), fast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_b1")
    ap.add_argument("--img-size", type=int, default=240)
    ap.add_argument("--budget", default="flops_490M")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--channels-last", action="store_true", help="student in channels-last layout (both steps)")
    ap.add_argument("--widths", choices=("search", "paper"), default="search", help="L1 + exact knapsack, or timm's published widths")
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher = create_model(args.model)
    graph = build_channel_graph(teacher, args.img_size)
    student = _student(teacher, graph, args)
    x, y = torch.randn(args.batch, 3, args.img_size, args.img_size), torch.randint(0, 1000, (args.batch,))
    med, fast = step_times(student, teacher, x, y, args.rounds, batch_size=args.batch, img_size=args.img_size,
                           channels_last=args.channels_last)
    macs = (count_model(student, args.img_size).macs, count_model(teacher, args.img_size).macs)
    print(f"{args.model}@{args.img_size} pruned to {args.budget} ({args.widths} widths; {macs[0]:,} of {macs[1]:,} MACs), "
          f"batch {args.batch}, student {'channels-last' if args.channels_last else 'contiguous'}, torch threads {torch.get_num_threads()}, {args.rounds} rounds, {len(fast.points)} matched points, "
          f"{len(fast.module.projections)} projections")
    for name, t in med.items():
        print(f"{name:>22}: {t * 1000:8.1f} ms/step  ratio vs ce {t / med['ce']:.3f}")

if __name__ == "__main__":
    main()
