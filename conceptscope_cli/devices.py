"""Host → device transfer and the bf16 autocast rule.

Used by categorize, the dictionary latents and the SAE trainer; extract, attribute, ablate and
export still move data and pick precision themselves (issue 19 item 3 routes them here)."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import numpy as np
import torch


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
