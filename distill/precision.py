"""Mixed precision: bf16/fp16 autocast on GPU (fp16 with a grad scaler), bf16 or plain fp32 on CPU."""
from __future__ import annotations

import contextlib

import torch

from pruning.errors import UserInputError

AMP_MODES = (None, "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str | None, device: torch.device) -> None:
    """Raise a :class:`~pruning.errors.UserInputError` naming ``amp`` unless it is valid on ``device``."""
    if amp not in AMP_MODES:
        raise UserInputError(f"unknown amp mode {amp!r}; choose one of {list(AMP_MODES)}")
    if amp == "fp16" and device.type != "cuda":
        raise UserInputError(f"amp='fp16' needs a CUDA device, this run is on {device.type!r}; use amp='bf16' or "
                             "amp=None")


def autocast(amp: str | None, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for ``amp``, or a no-op for full precision."""
    return torch.autocast(device.type, dtype=_DTYPES[amp]) if amp else contextlib.nullcontext()


def grad_scaler(amp: str | None) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (its narrow range underflows small gradients); bf16 and fp32 need none."""
    return torch.amp.GradScaler("cuda") if amp == "fp16" else None
