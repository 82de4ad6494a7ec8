"""Data parallelism under `torchrun`: the one mechanism every heavy stage shares.

`torchrun --nproc-per-node N -m conceptscope_cli extract|train|dict|categorize ...` starts N
copies of the CLI. `init_from_env()` joins them into a process group (gloo for CPU tensors,
NCCL for CUDA tensors when available) plus a gloo *control* group for barriers, agreement
and small messages. Every stage then splits its work with `Ranks.span` (contiguous ranges
of shards, classes or rows; `train`'s token stream uses the same split of images), writes
its own parts, and rank 0 merges them into the cache entry that a single process would
have written. `build_entry` is that protocol for cache entries:

1. rank 0 takes the entry's file lock and opens its partial directory (or finds the entry
   complete); the decision is broadcast;
2. every rank runs `build` on the same partial directory (its own parts only; parts are
   written atomically, so a re-run skips the parts that are complete);
3. the ranks agree that every `build` succeeded; if one failed, all raise;
4. rank 0 runs `finish` (merge parts, write the summary) and commits.

A single process is the case N = 1 of the same code path, which is why 1-process and
N-process runs give identical entries.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, TypeVar, cast

import torch
import torch.distributed as dist

from conceptscope_cli.cache.store import CacheEntry, CacheStore, PendingEntry
from conceptscope_cli.errors import CscopeError

T = TypeVar("T")

# Ranks wait for the slowest one at each barrier; with shards of unequal cost that can be
# long, so the default is generous (a dead rank is detected by torchrun, not by timeouts).
DEFAULT_TIMEOUT_S = 6 * 3600
_control_group: Any = None
# > 0 while rank 0 runs `on_main` work: code called from there (which may itself use
# `build_entry` or `on_main`) must not start collectives the other ranks never join.
_alone_depth = 0


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a (possibly trivial) process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        """` (rank r/W)` for progress descriptions; empty for one process."""
        return f" (rank {self.rank}/{self.world_size})" if self.active else ""

    def span(self, n: int) -> range:
        """This rank's contiguous share of `n` work units."""
        return contiguous_span(n, self.rank, self.world_size)


def contiguous_span(n: int, rank: int, world_size: int) -> range:
    """Units [n·r/W, n·(r+1)/W): contiguous, balanced to within one, and covering 0..n-1 once."""
    return range((rank * n) // world_size, ((rank + 1) * n) // world_size)


def current() -> Ranks:
    """This process's place; inside `on_main` work, rank 0 acts as a single process."""
    if _alone_depth:
        return Ranks()
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    return Ranks()


def launched_with_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> Ranks:
    """Join the process group described by torchrun's environment (no-op for one process)."""
    global _control_group
    if not launched_with_torchrun():
        return current()
    if dist.is_initialized():
        return current()
    if not dist.is_available():
        raise CscopeError("this PyTorch build has no torch.distributed support")
    timeout = timedelta(seconds=float(os.environ.get("CSCOPE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
    if use_nccl:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("cpu:gloo,cuda:nccl" if use_nccl else "gloo", timeout=timeout)
    _control_group = dist.new_group(backend="gloo", timeout=timeout)
    return current()


def shutdown() -> None:
    global _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def _group() -> Any:
    return _control_group if _control_group is not None else dist.group.WORLD


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (pickled between our own ranks, never from disk)."""
    if not current().active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_group(), device=torch.device("cpu"))
    return box[0]


def all_succeeded(ok: bool) -> bool:
    """True when every rank passes ok=True (a collective: every rank must call it)."""
    if not current().active:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_group())
    return bool(flag.item())


def collectively(work: Callable[[], T]) -> T:
    """Run `work` on every rank; if it fails on any rank, it fails on all of them.

    The failing rank re-raises its own error; the others raise a short error that points
    at it, so torchrun reports one cause and no rank waits forever at the next barrier.
    """
    try:
        result = work()
    except BaseException:
        all_succeeded(False)
        raise
    if not all_succeeded(True):
        raise CscopeError("another rank failed (its error is printed above); completed parts are kept",
                          hint="fix the cause and run the same command again to resume")
    return result


def on_main(work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only and give its result to every rank.

    Inside `work`, rank 0 behaves as a single process (`current()` is rank 0 of 1), so the
    stages it calls do their work alone instead of waiting for ranks that are not there."""
    ranks = current()
    if not ranks.active:
        return work()

    def alone() -> T:
        global _alone_depth
        _alone_depth += 1
        try:
            return work()
        finally:
            _alone_depth -= 1

    result = collectively(alone if ranks.is_main else (lambda: None))
    return cast(T, broadcast(result))  # every rank gets rank 0's value of type T


def device_for_rank(device: torch.device) -> torch.device:
    """Under torchrun each rank drives its own GPU: `cuda` / `cuda:N` become `cuda:LOCAL_RANK`."""
    ranks = current()
    if ranks.active and device.type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return device


def build_entry(cache: CacheStore, kind: str, key: str, inputs: dict[str, Any], build: Callable[[PendingEntry], T],
                finish: Callable[[PendingEntry, T], tuple[dict[str, Any], dict[str, Any]]]) -> tuple[CacheEntry, bool]:
    """Build (or reuse) one cache entry on every rank; returns (CacheEntry, reused).

    `build(pending)` runs on every rank and writes only that rank's parts into
    `pending.path`; `finish(pending, build_result)` runs on rank 0 after every rank
    succeeded and returns the record's (summary, stats).
    """
    ranks = current()
    existing = cache.lookup(kind, key)
    if not ranks.active and existing is not None:
        return existing, True
    with contextlib.ExitStack() as stack:
        decision: dict[str, Any] = {"reuse": False}
        if ranks.is_main:
            stack.enter_context(cache.lock(kind, key))
            if cache.lookup(kind, key) is not None:  # another job finished it while we waited
                decision = {"reuse": True}
            else:
                pending = cache.begin(kind, key, inputs)
                decision = {"reuse": False, "path": str(pending.path), "started": pending.started}
        decision = broadcast(decision)
        if decision["reuse"]:
            entry = cache.lookup(kind, key)
            if entry is None:
                raise CscopeError(f"cache entry {kind}/{key} is not visible on rank {ranks.rank}",
                                  hint="every rank must see the same cache directory (a shared filesystem)")
            return entry, True
        if not ranks.is_main:
            pending = PendingEntry(kind, key, Path(decision["path"]), inputs, decision["started"])
        built = collectively(lambda: build(pending))

        def commit() -> str:
            summary, stats = finish(pending, built)
            return cache.commit(pending, summary=summary, stats=stats).key

        on_main(commit)
    entry = cache.lookup(kind, key)
    if entry is None:
        raise CscopeError(f"cache entry {kind}/{key} is not visible on rank {ranks.rank}",
                          hint="every rank must see the same cache directory (a shared filesystem)")
    return entry, False
