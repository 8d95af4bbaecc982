"""Mixed precision: ``train.precision: fp32 | bf16 | fp16``.

bf16 runs the forward pass and the loss under ``torch.autocast`` (CPU or CUDA) with fp32 weights
and no loss scaling; fp16 does the same on CUDA with a ``GradScaler`` (saved in checkpoints) and is
refused on a CPU. Evaluation runs in fp32. Any rank may call these functions; none communicates.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ddp.config import Precision
from ddp.errors import ConfigError

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


def check_precision(precision: Precision, device: torch.device) -> None:
    """Refuse a precision the device cannot run (before any process group forms)."""
    if precision == Precision.fp16 and device.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA device, but this run trains on {device.type}.",
                          "use train.precision=bf16 on a CPU (or fp32)")


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's context: autocast to bf16/fp16, or nothing for fp32."""
    if precision == Precision.fp32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_scaler(precision: Precision, device: torch.device) -> Any:
    """A GradScaler for fp16 on CUDA (gradients would underflow without it); None otherwise."""
    if precision != Precision.fp16:
        return None
    return torch.amp.GradScaler(device.type)
