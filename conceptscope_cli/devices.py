"""Device choice, host → device transfer and the bf16 rule, for every stage.

Two manifest keys pick a precision and keep their spellings (users' manifests): `[backbone]
precision = "fp32" | "bf16"` (CLIP forwards) and `[sae] autocast = "none" | "bf16"` (SAE
training). `precision_of` maps both to one vocabulary, `Precision`; `autocast_dtype` is the one
place the rule "bf16 only on CUDA" is written. `conceptscope_cli.context` resolves both once per run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Any, ContextManager, Literal, get_args

import numpy as np
import torch

from conceptscope_cli.errors import CscopeError

Precision = Literal["fp32", "bf16"]
# Accepted spellings -> precision: "none" is `[sae] autocast`'s word for full precision.
_SPELLINGS: dict[str, Precision] = {"fp32": "fp32", "none": "fp32", "bf16": "bf16"}
DEVICE_TYPES = ("cpu", "cuda", "mps")
_DEVICE_HINT = "use auto, cpu, cuda, cuda:N or mps"


def precision_of(value: str, key: str = "precision") -> Precision:
    """The precision a manifest value asks for ("fp32", "bf16"; "none" = fp32); `key` names it in errors."""
    try:
        return _SPELLINGS[value]
    except KeyError:
        raise CscopeError(f"{key} = {value!r} is not a precision",
                          hint=f"use one of {', '.join(repr(s) for s in _SPELLINGS)}") from None


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype for forwards on `device`: bf16 only on CUDA (CPU and MPS run float32)."""
    if precision not in get_args(Precision):
        raise ValueError(f"unknown precision {precision!r}")
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None


def autocast_for(device: torch.device, precision: Precision) -> ContextManager:
    """A context manager applying `autocast_dtype(device, precision)` (a no-op at full precision)."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def host_to_device(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host array to `device`; on CUDA through pinned memory, without blocking the host,
    so that reading the next batch overlaps the GPU's work on this one."""
    tensor = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def choose_device(requested: str, *, cuda: bool, mps: bool) -> torch.device:
    """The device `requested` names, given which accelerators exist (pure: no probing, no ranks).

    `auto` is cuda when there is one, else cpu; anything but cpu / cuda[:N] / mps is refused."""
    if requested == "auto":
        return torch.device("cuda" if cuda else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise CscopeError(f"unknown device {requested!r}", hint=_DEVICE_HINT) from None
    if device.type not in DEVICE_TYPES:  # meta, xla, ...: nothing cscope runs can run there
        raise CscopeError(f"device {requested!r} is not supported", hint=_DEVICE_HINT)
    if device.type == "mps" and not mps:
        raise CscopeError(f"device {requested} requested but MPS is not available", hint="use --device cpu")
    if device.type == "cuda" and not cuda:
        raise CscopeError(f"device {requested} requested but CUDA is not available", hint="use --device cpu")
    return device


def resolve_device(requested: str) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N`, `mps` on this machine; under torchrun each rank gets `cuda:LOCAL_RANK`."""
    from conceptscope_cli.distributed import device_for_rank

    return device_for_rank(choose_device(requested, cuda=torch.cuda.is_available(),
                                         mps=torch.backends.mps.is_available()))


_libc: Any = None


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim(0)`); False where there is none.

    Why: after large frees glibc raises its mmap threshold, so later tensor buffers come from the
    heap and fragment it. Without a trim, a stage running a backbone over worker-decoded batches
    grew its RSS by ~25 MB per 1,024-image shard (measured on the tiny CLIP, benchmarks/pipeline.py),
    i.e. with the number of images; stages call this after each shard, part or class."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
            _libc = _libc if _libc and hasattr(_libc, "malloc_trim") else False
        except OSError:
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True


HEAP_GROWTH_BUDGET = 32 * 1024 * 1024  # bytes of RSS growth between two trims of a batch loop


class HeapWatch:
    """A batch loop's guard on the C heap: `check()` after each batch trims it
    (`release_free_memory`) when the process's resident set has grown by more than `budget`
    bytes since the batch after the last trim, and does nothing otherwise (one read of
    /proc/self/statm; a no-op where there is none). The level is taken one batch after a trim
    (and at the first check), so the batch's own working set, refaulted after each trim, is not
    counted as growth. Why: even with nothing kept from one batch to the next (the writers,
    extract/store.py), glibc's placement of the forwards' multi-MB temporaries sometimes drifts
    into a mode where each batch takes ~8 MB of fresh heap and leaves as much free behind, for a
    few shards, then stops (measured on the tiny CLIP: a shard's peak +60-100 MB; README "Scaling
    out"). The trim at the end of each shard bounds that by the shard size; this bounds it by
    `budget`, whatever the shard size, and costs nothing while the heap is steady."""

    def __init__(self, budget: int = HEAP_GROWTH_BUDGET) -> None:
        self.budget = budget
        self.trims = 0
        try:
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            self._page = 4096
        self._level: int | None = None  # resident bytes one batch after the last trim

    def _resident(self) -> int | None:
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def check(self) -> bool:
        """Trim when grown by more than the budget since the level; True when it trimmed."""
        now = self._resident()
        if now is None:
            return False
        if self._level is None:
            self._level = now
            return False
        if now - self._level <= self.budget:
            return False
        release_free_memory()
        self.trims += 1
        self._level = None
        return True
