"""Timing primitives: repeated timings and their noise handling, warm-up and the steady allocator, torch's thread
count, the backends' runners (torch, ONNX Runtime), and end-to-end latency (:func:`measure_latency`)."""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import platform
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..speed import interleaved_speed, synchronize
from .settings import DTYPES, _dtype_name, check_settings

if TYPE_CHECKING:
    from .nodes import _Job


# --------------------------------------------------------------------------------------------------- timing


def _sync(device: str) -> Callable[[], None]:
    """A no-argument :func:`~pruning.speed.synchronize` of ``device``, for the timing loops."""
    return functools.partial(synchronize, torch.device(device))


def _time_ms(fn: Callable[[], Any], sync: Callable[[], None], *, min_seconds: float = 1e-3, repeats: int = 3,
             warmup: int = 1) -> float:
    """Ms per call of ``fn``: the fastest of ``repeats`` timings of ``n`` calls (``n`` making one >= min_seconds).

    The minimum, not the median: a busy machine only ever slows a timing down, so the fastest repeat is the
    best estimate of the op's own time.
    """
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start  # also a last warm-up call
    n = max(1, min(1000, int(min_seconds / max(once, 1e-7))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / n)
    return min(samples) * 1e3


@contextlib.contextmanager
def _stopwatch(into: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the ``with`` body takes to ``into[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - start


def _settled(samples: Sequence[float], tolerance: float) -> bool:
    """True when the two fastest of ``samples`` agree within ``tolerance`` (relative) or 2 microseconds."""
    if len(samples) < 2:
        return False
    first, second = sorted(samples)[:2]
    return second - first <= max(tolerance * first, 2e-3)


def _measure_jobs(jobs: Mapping[str, _Job], runner, device: str, *, progress: bool, repeats: int,
                  min_seconds: float, passes: int = 2, max_passes: int = 5, tolerance: float = 0.1,
                  desc: str = "latency table") -> dict[str, float]:
    """Time every distinct job (ms): the fastest over several passes through all of them.

    A busy machine slows timings in bursts that can last longer than one job's repeats, so each job is timed
    once per pass, passes seconds apart; after ``passes`` passes, jobs whose two fastest timings still
    disagree by more than ``tolerance`` are timed again, up to ``max_passes``.
    """
    from tqdm.auto import tqdm

    sync = _sync(device)
    samples: dict[str, list[float]] = {k: [] for k in jobs}
    todo = list(jobs)
    passes = max(1, passes)
    max_passes = 1 if passes == 1 else max(passes, max_passes)  # one pass: quick tables, no retries
    with tqdm(total=len(jobs) * passes, desc=desc, unit="timing", disable=not progress, dynamic_ncols=True) as bar:
        for p in range(max_passes):
            for key in todo:
                module, inputs = jobs[key].build()
                samples[key].append(_time_ms(runner(module, inputs), sync, min_seconds=min_seconds, repeats=repeats))
                del module, inputs
                bar.update()
            if p + 1 < passes:
                continue
            todo = [k for k in jobs if not _settled(samples[k], tolerance)]
            if not todo or p + 1 == max_passes:
                break
            bar.total += len(todo)
            bar.refresh()
    return {k: min(v) for k, v in samples.items()}


def _monotone(values: np.ndarray) -> np.ndarray:
    """The largest non-decreasing table below ``values``: a wider layer is never cheaper, whatever the noise.

    Each value becomes the minimum over all wider points (a running minimum from the full width down, along
    every axis). Noise on a busy machine only adds time, so a narrow point slower than a wider one is the
    noisy one; a running maximum would instead copy such an outlier onto every wider point.
    """
    out = np.asarray(values, dtype=np.float64)
    for axis in range(out.ndim):
        flipped = np.flip(out, axis=axis)
        out = np.flip(np.minimum.accumulate(flipped, axis=axis), axis=axis)
    return out


def _lookup(times: Mapping[str, float], keys: np.ndarray) -> np.ndarray:
    """The measured time of every key of an object array (same shape)."""
    return np.vectorize(times.__getitem__, otypes=[np.float64])(keys) if keys.ndim else np.float64(times[keys[()]])


def _page_faults() -> int:
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _warm_up(runners: Sequence[Callable[[], Any]], sync: Callable[[], None], max_rounds: int = 6) -> None:
    """Run every model in turn until a round page-faults little (the heap has grown to its steady size).

    With several models interleaved, the allocator's heap keeps growing (and faulting pages in) for a few
    rounds; efficientnet_b0 @224 batch 32 with nine pruned copies: ~200,000 faults per round for 3 rounds,
    then ~2,500. Timing before then would charge the growth to whichever model happened to trigger it.
    """
    first = None
    for _ in range(max_rounds):
        before = _page_faults()
        for fn in runners:
            fn()
        sync()
        faults = _page_faults() - before
        first = faults if first is None else first
        if faults <= max(0.05 * first, 500 * len(runners)):
            break


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_steady = False


def steady_allocator() -> bool:
    """Make glibc keep freed memory for reuse, as a long-running server's allocator does; True if it applied.

    With glibc's defaults, torch on the CPU maps every activation above a dynamic threshold (at most 32 MiB)
    fresh and returns the free top of the heap to the OS, so each forward pass page-faults its activations
    in again. Measured here (efficientnet_b0 @224, 2 threads): batch 32 takes ~800 ms with ~520,000 page
    faults per pass instead of ~270 ms with none; batch 1 takes 17 ms in a fresh process (~6,000 faults)
    and 10-12 ms once the threshold has grown. How many faults a pass takes depends on the process's whole
    allocation history, so timings would not be reproducible. Profiling and :func:`measure_latency`
    therefore switch this process to ``mmap`` off and no trimming (``mallopt``), which is what jemalloc,
    tcmalloc, ONNX Runtime's arena and CUDA's caching allocator do anyway. The setting lasts for the rest of
    the process (its memory stays at its peak). Not glibc: nothing to do.
    """
    global _steady
    if _steady:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        _steady = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
    return _steady


class _threads:
    """Context manager: torch's intra-op thread count set to ``threads`` (None: unchanged); yields the count."""

    def __init__(self, threads: int | None) -> None:
        self.threads, self.before = threads, torch.get_num_threads()

    def __enter__(self) -> int:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return torch.get_num_threads()

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.before)


# ------------------------------------------------------------------------------------------------- backends


def _torch_call(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return module(*inputs)

    return run


def _ort_call(module: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int) -> Callable[[], Any]:
    import warnings

    from ..export import ort_runner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about in-place activations; they export fine
        return ort_runner(module, inputs, threads)


def _node_runner(backend: str, threads: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], Callable[[], Any]]:
    if backend == "onnxruntime":
        return lambda module, inputs: _ort_call(module, inputs, threads)
    return _torch_call


class _Runner(nn.Module):
    """Adapts a zero-argument callable to :func:`pruning.speed.interleaved_speed` (its input is ignored)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, _: torch.Tensor) -> Any:
        return self.fn()


def _model_runner(model: nn.Module, shape: tuple[int, ...], *, device: str, backend: str, dtype: torch.dtype,
                  threads: int) -> Callable[[], Any]:
    """A zero-argument callable running ``model`` once on a fixed random input of ``shape``."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if backend == "onnxruntime":
        return _ort_call(model, (x,), threads)  # exports a float32 CPU eval copy
    param = next(model.parameters(), None)
    ready = param is None or (param.device == torch.device(device) and param.dtype == dtype)
    if model.training or not ready:  # the caller's model keeps its mode, device and dtype
        model = copy.deepcopy(model).to(device, dtype).eval()
    return _torch_call(model, (x.to(device, dtype),))


# ----------------------------------------------------------------------------------------------- end to end


def measure_latency(models: Mapping[str, nn.Module], img_size: int | Sequence[int], *, batch: int = 1,
                    threads: int | None = None, device: str = "cpu", backend: str = "torch", rounds: int = 7,
                    dtype: torch.dtype | str = torch.float32, in_chans: int = 3) -> dict[str, float]:
    """End-to-end latency (ms per forward pass of ``batch`` images) of each model, timed in interleaved rounds.

    Models are run in turn within each round (:func:`pruning.speed.interleaved_speed`) and the median over
    ``rounds`` is kept, so background noise slows every model alike. Each round runs each model enough times
    to last about 50 ms. Before, glibc is put in its steady state (:func:`steady_allocator`) and every model
    runs in turn until the heap stops growing. On the CPU, interleaving more than about ten models needs a
    larger oneDNN kernel cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=16384`` set before torch is imported):
    with the default 1024 kernels they evict each other's and each runs ~15% slower than alone.

    Args:
        models: name -> model (left unchanged: a copy is timed where the mode, device or dtype differ).
        img_size: input resolution, an int (square) or ``(H, W)``.
        batch, threads, device, backend, dtype: see :func:`profile_latency`.
        rounds: measured rounds (one more warm-up round is dropped).
        in_chans: input channels.

    Returns:
        name -> median ms per forward pass.
    """
    check_settings(batch=batch, threads=threads, device=device, backend=backend, dtype=dtype)
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    torch_dtype = DTYPES[_dtype_name(dtype)]
    if str(device) == "cpu":
        steady_allocator()
    with _threads(threads) as n_threads:
        runners = {name: _model_runner(m, (batch, in_chans, *hw), device=device, backend=backend, dtype=torch_dtype,
                                       threads=n_threads) for name, m in models.items()}
        _warm_up(list(runners.values()), _sync(device))
        once = [_time_ms(fn, _sync(device), min_seconds=0.0, repeats=1, warmup=0) / 1e3 for fn in runners.values()]
        repeats = max(1, min(50, math.ceil(0.05 / max(min(once), 1e-6))))
        seconds = interleaved_speed({n: (_Runner(fn), 1) for n, fn in runners.items()}, batch=1, rounds=rounds,
                                    repeats=repeats, device=device)
    return {n: t * 1e3 for n, t in seconds.items()}
