"""Does cuDNN autotuning pay for fine-tuning on a GPU? Inner-distillation updates of efficientnet_b1 @240 pruned
to timm's flops_490M widths (``Trainer.run``), with ``trainer.cudnn_benchmark`` off and on.

cuDNN keeps the algorithm it first picked for a shape for the rest of the process, so the two settings cannot
share one: each run is a fresh process, and the settings alternate (off, on, off, on, ...). Reported per run:
the first update (which autotunes when on) and the median of the others; then the ratio of the medians.

    python benchmarks/bench_cudnn_autotune.py                        # CUDA: bf16 + channels-last, batch 64, 2 pairs
    python benchmarks/bench_cudnn_autotune.py --modes fp32 bf16 fp16 --pairs 1
    python benchmarks/bench_cudnn_autotune.py --tiny                 # the same code on the CPU (the switch does nothing)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import torch
from torch.utils.data import TensorDataset

from device_check import AMP, ROOT, _batch


def one_run(mode: str, autotune: bool, steps: int, batch: int, img_size: int) -> dict:
    """``steps`` updates in this process; seconds of the first, median ms of the others."""
    from distill import TrainConfig, create_loss
    from distill.train import Trainer
    from pruning import build_channel_graph, create_model, prune_to_widths
    from pruning.paper import paper_widths

    torch.manual_seed(0)
    teacher = create_model("efficientnet_b1").eval()
    graph = build_channel_graph(teacher, img_size)
    student = prune_to_widths(teacher, graph, paper_widths("flops_490M", graph))
    data = TensorDataset(*_batch(2 * batch, img_size))
    cfg = TrainConfig(batch_size=batch, img_size=img_size, workers=0, lr=1e-3, log_every=1, max_steps=steps,
                      epochs=math.ceil(steps / 2), checkpoint_minutes=None, cudnn_benchmark=autotune, **AMP[mode])
    with tempfile.TemporaryDirectory() as out:
        result = Trainer(student, teacher, data, create_loss("inner"), cfg, out, progress=False).run()
    ms = [1000 * batch / h["train/images_per_s"] for h in result.history if "train/images_per_s" in h]
    return {"mode": mode, "autotune": autotune, "first_update_s": ms[0] / 1000, "median_ms": statistics.median(ms[1:]),
            "updates": len(ms)}


def _child(args: argparse.Namespace, mode: str, autotune: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(int(autotune)), "--steps", str(args.steps),
           "--batch", str(args.batch), "--img-size", str(args.img_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"run {mode} autotune={autotune} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="+", choices=sorted(AMP), default=["bf16"])
    ap.add_argument("--pairs", type=int, default=2, help="off/on pairs of runs per mode")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=240)
    ap.add_argument("--tiny", action="store_true", help="batch 4 @64, 4 updates (the CPU)")
    ap.add_argument("--json", default="outputs/bench_cudnn_autotune.json")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "AUTOTUNE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.batch, args.img_size, args.steps = 4, 64, 4
    if args.child:
        print(json.dumps(one_run(args.child[0], bool(int(args.child[1])), args.steps, args.batch, args.img_size)))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (the switch does nothing here)"
    print(f"{device}; inner distillation, b1 @{args.img_size} -> flops_490M widths, batch {args.batch}, "
          f"{args.steps} updates per run")
    print("| mode | pair | autotune off: first update s, median ms | on: first update s, median ms | off / on |")
    print("|---|---|---|---|---|")
    runs = []
    for mode in args.modes:
        for pair in range(args.pairs):
            off, on = _child(args, mode, False), _child(args, mode, True)
            runs += [off, on]
            print(f"| {mode} | {pair + 1} | {off['first_update_s']:.1f}, {off['median_ms']:.1f} "
                  f"| {on['first_update_s']:.1f}, {on['median_ms']:.1f} | {off['median_ms'] / on['median_ms']:.2f} |",
                  flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": device, "args": vars(args), "runs": runs}, f, indent=1)
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
