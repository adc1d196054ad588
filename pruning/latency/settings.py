"""Latency-table settings: accepted backends and dtypes, their validation, the device name, and a table's cache key
and path."""
from __future__ import annotations

import os
import platform
from typing import Any, Mapping, Sequence

import torch

from .._io import short_hash
from ..errors import MissingPackageError, UserInputError
from ..graph import ChannelGraph

FORMAT_VERSION = 1
BACKENDS = ("torch", "onnxruntime")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# sampled fractions of each prunable group's width (the full width is always the last point)
DEFAULT_GRID = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
# uniform keep fractions of the pruned models the calibration line is fitted on (with the parent)
CALIBRATION_FRACTIONS = (0.6, 0.3)


class LatencyTableError(UserInputError):
    """A latency table file that is corrupt or does not match the model and settings it is used for."""


# ---------------------------------------------------------------------------------- settings and cache keys


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserInputError(f"unknown dtype {dtype!r}; accepted: {sorted(DTYPES)}")
        return dtype
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise UserInputError(f"unsupported dtype {dtype}; accepted: {sorted(DTYPES)}")


def check_settings(*, batch: int = 1, threads: int | None = None, device: str = "cpu", backend: str = "torch",
                   dtype: torch.dtype | str = torch.float32) -> None:
    """Validate profiling settings before any work.

    Raises:
        UserInputError: an unknown backend or dtype, a device that is not there, or a batch or thread count < 1.
    """
    if backend not in BACKENDS:
        raise UserInputError(f"unknown latency backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise UserInputError(f"batch must be an integer >= 1, got {batch!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise UserInputError(f"threads must be an integer >= 1 (or None for torch's current setting), got {threads!r}")
    name = _dtype_name(dtype)
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UserInputError(f"unknown device {device!r}; accepted: cpu, cuda (or cuda:N)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"device {device!r} was asked for but no CUDA GPU is available here; use --device cpu")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise UserInputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif name == "float16":
        raise UserInputError("dtype float16 is only supported on CUDA; use float32 or bfloat16 on CPU")
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise MissingPackageError("backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime, "
                                      "or use the torch backend") from e
        if kind == "cuda":
            raise UserInputError("backend 'onnxruntime' runs on the CPU here (pruning.export); use --device cpu")
        if name != "float32":
            raise UserInputError("backend 'onnxruntime' profiles float32 models only")


def device_name(device: str = "cpu") -> str:
    """A human-readable name of the device: the CPU model string or the CUDA device name."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


def _versions(backend: str) -> dict[str, str]:
    import timm

    out = {"torch": torch.__version__, "timm": timm.__version__}
    if backend == "onnxruntime":
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    return out


def table_meta(graph: ChannelGraph, model_name: str, *, batch: int = 1, threads: int | None = None,
               device: str = "cpu", backend: str = "torch", dtype: torch.dtype | str = torch.float32,
               grid: Sequence[float] = DEFAULT_GRID, align: int | str = "auto") -> dict[str, Any]:
    """Everything a latency table depends on: its cache key."""
    return {
        "format": FORMAT_VERSION,
        "model": model_name,
        "input_size": list(graph.input_size),
        "device": str(device),
        "device_name": device_name(device),
        "threads": int(threads or torch.get_num_threads()),
        "batch": int(batch),
        "dtype": _dtype_name(dtype),
        "backend": backend,
        "versions": _versions(backend),
        "protected": list(graph.protected_patterns),
        "groups": {name: [g.width, g.prunable] for name, g in graph.groups.items()},
        "grid": [float(f) for f in grid],
        "align": align if align == "auto" else int(align),
    }


def table_path(cache_dir: str | os.PathLike, meta: Mapping[str, Any]) -> str:
    """The cache file of the table with ``meta``: readable settings plus a hash of the whole key."""
    digest = short_hash(meta, length=12)
    c, h, w = meta["input_size"]
    name = (f"{meta['model']}-{h}x{w}-b{meta['batch']}-t{meta['threads']}-{meta['backend']}-"
            f"{meta['device'].replace(':', '')}-{meta['dtype']}-{digest}.json")
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), name)
