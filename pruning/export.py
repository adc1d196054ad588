"""ONNX export of (pruned) models and ONNX Runtime sessions on the CPU.

``export_onnx`` writes the deployable ``pruned.onnx`` of a run (dynamic batch, opset 17 or later);
``ort_session`` opens such a file the way a deployment would; ``ort_runner`` exports any small module (one
layer, an add of two tensors) and returns a function that runs it once, so a profiler can time single layers
under ONNX Runtime instead of torch.

Exporter choice: the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``). Measured on
torch 2.14.1 with timm's efficientnet_b0, tf_efficientnet_lite0, mobilenetv3_large_100 and resnet18 at 64 px,
both exporters give outputs equal to torch's (max abs diff < 1e-5) and a single file with a dynamic batch, but:

* the legacy exporter takes ~0.3 s per model and ~0.05 s per layer; the dynamo exporter takes 2-7 s per model
  and ~2 s even for a single conv, which matters to a profiler that exports hundreds of layers;
* the dynamo exporter only implements opset 18 and later; asked for 17, its down-conversion fails on timm's
  EfficientNets (``No Adapter To Version 17 for Pad``) and prints a traceback before keeping opset 18.

torch deprecates the legacy exporter, so when it fails (or disappears in a later torch) the model is exported
with the dynamo exporter instead, at opset ``max(opset, 18)``; that path needs ``onnxscript``.
"""
from __future__ import annotations

import copy
import importlib
import io
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ._io import atomic_write
from .errors import MissingPackageError

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

MIN_OPSET = 17
DYNAMO_MIN_OPSET = 18  # the dynamo exporter has no implementations below opset 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def require(package: str) -> Any:
    """Import ``package`` or raise a :class:`MissingPackageError` (an ImportError) naming it and its install command.

    Args:
        package: ``onnx``, ``onnxruntime`` or ``onnxscript``.

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise MissingPackageError(
            f"ONNX export / ONNX Runtime needs the package {package!r}, which is not importable ({e}). "
            f"Install it with `pip install {package}` (or reinstall this project: `pip install -e .`)"
        ) from e


def _cpu_eval_copy(module: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``module`` in eval mode; the caller's module keeps its device, dtype and mode."""
    return copy.deepcopy(module).to(device="cpu", dtype=torch.float32).eval()


def _image_size(img_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, with a clear error for anything else."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"img_size must be a positive int or a (height, width) pair of them, got {img_size!r}")
    return size  # type: ignore[return-value]


def _in_chans(model: nn.Module) -> int:
    """Input channels: timm's recorded input size, else the first conv's input channels, else 3 (RGB)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return int(cfg["input_size"][0])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3


def _export_torchscript(module: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int, input_names: list[str],
                        output_names: list[str], dynamic_axes: dict[str, dict[int, str]] | None) -> bytes:
    """The legacy TorchScript exporter, serialised in memory (single file: no external data)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the deprecation notice is known (see the module docstring); tracer warnings say that spatial sizes
        # become constants, which is intended: only the batch dimension is dynamic
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, inputs, buffer, opset_version=opset, dynamo=False, do_constant_folding=True,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    return buffer.getvalue()


def _export_dynamo(module: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int, input_names: list[str],
                   output_names: list[str], dynamic_axes: dict[str, dict[int, str]] | None) -> bytes:
    """The torch.export-based exporter (needs onnxscript), at opset 18 or later, serialised in memory."""
    require("onnxscript")
    dynamic_shapes = None
    if dynamic_axes:  # {input name: {axis: symbol}} -> per input {axis: Dim(symbol)}, one Dim per symbol
        dims = {symbol: torch.export.Dim(symbol) for spec in dynamic_axes.values() for symbol in spec.values()}
        dynamic_shapes = tuple(
            {axis: dims[symbol] for axis, symbol in dynamic_axes.get(name, {}).items()} or None for name in input_names
        )
    program = torch.onnx.export(module, inputs, dynamo=True, opset_version=max(opset, DYNAMO_MIN_OPSET),
                                input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
                                external_data=False, verbose=False)
    return program.model_proto.SerializeToString()


def onnx_bytes(module: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int = MIN_OPSET,
               input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
               dynamic_axes: dict[str, dict[int, str]] | None = None) -> bytes:
    """Export ``module`` (as it is: mode, device and dtype are the caller's) to a serialised ONNX model.

    Tries the legacy TorchScript exporter first and falls back to the dynamo exporter when it fails.

    Args:
        module: the module to export; called as ``module(*inputs)``.
        inputs: example inputs; their shapes are fixed in the graph except for ``dynamic_axes``.
        opset: the ONNX opset to target (at least 17; the dynamo fallback uses at least 18).
        input_names: graph input names (default ``input_0``, ``input_1``, ...).
        output_names: graph output names (default ``output_0``, ...).
        dynamic_axes: graph input/output name -> {axis: symbolic name}, e.g. a dynamic batch.

    Returns:
        The model as bytes, weights included.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: ONNX export here targets opset {MIN_OPSET} or later")
    names_in = list(input_names or (f"input_{i}" for i in range(len(inputs))))
    names_out = list(output_names or ["output_0"])
    try:
        return _export_torchscript(module, inputs, opset, names_in, names_out, dynamic_axes)
    except Exception as legacy_error:
        try:
            return _export_dynamo(module, inputs, opset, names_in, names_out, dynamic_axes)
        except Exception as dynamo_error:
            raise RuntimeError(
                f"ONNX export of {type(module).__name__} failed with both torch exporters. "
                f"TorchScript: {_summary(legacy_error)}. dynamo: {_summary(dynamo_error)}. "
                "The full errors are chained below"
            ) from dynamo_error


def _summary(error: Exception) -> str:
    """The error's type and the first line of its message (the dynamo exporter's run to pages)."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:300]}"


def export_onnx(model: nn.Module, path: str, img_size: int | tuple[int, int], opset: int = MIN_OPSET,
                dynamic_batch: bool = True) -> str:
    """Export an image model to a single ONNX file (input ``input``, output ``logits``), written atomically.

    A float32 CPU copy in eval mode is exported, so ``model`` may be on any device or in train mode and is
    left untouched. The file is validated with ``onnx.checker`` before it replaces ``path``. Weights are stored
    inside the file (no external data), which limits a model to protobuf's 2 GiB; pruned CNNs are far smaller.

    Args:
        model: an image model taking ``(batch, channels, height, width)``.
        path: the ``.onnx`` file to write.
        img_size: input height and width (fixed in the graph): an int or ``(height, width)``.
        opset: the ONNX opset, at least 17.
        dynamic_batch: make the batch dimension of input and output symbolic (``batch``).

    Returns:
        ``path``.
    """
    onnx = require("onnx")
    height, width = _image_size(img_size)
    module = _cpu_eval_copy(model)
    # batch 2 when dynamic: a trace at batch 1 could bake a size-1 batch into a reshape or squeeze
    example = torch.randn(2 if dynamic_batch else 1, _in_chans(module), height, width,
                          generator=torch.Generator().manual_seed(0))
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with torch.no_grad():
        data = onnx_bytes(module, (example,), opset, [INPUT_NAME], [OUTPUT_NAME], axes)
    onnx.checker.check_model(onnx.load_from_string(data))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
    return path


def ort_session(path: str | bytes, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU, with every graph optimisation and one sequential executor.

    Args:
        path: an ``.onnx`` file, or a serialised model (bytes).
        threads: intra-op threads (default: ONNX Runtime's choice, one per physical core).

    Returns:
        The ``onnxruntime.InferenceSession``.
    """
    ort = require("onnxruntime")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1 (or None for ONNX Runtime's default), got {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # one operator at a time, each using the intra-op pool: what a CNN's chain of layers can use, and what
    # makes per-layer timings add up to the model's
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: profiling builds many sessions, each may warn about unused inputs
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def ort_runner(module: nn.Module, example_inputs: tuple[torch.Tensor, ...],
               threads: int | None = None) -> Callable[[], list[np.ndarray]]:
    """Export ``module`` with fixed input shapes and return a function that runs it once in ONNX Runtime.

    Meant for timing single layers: the export happens in memory (no file, no checker), a float32 CPU eval
    copy of ``module`` is exported, and the inputs are fixed numpy copies made once.

    Args:
        module: any module called as ``module(*example_inputs)`` (a conv, a BN, an add of two tensors, a block).
        example_inputs: one or more tensors; their shapes are fixed in the exported graph.
        threads: intra-op threads of the session (see ``ort_session``).

    Returns:
        A no-argument function; each call runs the session once and returns its outputs as numpy arrays.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(t.detach().to("cpu", torch.float32) if t.is_floating_point() else t.detach().cpu()
                   for t in example_inputs)
    with torch.no_grad():
        data = onnx_bytes(_cpu_eval_copy(module), inputs)
    session = ort_session(data, threads)
    # the exporter drops inputs the graph does not use (e.g. constant-folded), so feed only those it kept
    arrays = {f"input_{i}": t.numpy().copy() for i, t in enumerate(inputs)}
    feed = {i.name: arrays[i.name] for i in session.get_inputs()}
    run = session.run

    def runner() -> list[np.ndarray]:
        return run(None, feed)

    return runner
