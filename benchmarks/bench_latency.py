"""Is a pruned model as fast as its MACs promise? Latency and throughput ratios against MACs ratios.

Compares, in one process with interleaved rounds: dense efficientnet_b1@240, timm's efficientnet_b1_pruned@240,
dense efficientnet_b0@224, our efficientnet_b1 pruned to flops_490M (exact knapsack, L1 scores, random init:
speed does not depend on the weights), and the same search with widths rounded to multiples of 8.

    python benchmarks/bench_latency.py [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

from pruning import build_channel_graph, create_model
from pruning.count import count_model
from pruning.importance import create_importance
from pruning.search import search
from pruning.speed import interleaved_speed


def _ours(round_to: int):
    model = create_model("efficientnet_b1")
    graph = build_channel_graph(model, 240)
    return search(model, graph, create_importance("l1")(model, graph), "flops_490M", round_to=round_to).pruned.eval()


def _models() -> dict[str, tuple[torch.nn.Module, int]]:
    return {
        "efficientnet_b1@240 (dense)": (create_model("efficientnet_b1"), 240),
        "efficientnet_b1_pruned@240 (timm)": (create_model("efficientnet_b1_pruned"), 240),
        "efficientnet_b0@224 (dense)": (create_model("efficientnet_b0"), 224),
        "ours flops_490M": (_ours(1), 240),
        "ours flops_490M round_to=8": (_ours(8), 240),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = _models()
    macs = {n: count_model(m, s).macs for n, (m, s) in models.items()}
    latency = interleaved_speed(models, batch=1, rounds=args.rounds, repeats=5)
    batch = interleaved_speed(models, batch=args.batch, rounds=args.rounds)
    ref = "efficientnet_b1@240 (dense)"
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.rounds} interleaved rounds; ratios vs {ref}")
    print(f"| model | MACs | MACs ratio | batch-1 latency ms | latency ratio | batch-{args.batch} img/s | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for n in models:
        print(f"| {n} | {macs[n]:,} | {macs[n] / macs[ref]:.3f} | {latency[n] * 1e3:.1f} | {latency[n] / latency[ref]:.3f} "
              f"| {args.batch / batch[n]:.1f} | {batch[n] / batch[ref]:.3f} |")


if __name__ == "__main__":
    main()
