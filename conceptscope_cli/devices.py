"""Device choice, host → device transfer and the bf16 autocast rule.

Used by categorize, the dictionary latents and the SAE trainer; extract, attribute, ablate and
export still move data and pick precision themselves (issue 19 item 3 routes them here)."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import numpy as np
import torch

from conceptscope_cli.errors import CscopeError


def host_to_device(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host array to `device`; on CUDA through pinned memory, without blocking the host,
    so that reading the next batch overlaps the GPU's work on this one."""
    tensor = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def autocast_for(device: torch.device, precision: str) -> ContextManager:
    """bf16 autocast for `precision = "bf16"` on CUDA; full precision everywhere else."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(requested: str) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N`, `mps`; under torchrun each rank gets `cuda:LOCAL_RANK`."""
    from conceptscope_cli.distributed import device_for_rank

    if requested == "auto":
        return device_for_rank(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise CscopeError(f"unknown device {requested!r}", hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: nothing cscope runs can run there
        raise CscopeError(f"device {requested!r} is not supported", hint="use auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CscopeError(f"device {requested} requested but MPS is not available", hint="use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CscopeError(f"device {requested} requested but CUDA is not available", hint="use --device cpu")
    return device_for_rank(device)
