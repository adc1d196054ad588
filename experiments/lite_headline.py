"""The paper's headline claim on real weights: a larger EfficientNet pruned to a smaller one's MACs beats it.

Two pairs, each through the app (``python -m pruning.run +budget=... +experiment=lite_pools``): Taylor importance,
the exact knapsack at the smaller model's MACs (every block kept), BN recalibration, label-free inner
distillation under the unpruned parent on the class-balanced pools of ``../shared/data``, with the student
validated every 75 updates on ``imagenet-val-1300`` (1300 real ImageNet val images no stage trains, calibrates
or scores on):

* ``lite1_to_lite0``: tf_efficientnet_lite1 @240 pruned to the MACs of tf_efficientnet_lite0 @224;
* ``lite2_to_lite1``: tf_efficientnet_lite2 @260 pruned to the MACs of tf_efficientnet_lite1 @240.

Each pruned model is then compared with the dense smaller model on the same images (each at its own resolution,
timm's eval transform), at equal MACs and at measured CPU latency (batch 1, interleaved rounds, in separate
processes so that one run's state cannot favour a model). A run resumes after interruption: rerun the command.

    python experiments/lite_headline.py                  # both pairs, then the comparison and README
    python experiments/lite_headline.py --pairs lite1_to_lite0 --latency-runs 2 --rounds 9
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from separate_runs import measured_in_processes, serve_latency_request  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --out moves the results; the environment carries it to the latency processes, which rerun this script
OUT = os.environ.get("KP_LITE_HEADLINE_OUT", os.path.join(ROOT, "experiments", "results", "lite_headline"))
# budget -> (the parent at its resolution, the dense smaller model at its resolution)
PAIRS = {
    "lite1_to_lite0": (("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite0", 224)),
    "lite2_to_lite1": (("tf_efficientnet_lite2", 260), ("tf_efficientnet_lite1", 240)),
}


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--latency-runs", type=int, default=2, help="separate processes that each time every model")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds per latency run")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for the app")
    ap.add_argument("--out", default=None, help="results folder (default experiments/results/lite_headline); "
                    "give a longer run (--overrides trainer.epochs=3) its own")
    ap.add_argument("--measure-only", action="store_true", help="read the finished runs' reports; measure again")
    ap.add_argument("--latency-only", nargs=2, metavar=("PAIR", "JSON"), help=argparse.SUPPRESS)
    return ap.parse_args()


def _run_dir(pair: str) -> str:
    return os.path.join(OUT, "runs", pair)


def app_command(pair: str, overrides: list[str]) -> list[str]:
    """The app's command line for ``pair`` (printed in the README as is, run dir aside)."""
    return [sys.executable, "-m", "pruning.run", f"+budget={pair}", "+experiment=lite_pools",
            f"hydra.run.dir={_run_dir(pair)}", *overrides]


def run_app(pair: str, overrides: list[str]) -> dict:
    """Run (or resume) the pipeline for ``pair``; its report."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    subprocess.run(app_command(pair, overrides), cwd=ROOT, env=env, check=True)
    return read_report(pair)


def read_report(pair: str) -> dict:
    with open(os.path.join(_run_dir(pair), "report.json")) as f:
        return json.load(f)


def _models(pair: str):
    """The fine-tuned pruned model and the dense smaller model, each with its resolution."""
    from pruning.artifacts import load_pruned
    from pruning.lite_packages import load_pretrained_lite

    (parent_name, parent_size), (small_name, small_size) = PAIRS[pair]
    pruned, _ = load_pruned(os.path.join(_run_dir(pair), "pruned_checkpoint.pth"), load_pretrained_lite(parent_name))
    dense = load_pretrained_lite(small_name)
    return {"pruned": (pruned.eval(), parent_size), "dense": (dense.eval(), small_size)}


def measure_latency_once(pair: str, rounds: int) -> dict[str, float]:
    """ms per batch-1 forward pass of the pruned and the dense smaller model, interleaved (this process)."""
    import torch

    from pruning.speed import interleaved_speed

    torch.set_num_threads(2)
    with torch.inference_mode():
        seconds = interleaved_speed(_models(pair), batch=1, rounds=rounds, repeats=5)
    return {k: v * 1e3 for k, v in seconds.items()}


def latency_runs(pair: str, runs: int, rounds: int) -> list[dict[str, float]]:
    """:func:`measure_latency_once` in ``runs`` separate processes."""
    return measured_in_processes(__file__, pair, runs, rounds, OUT)


def compare(pair: str, report: dict, runs: int, rounds: int) -> dict:
    """The pruned model against the dense smaller model: MACs, params, top-1, latency (runs, spread)."""
    from distill.evaluate import evaluate_folder
    from pruning.count import count_model

    models = _models(pair)
    lat = latency_runs(pair, runs, rounds)
    row = {"pair": pair, "runs": lat}
    for name, (model, size) in models.items():
        count = count_model(model, size)
        ms = [r[name] for r in lat]
        row[name] = {"img_size": size, "macs": count.macs, "params": count.params,
                     "latency_ms": statistics.median(ms), "latency_spread_ms": [min(ms), max(ms)]}
    row["pruned"] |= {"top1": report["validate"]["student"]["top1"], "top5": report["validate"]["student"]["top5"]}
    dense_model, dense_size = models["dense"]
    dense = evaluate_folder(dense_model, report["validate"]["dataset"]["root"], dense_size, device="cpu")
    row["dense"] |= {"top1": dense["top1"], "top5": dense["top5"]}
    row["parent_top1"] = report["validate"]["teacher"]["top1"]
    row["val_curve"] = report["finetune"]["val_curve"]
    row["steps"] = report["finetune"]["steps"]
    row["ratios"] = [r["pruned"] / r["dense"] for r in lat]
    return row


def _row_lines(row: dict) -> list[str]:
    p, d = row["pruned"], row["dense"]
    (parent, parent_px), (small, small_px) = PAIRS[row["pair"]]

    def spread(m: dict) -> str:
        return f"{m['latency_ms']:.2f} ({m['latency_spread_ms'][0]:.2f}-{m['latency_spread_ms'][1]:.2f})"

    return [f"| {parent} @{parent_px} pruned (`+budget={row['pair']}`) | {p['macs'] / 1e6:.1f}M | {p['params'] / 1e6:.2f}M "
            f"| **{p['top1']:.2f}** | {spread(p)} |",
            f"| {small} @{small_px}, dense | {d['macs'] / 1e6:.1f}M | {d['params'] / 1e6:.2f}M | **{d['top1']:.2f}** "
            f"| {spread(d)} |"]


def write_readme(rows: list[dict], args: argparse.Namespace) -> str:
    """``README.md`` of the results: commands, the table, the learning curves, the verdict per pair."""
    lines = ["# The headline claim on real Lite weights", "",
             "Commands (the script drives the app, then measures; rerunning resumes an interrupted run):", "",
             "```", f"python experiments/lite_headline.py --pairs {' '.join(r['pair'] for r in rows)} "
             f"--latency-runs {args.latency_runs} --rounds {args.rounds}"
             + (f" --out {os.path.relpath(OUT, ROOT)}" if args.out else "")
             + (f" --overrides {' '.join(args.overrides)}" if args.overrides else ""),
             *[" ".join(["python", *app_command(r["pair"], args.overrides)[1:]]).replace(ROOT + "/", "") for r in rows],
             "```", "",
             "Top-1 on imagenet-val-1300 (1300 real ImageNet val images, 725 classes; each model at its own resolution, "
             "timm's eval transform). Latency: ms per batch-1 forward pass on this CPU (2 threads), median over "
             f"{args.latency_runs} separate processes of {args.rounds} interleaved rounds each (range in brackets).", "",
             "| model | MACs | params | top-1 | latency ms |", "|---|---|---|---|---|"]
    for row in rows:
        lines += _row_lines(row)
    lines += [""]
    for row in rows:
        p, d = row["pruned"], row["dense"]
        verdict = "beats" if p["top1"] > d["top1"] else "does not beat"
        ratios = ", ".join(f"{r:.3f}" for r in row["ratios"])
        curve = ", ".join(f"{s}: {t:.1f}" for s, t in row["val_curve"])
        lines += [f"**{row['pair']}**: after {row['steps']} updates the pruned model {verdict} the dense one "
                  f"({p['top1']:.2f} vs {d['top1']:.2f} top-1; its unpruned parent: {row['parent_top1']:.2f}) at "
                  f"{p['macs'] / d['macs']:.4f}x its MACs and {statistics.median(row['ratios']):.3f}x "
                  f"its measured latency (per run: {ratios}). Learning curve (update: top-1): {curve}. "
                  f"Plot: `{row['pair']}_learning_curve.png`.", ""]
    path = os.path.join(OUT, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _copy_plot(pair: str) -> None:
    src = os.path.join(_run_dir(pair), "learning_curve.png")
    if os.path.isfile(src):
        import shutil

        shutil.copyfile(src, os.path.join(OUT, f"{pair}_learning_curve.png"))


def main() -> None:
    global OUT
    args = _args()
    if args.out:
        OUT = os.environ["KP_LITE_HEADLINE_OUT"] = os.path.abspath(args.out)
    if serve_latency_request(args.latency_only, args.rounds, measure_latency_once):
        return
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for pair in args.pairs:
        report = read_report(pair) if args.measure_only else run_app(pair, args.overrides)
        rows.append(compare(pair, report, args.latency_runs, args.rounds))
        _copy_plot(pair)
        with open(os.path.join(OUT, f"{pair}.json"), "w") as f:
            json.dump(rows[-1], f, indent=1)
    print(open(write_readme(rows, args)).read())


if __name__ == "__main__":
    main()
