"""Exact vs greedy channel selection on a real timm model: time, objective, bound, gap, MACs / budget.

Run on one core, e.g.::

    taskset -c 0 python benchmarks/bench_solve.py
    taskset -c 0 python benchmarks/bench_solve.py --model efficientnet_b0 --img-size 224 --round-to 8

Scores are random (uniform, and a realistic lognormal skew); the model's graph build is not timed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pruning import CostModel, build_channel_graph, create_model  # noqa: E402
from pruning.solve import Constraint, KnapsackProblem, solve  # noqa: E402

B3_BUDGET = 1_020_257_090  # efficientnet_b3 @ 300 px budget of the paper's comparison


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_b3")
    parser.add_argument("--img-size", type=int, default=300)
    parser.add_argument("--budgets", type=float, nargs="*", help="budgets in MACs (<= 1: fractions of full)")
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--min-keep-fraction", type=float, default=0.0)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--gap-tol", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def random_scores(graph, dist: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    draw = rng.random if dist == "uniform" else lambda n: rng.lognormal(0.0, 1.0, n)
    return {g.name: draw(g.width) for g in graph.prunable_groups()}


def budgets(args: argparse.Namespace, full: int) -> list[int]:
    if args.budgets:
        return [int(b * full) if b <= 1 else int(b) for b in args.budgets]
    default = [B3_BUDGET] if (args.model, args.img_size) == ("efficientnet_b3", 300) else [int(0.6 * full)]
    return default + [full // 2]


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    model = create_model(args.model)
    graph = build_channel_graph(model, args.img_size)
    cost = CostModel(graph, model)
    full = cost.macs()
    print(f"{args.model} @ {args.img_size}px: {full:,} MACs, {len(graph.prunable_groups())} prunable groups, "
          f"{sum(g.width for g in graph.prunable_groups()):,} prunable channels (graph built in "
          f"{time.perf_counter() - t0:.1f} s); round_to={args.round_to}, min_keep={args.min_keep_fraction}, "
          f"gap_tol={args.gap_tol}")
    print(f"{'scores':<10}{'budget':>15}{'solver':>8}{'seconds':>9}{'objective':>13}{'bound':>13}{'gap':>10}"
          f"{'macs/budget':>13}")
    for dist in ("uniform", "lognormal"):
        scores = random_scores(graph, dist, args.seed)
        for budget in budgets(args, full):
            problem = KnapsackProblem(scores, [Constraint(cost.macs_cost, budget)], graph.full_widths(), args.round_to,
                                      args.min_keep_fraction)
            for solver in ("exact", "greedy"):
                t = time.perf_counter()
                sol = solve(problem, solver, time_limit=args.time_limit, gap_tol=args.gap_tol)
                t = time.perf_counter() - t
                print(f"{dist:<10}{budget:>15,}{solver:>8}{t:>9.3f}{sol.objective:>13.3f}{sol.bound:>13.3f}"
                      f"{sol.gap:>10.2e}{sol.macs / budget:>13.6f}")


if __name__ == "__main__":
    main()
