"""The GPU paths in one command: AMP fine-tuning with resume, throughput, step costs, the app under torchrun, and
CUDA latency tables. Prints one table and writes ``device_check.json``.

    python benchmarks/device_check.py                      # real sizes on a GPU (4 minutes on one H200)
    python benchmarks/device_check.py --tiny               # the same code at tiny sizes (what a CPU machine runs)
    python benchmarks/device_check.py --sections app latency --out outputs/device_check.json   # a rerun of some

Sections (each runs even when an earlier one failed; the JSON is rewritten after each):

1. ``finetune``: efficientnet_b1 @240 pruned to timm's published flops_490M widths (narrowed stage outputs, so
   inner distillation trains projections), fine-tuned under fp32, bf16 + channels-last, and fp16 with a
   GradScaler + channels-last. Each AMP run is interrupted after a checkpoint and resumed in a fresh trainer; the
   losses must stay finite and the resumed run must end at the last update.
2. ``throughput``: dense efficientnet_b1 @240, timm's ``efficientnet_b1_pruned`` and our flops_490M model (L1
   importance, exact knapsack) at batch 256 under fp16 autocast and channels-last, interleaved; ratios against
   dense b1 (timm's published anchor: b1_pruned at 1.57x dense b1 on an RTX 4090).
3. ``step_costs``: Taylor importance throughput against a plain forward+backward (goal >= 0.9), and an
   inner-distillation step against a cross-entropy step (goal <= 1.35).
4. ``app``: ``torchrun --nproc_per_node=1 -m pruning.run +experiment=quickstart ... trainer.max_steps=20`` end to
   end (a group of one: NCCL on a GPU), on synthetic image folders unless ``--data-dir`` gives the real ones.
5. ``latency``: the CUDA latency table of efficientnet_b0 @224 at batch 1 and 64, and its prediction error on 10
   random width configurations (``benchmarks/bench_latency_prediction.py``).

Without a GPU (or with ``--tiny``) every section runs at tiny sizes on the CPU; what needs CUDA (fp16 with a
GradScaler, NCCL, CUDA timings) is listed as skipped, with the reason. Models have random weights: the check
proves code paths and speeds, not accuracy (``--checkpoint`` gives b1 real weights, which change "ours").
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import bench_distill
import bench_importance
import bench_latency_prediction
from distill import TrainConfig, create_loss
from distill.precision import autocast
from distill.checkpoint import LAST, load_checkpoint
from distill.train import Trainer
from pruning import build_channel_graph, create_model, prune_to_widths
from pruning.artifacts import REPORT, read_json, write_json
from pruning.count import count_model
from pruning.importance import create_importance
from pruning.paper import paper_widths
from pruning.search import search
from pruning.speed import cudnn_autotuning, interleaved_speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("finetune", "throughput", "step_costs", "app", "latency")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check (GPU) and the tiny one (CPU)."""

    img_size: int = 240
    budget: str = "flops_490M"       # our model's MACs budget (a fraction at tiny sizes, where 490M is above b1)
    ft_batch: int = 64
    ft_steps: int = 30
    amp_modes: tuple[str, ...] = ("fp32", "bf16", "fp16")
    tp_batch: int = 256
    tp_rounds: int = 10
    tp_amp: str = "fp16"
    step_batch: int = 64
    step_rounds: int = 7
    app_steps: int = 20
    app_overrides: tuple[str, ...] = ()
    app_images: tuple[int, int] = (704, 256)  # synthetic training and validation images (20 updates of 32 + a few)
    latency_model: str = "efficientnet_b0"
    latency_img: int = 224
    latency_batches: tuple[int, ...] = (1, 64)
    latency_configs: int = 10
    latency_rounds: int = 5


TINY = Sizes(img_size=64, budget="0.7", ft_batch=4, ft_steps=4, amp_modes=("fp32", "bf16"), tp_batch=4,
             tp_rounds=2, tp_amp="bf16", step_batch=4, step_rounds=2, app_steps=2, app_images=(48, 48),
             app_overrides=("model.img_size=64", "importance.num_images=16", "importance.batch_size=8",
                            "bn_recalibration.num_images=16", "trainer.batch_size=8", "data.val_batch_size=16",
                            "data.workers=0", "trainer.workers=0", "latency.rounds=1"),
             latency_img=32, latency_batches=(1,), latency_configs=2, latency_rounds=1)
AMP = {"fp32": dict(amp=None, channels_last=False), "bf16": dict(amp="bf16", channels_last=True),
       "fp16": dict(amp="fp16", channels_last=True)}


@dataclass
class Section:
    """One section's outcome: passed, failed (with the error) or skipped (with the reason)."""

    name: str
    status: str = "passed"
    seconds: float = 0.0
    summary: str = ""
    skipped: list[str] = field(default_factory=list)  # CUDA parts not run here, each with why
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class CheckFailed(AssertionError):
    """A property the device check requires did not hold."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ------------------------------------------------------------------------------------------- models


def _models(sizes: Sizes, checkpoint: str | None = None) -> dict[str, Any]:
    """Dense b1 (random weights, seeded, unless ``checkpoint``), its graph, the published-widths student and our L1
    knapsack model."""
    torch.manual_seed(0)
    dense = create_model("efficientnet_b1", checkpoint=checkpoint).eval()
    graph = build_channel_graph(dense, sizes.img_size)
    published = prune_to_widths(dense, graph, paper_widths("flops_490M", graph))
    ours = search(dense, graph, create_importance("l1")(dense, graph), sizes.budget).pruned
    return {"dense": dense, "graph": graph, "published_widths": published, "ours": ours}


def _batch(n: int, img_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, img_size, img_size, generator=gen), torch.randint(0, 1000, (n,), generator=gen)


# ----------------------------------------------------------------------------------------- 1. finetune


class _Interrupt(Exception):
    """Raised by the logger to stop a run the way a killed job stops."""


class _Recorder:
    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.steps = stop_at, []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.steps.append((step, metrics))
        if self.stop_at is not None and step >= self.stop_at:
            raise _Interrupt(step)


def _finetune_mode(mode: str, m: dict, sizes: Sizes, out: str, device: torch.device) -> dict[str, Any]:
    """One precision mode: interrupted after a mid-run checkpoint, resumed in a fresh trainer, to the end."""
    half = sizes.ft_steps // 2
    x, y = _batch(sizes.ft_batch * 2, sizes.img_size)
    data = TensorDataset(x, y)  # 2 batches per epoch: the run crosses epochs and mid-epoch checkpoints
    train = TrainConfig(batch_size=sizes.ft_batch, img_size=sizes.img_size, workers=0, lr=1e-3, log_every=1,
                        epochs=math.ceil(sizes.ft_steps / 2), max_steps=sizes.ft_steps, checkpoint_every_steps=half,
                        checkpoint_minutes=None, **AMP[mode])

    def trainer(logger: _Recorder) -> Trainer:
        return Trainer(copy.deepcopy(m["published_widths"]), m["dense"], data, create_loss("inner"), train,
                       out, logger=logger, progress=False)

    first = trainer(_Recorder(stop_at=half + 1))
    require(len(first.module.projections) > 0, "the published widths narrow no matched point: no projections")
    try:
        first.run()
        raise CheckFailed("the interrupting logger did not stop the first run")
    except _Interrupt:
        pass
    recorder = _Recorder()
    second = trainer(recorder)
    result = second.run()
    ckpt = load_checkpoint(os.path.join(out, LAST))
    losses = [h["train/loss"] for h in result.history if "train/loss" in h]
    require(second.resumed_from == half, f"resumed from update {second.resumed_from}, expected {half}")
    require(result.steps == sizes.ft_steps and ckpt["step"] == sizes.ft_steps, f"ended at {result.steps} updates")
    require(all(math.isfinite(v) for v in losses), f"non-finite losses: {losses}")
    require((ckpt["scaler"] is not None) == (mode == "fp16"), "the grad scaler state is missing or unexpected")
    # per-update wall time of the resumed run (log_every=1: each logged window is one update), its first dropped
    step_ms = [1000 * sizes.ft_batch / mtr["train/images_per_s"] for _, mtr in recorder.steps[1:]] or [float("nan")]
    return {"amp": AMP[mode]["amp"], "channels_last": AMP[mode]["channels_last"], "projections": len(first.module.projections),
            "resumed_from": second.resumed_from, "steps": result.steps, "first_loss": losses[0], "last_loss": losses[-1],
            "step_ms_median": statistics.median(step_ms), "batch": sizes.ft_batch,
            "scaler_scale": float(ckpt["scaler"]["scale"]) if ckpt["scaler"] else None}


def check_finetune(sizes: Sizes, device: torch.device, models: Callable[[], dict], section: Section) -> None:
    m = models()
    modes = {}
    for mode in sizes.amp_modes:
        with tempfile.TemporaryDirectory() as out:
            modes[mode] = _finetune_mode(mode, m, sizes, out, device)
    section.details = {"model": f"efficientnet_b1@{sizes.img_size} -> published flops_490M widths",
                       "macs": count_model(m["published_widths"], sizes.img_size).macs, "modes": modes}
    section.summary = "; ".join(f"{k} {v['step_ms_median']:.0f} ms/step, loss {v['first_loss']:.3g}->{v['last_loss']:.3g}"
                                for k, v in modes.items())


# --------------------------------------------------------------------------------------- 2. throughput


class _Inference(nn.Module):
    """A model run under autocast in channels-last layout, as timm's benchmark runs it with --amp --channels-last."""

    def __init__(self, model: nn.Module, amp: str | None, device: torch.device) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(device, memory_format=torch.channels_last).eval()
        self.amp = amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.amp, x.device):
            return self.model(x.contiguous(memory_format=torch.channels_last))


def check_throughput(sizes: Sizes, device: torch.device, models: Callable[[], dict], section: Section) -> None:
    m = models()
    candidates = {"dense b1": m["dense"], "timm b1_pruned": create_model("efficientnet_b1_pruned"), "ours": m["ours"]}
    timed = {k: (_Inference(v, sizes.tp_amp, device), sizes.img_size) for k, v in candidates.items()}
    with cudnn_autotuning(True):  # as timm's benchmark
        seconds = interleaved_speed(timed, sizes.tp_batch, rounds=sizes.tp_rounds, repeats=3, device=device)
    rows = {k: {"macs": count_model(v, sizes.img_size).macs, "img_per_s": sizes.tp_batch / seconds[k],
                "vs_dense": seconds["dense b1"] / seconds[k]} for k, v in candidates.items()}
    section.details = {"batch": sizes.tp_batch, "img_size": sizes.img_size, "amp": sizes.tp_amp, "channels_last": True,
                       "our_budget": sizes.budget, "published_anchor": "timm b1_pruned 1.57x dense b1 (RTX 4090)",
                       "models": rows}
    section.summary = "; ".join(f"{k} {r['img_per_s']:.0f} img/s ({r['vs_dense']:.2f}x)" for k, r in rows.items())


# ------------------------------------------------------------------------------------------ 3. step costs


def check_step_costs(sizes: Sizes, device: torch.device, models: Callable[[], dict], section: Section) -> None:
    m = models()
    x, y = _batch(sizes.step_batch, sizes.img_size, seed=1)
    dense = copy.deepcopy(m["dense"]).to(device)
    imp = bench_importance.importance_times(dense, m["graph"], x.to(device), y.to(device), sizes.step_rounds, batches=4)
    steps, fast = bench_distill.step_times(m["ours"], m["dense"], x, y, sizes.step_rounds, batch_size=sizes.step_batch,
                                           img_size=sizes.img_size, amp=AMP["bf16"]["amp"], channels_last=True)
    ratios = {"taylor_weight vs plain (throughput, goal >= 0.9)": imp["plain"] / imp["taylor_weight"],
              "taylor_activation vs plain (throughput, goal >= 0.9)": imp["plain"] / imp["taylor_activation"],
              "inner vs ce step (time, goal <= 1.35)": steps["inner"] / steps["ce"]}
    section.details = {"batch": sizes.step_batch, "img_size": sizes.img_size, "distill_amp": "bf16",
                       "importance_seconds": imp, "step_seconds": steps, "projections": len(fast.module.projections),
                       "ratios": ratios}
    section.summary = "; ".join(f"{k.split(' (')[0]} {v:.2f}" for k, v in ratios.items())


# -------------------------------------------------------------------------------------------------- 4. app


def synthetic_pools(root: str, images: tuple[int, int], seed: int = 0) -> dict[str, str]:
    """Two labelled folders of smooth random JPEGs (``labels.csv``, 1000 classes drawn at random): a training pool
    and a validation set. Accuracy on them means nothing; they carry real files through the real loaders."""
    rng = np.random.default_rng(seed)
    folders = {}
    for split, count in zip(("train", "val"), images):
        folder = os.path.join(root, split)
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        rows = ["file,label_index"]
        for i in range(count):
            small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((160, 160), Image.BILINEAR).save(os.path.join(folder, "images", f"{i}.jpg"))
            rows.append(f"images/{i}.jpg,{rng.integers(0, 1000)}")
        with open(os.path.join(folder, "labels.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")
        folders[split] = folder
    return folders


def _data_overrides(data_dir: str | None, scratch: str, images: tuple[int, int]) -> list[str]:
    if data_dir:
        return [f"data.dir={os.path.abspath(data_dir)}"]
    pools = synthetic_pools(os.path.join(scratch, "data"), images)
    return [f"data.train_roots=[{pools['train']}]", f"data.val_root={pools['val']}", "data.balance=null"]


def check_app(sizes: Sizes, device: torch.device, args: argparse.Namespace, section: Section) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = os.path.join(scratch, "run")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "pruning.run",
               "+experiment=quickstart", "logger=none", f"trainer.max_steps={sizes.app_steps}",
               f"hydra.run.dir={run_dir}", f"paths.cache_dir={os.path.join(scratch, 'cache')}",
               *_data_overrides(args.data_dir, scratch, sizes.app_images), *sizes.app_overrides]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.app_timeout)
        section.details = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "log_tail": proc.stderr[-3000:]}
        require(proc.returncode == 0, f"the app exited {proc.returncode}: {proc.stderr[-1500:]}")
        report = read_json(os.path.join(run_dir, REPORT))
    dist = report["run"]["distributed"]
    expected = "nccl" if device.type == "cuda" else "gloo"
    require(dist["backend"] == expected and dist["processes"] == 1, f"ran as {dist}, expected a {expected} group of one")
    require(report["finetune"]["steps"] == sizes.app_steps, f"fine-tuned {report['finetune']['steps']} updates")
    require(dist["device"].startswith(device.type), f"ran on {dist['device']}, expected {device.type}")
    section.details.update(distributed=dist, macs=report["model"]["macs_after"], finetune_steps=report["finetune"]["steps"],
                           top1_synthetic=report["validate"]["student"]["top1"], timings=report.get("timings"), data="real" if args.data_dir else "synthetic")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report["timings"].items())
    section.summary = f"{dist['backend']} x{dist['processes']} on {dist['device']}, {sizes.app_steps} updates; {stages}"


# ---------------------------------------------------------------------------------------------- 5. latency


def check_latency(sizes: Sizes, device: torch.device, args: argparse.Namespace, section: Section) -> None:
    with tempfile.TemporaryDirectory() as cache:
        opts = argparse.Namespace(align="auto", cache_dir=cache, threads=None if device.type == "cuda" else 2,
                                  device=str(device), backend="torch", no_progress=device.type != "cuda", configs=sizes.latency_configs,
                                  seed=0, any_width=False, remove_blocks=0.0, rounds=sizes.latency_rounds)
        results = [bench_latency_prediction.run_one(sizes.latency_model, sizes.latency_img, b, opts)
                   for b in sizes.latency_batches]
    for r in results:
        bench_latency_prediction.print_result(r)
    section.details = {"tables": [{k: v for k, v in r.items() if k not in ("points", "table")} for r in results],
                       "points": {r["batch"]: r["points"] for r in results}}
    section.summary = "; ".join(f"batch {r['batch']}: table {r['profile_seconds']:.0f} s ({bench_latency_prediction.phases_text(r)}), median |err| "
                                f"{100 * r['median_abs_error']:.1f}%, max {100 * r['max_abs_error']:.1f}%" for r in results)


# ------------------------------------------------------------------------------------------------ driver


def _skips(device: torch.device) -> dict[str, list[str]]:
    if device.type == "cuda":
        return {}
    why = "no CUDA device here" if not torch.cuda.is_available() else "--tiny runs on the CPU"
    return {"finetune": [f"fp16 with a GradScaler ({why}; fp16 autocast needs CUDA)"],
            "throughput": [f"fp16 autocast at batch 256 @240 ({why}; bf16 at tiny sizes instead)"],
            "app": [f"NCCL ({why}; gloo instead)"],
            "latency": [f"CUDA latency tables of efficientnet_b0 @224 at batch 1 and 64 ({why}; a CPU table at tiny sizes instead)"]}


def _environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    else:
        env.update(cpu_threads=torch.get_num_threads())
    return env


def _run_section(name: str, fn: Callable[[Section], None], skipped: list[str]) -> Section:
    section = Section(name, skipped=skipped)
    start = time.perf_counter()
    print(f"== {name} ...", flush=True)
    try:
        fn(section)
    except Exception as e:  # a device check reports every failure, then goes on to the next section
        section.status, section.error = "failed", f"{type(e).__name__}: {e}"
        section.details["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
    section.seconds = time.perf_counter() - start
    print(f"== {name}: {section.status} in {section.seconds:.0f} s  {section.summary or section.error or ''}", flush=True)
    return section


def print_table(env: dict[str, Any], sections: list[Section]) -> None:
    print(f"\ndevice check on {env.get('gpu', env['device'])} (torch {env['torch']}, {env['date']})")
    print("| section | status | seconds | result |")
    print("|---|---|---|---|")
    for s in sections:
        print(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.summary or s.error or ''} |")
        for reason in s.skipped:
            print(f"|   | skipped | | {reason} |")


def _override(sizes: Sizes, pairs: list[str]) -> Sizes:
    """``sizes`` with ``FIELD=VALUE`` pairs applied, each value parsed as its field's type (tuples comma-separated)."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not hasattr(sizes, key):
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(asdict(sizes))}")
        current = getattr(sizes, key)
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            changes[key] = tuple(kind(v) for v in value.split(",") if v)
        else:
            changes[key] = type(current)(value)
    return replace(sizes, **changes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU even where a GPU is present")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--out", default="device_check.json", help="where the JSON goes (rewritten after each section)")
    ap.add_argument("--data-dir", default=None, help="a folder laid out like ../shared/data for the app section "
                                                     "(default: synthetic image folders)")
    ap.add_argument("--checkpoint", default=None, help="efficientnet_b1 weights (a state_dict file); default: random "
                                                       "weights, whose L1 scores give an unrepresentative 'ours'")
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="change a size, e.g. latency_rounds=3 latency_batches=1,64 (fields of Sizes)")
    ap.add_argument("--app-timeout", type=float, default=300.0, help="seconds the app section may take")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    sizes = Sizes() if device.type == "cuda" else TINY
    if args.set:
        sizes = _override(sizes, args.set)
    env, skips, cache = _environment(device), _skips(device), {}

    def models() -> dict:
        if not cache:
            cache.update(_models(sizes, args.checkpoint))
        return cache

    runners = {"finetune": lambda s: check_finetune(sizes, device, models, s),
               "throughput": lambda s: check_throughput(sizes, device, models, s),
               "step_costs": lambda s: check_step_costs(sizes, device, models, s),
               "app": lambda s: check_app(sizes, device, args, s),
               "latency": lambda s: check_latency(sizes, device, args, s)}
    done: list[Section] = []
    for name in args.sections:
        done.append(_run_section(name, runners[name], skips.get(name, [])))
        write_json(args.out, {"environment": env, "sizes": asdict(sizes), "sections": [asdict(s) for s in done]})
    print_table(env, done)
    print(f"written: {args.out}")
    return 0 if all(s.status == "passed" for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
