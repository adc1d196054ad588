"""CPU/GPU speed measurements: batch-1 latency and batch throughput, interleaved across models; cuDNN's
autotuning switch.

Models are timed round by round in turn (A, B, C, A, B, C, ...) and the median of the rounds is kept, so a
noisy machine slows every model alike and ratios stay meaningful.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs its kernels asynchronously), so wall-clock timings are
    real; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set to ``enabled`` in the body, then as it was.

    Autotuning times every cuDNN algorithm at each new conv shape once, then runs the fastest: worth it for
    training (thousands of steps at a few shapes), not for profiling (thousands of shapes, each timed a few
    times). The choice made at a shape's first use sticks for the rest of the process, whatever the switch says
    later.
    """
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@torch.no_grad()
def time_forward(model: nn.Module, images: torch.Tensor, repeats: int = 1) -> float:
    """Seconds per forward pass of ``images`` (mean over ``repeats`` after the caller's warm-up)."""
    synchronize(images.device)
    start = time.perf_counter()
    for _ in range(repeats):
        model(images)
    synchronize(images.device)
    return (time.perf_counter() - start) / repeats


def interleaved_calls(calls: Mapping[str, Callable[[], Any]], rounds: int, device: str | torch.device = "cpu"
                      ) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, timed in turn round by round (one extra warm-up round is
    dropped), the device synchronised around each call."""
    device = torch.device(device)
    times: dict[str, list[float]] = {n: [] for n in calls}
    for r in range(rounds + 1):
        for name, fn in calls.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if r > 0:
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(ts) for n, ts in times.items()}


def interleaved_speed(models: Mapping[str, tuple[nn.Module, int]], batch: int, rounds: int = 5, repeats: int = 1,
                      device: str | torch.device = "cpu") -> dict[str, float]:
    """Median seconds per forward pass of a ``batch`` of images, per model, timed in interleaved rounds.

    Args:
        models: name -> (model in eval mode, input resolution).
        batch: images per forward pass (1 for latency).
        rounds: measured rounds (one extra warm-up round is dropped).
        repeats: forward passes per model per round.
    """
    inputs = {n: torch.randn(batch, 3, s, s, device=device) for n, (_, s) in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    for r in range(rounds + 1):
        for name, (model, _) in models.items():
            t = time_forward(model.eval(), inputs[name], repeats)
            if r > 0:
                times[name].append(t)
    return {n: statistics.median(ts) for n, ts in times.items()}
