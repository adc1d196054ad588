"""Importance estimation throughput relative to a plain forward+backward pass (goal: ratio >= 0.9).

Both run on the same model, batch and process, interleaved round by round; the median per-batch time of
each is reported, so machine noise hits both alike.

    python benchmarks/bench_importance.py --model efficientnet_b0 --img-size 224 --batch 16
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pruning import build_channel_graph, create_model
from pruning.importance import create_importance
from pruning.speed import interleaved_calls


def _plain_step(model, x, y) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def importance_times(model, graph, x: torch.Tensor, y: torch.Tensor, rounds: int = 5, batches: int = 4) -> dict[str, float]:
    """Median seconds per call of ``batches`` plain forward+backward steps and of each Taylor criterion on the same
    ``batches`` batches, timed in interleaved rounds (the first round warms up and is dropped). ``model``, ``x``
    and ``y`` are on the device to measure."""
    criteria = {n: create_importance(n, num_images=len(x) * batches, progress=False)
                for n in ("taylor_weight", "taylor_activation")}
    calls = {"plain": lambda: [_plain_step(model, x, y) for _ in range(batches)],
             **{n: (lambda crit=crit: crit(model, graph, [(x, y)] * batches)) for n, crit in criteria.items()}}
    return interleaved_calls(calls, rounds, x.device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4, help="batches per timed call (the setup cost is amortised)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    graph = build_channel_graph(model, args.img_size)
    x, y = torch.randn(args.batch, 3, args.img_size, args.img_size), torch.randint(0, 1000, (args.batch,))
    n_img = args.batch * args.batches
    med = importance_times(model, graph, x, y, args.rounds, args.batches)
    print(f"{args.model}@{args.img_size} batch {args.batch} x {args.batches} per call, torch threads {torch.get_num_threads()}, {args.rounds} rounds")
    print(f"plain forward+backward: {n_img / med['plain']:.2f} img/s")
    for n in ("taylor_weight", "taylor_activation"):
        print(f"{n}: {n_img / med[n]:.2f} img/s, throughput ratio vs plain {med['plain'] / med[n]:.3f}")

if __name__ == "__main__":
    main()
