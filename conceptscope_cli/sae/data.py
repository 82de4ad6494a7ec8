"""Streaming token batches from an activation cache entry (conceptscope_cli/FORMATS.md).

Data order is a pure function of (seed, batch_size, shuffle_buffer, cache layout), so a
run's position is just the number of tokens consumed and a resumed run rebuilds its
shuffle buffer exactly by re-reading one window.

Order. The training images (all but the last `eval_fraction`) are cut into *windows*
of ⌊shuffle_buffer / T⌋ consecutive images. Each epoch visits the windows in a seeded
random order; inside a window the tokens are permuted by a permutation seeded from
(seed, epoch, window). The concatenation of these permuted windows is the global
token stream; global batch t is stream[t·B, (t+1)·B). Every token appears exactly once
per epoch and at most one window (shuffle_buffer tokens) is held in memory.

Data parallel. Rank r of W reads only the r-th contiguous slice of each window's images
and keeps the tokens of each global batch that come from its images. The union over ranks
is exactly the single-process batch; the per-rank batch size varies a little, and
`TokenBatch.global_batch_size` lets the trainer weight the loss so averaged gradients equal
the single-process gradient.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import h5py
import numpy as np
import torch

from conceptscope_cli.distributed import contiguous_span


@dataclass
class CacheLayout:
    """Shards of one cache entry: paths, images per shard, tokens per image T, width d."""

    shard_paths: list[Path]
    shard_images: list[int]
    n_tokens: int
    d_in: int
    dtype: np.dtype

    @property
    def n_images(self) -> int:
        return int(sum(self.shard_images))

    def read_images(self, start: int, stop: int) -> np.ndarray:
        """Activations of global images [start, stop) -> (stop − start, T, d), source dtype.

        Reads contiguous slices shard by shard (whole HDF5 chunks stream in order)."""
        parts: list[np.ndarray] = []
        shard_begin = 0
        for path, count in zip(self.shard_paths, self.shard_images):
            shard_end = shard_begin + count
            lo, hi = max(start, shard_begin), min(stop, shard_end)
            if lo < hi:
                with h5py.File(path, "r") as handle:
                    parts.append(handle["activations"][lo - shard_begin: hi - shard_begin])
            shard_begin = shard_end
            if shard_begin >= stop:
                break
        if not parts:
            return np.empty((0, self.n_tokens, self.d_in), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def open_cache(entry_dir: Path | str) -> CacheLayout:
    """Describe the shards of a cache entry directory (`<entry>/shards/shard-*.h5`), as listed by
    the one shard reader, `extract.store.shard_infos` (complete shards only, in row order)."""
    from conceptscope_cli.extract.store import shard_infos

    entry = Path(entry_dir)
    paths = [info.path for info in shard_infos(entry)]
    if not paths:
        raise FileNotFoundError(f"no activation shards under {entry / 'shards'}")
    counts: list[int] = []
    shape: Optional[tuple[int, int]] = None
    dtype = None
    for path in paths:
        with h5py.File(path, "r") as handle:
            dataset = handle["activations"]
            if dataset.ndim != 3:
                raise ValueError(f"{path}: activations must be (n, T, d), got shape {dataset.shape}")
            if shape is None:
                shape, dtype = tuple(dataset.shape[1:]), dataset.dtype
            elif tuple(dataset.shape[1:]) != shape:
                raise ValueError(f"{path}: token/width shape {dataset.shape[1:]} differs from {shape}")
            counts.append(int(dataset.shape[0]))
    assert shape is not None
    return CacheLayout(shard_paths=paths, shard_images=counts, n_tokens=int(shape[0]), d_in=int(shape[1]),
                       dtype=np.dtype(dtype))


def split_train_eval(n_images: int, eval_fraction: float) -> tuple[int, int]:
    """(n_train, n_eval): the last round(eval_fraction·n) images (≥1 when the fraction is > 0) are held out."""
    if eval_fraction <= 0 or n_images < 2:
        return n_images, 0
    n_eval = min(max(1, int(round(n_images * eval_fraction))), n_images - 1)
    return n_images - n_eval, n_eval


def _derived_seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _permutation(n: int, *seed_parts: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_derived_seed(*seed_parts))
    return torch.randperm(n, generator=generator)


@dataclass
class TokenBatch:
    """tokens (b, d) float32 for this rank; global_batch_size = B summed over ranks."""

    tokens: torch.Tensor
    global_batch_size: int


class ShuffledTokenStream:
    """Infinite stream of shuffled token batches over the training images (see module doc).

    Position = `tokens_consumed` (global, across ranks). `state_dict()` / `from_state()`
    serialise it; the buffer is rebuilt deterministically on resume.
    """

    def __init__(self, layout: CacheLayout, batch_size: int, shuffle_buffer: int, seed: int,
                 n_train_images: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 tokens_consumed: int = 0) -> None:
        self.layout = layout
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.n_train_images = int(layout.n_images if n_train_images is None else n_train_images)
        if self.n_train_images <= 0:
            raise ValueError("no training images in the cache entry")
        self.rank, self.world_size = int(rank), int(world_size)
        self.window_images = max(1, int(shuffle_buffer) // layout.n_tokens)
        self.n_windows = -(-self.n_train_images // self.window_images)
        self.epoch_tokens = self.n_train_images * layout.n_tokens
        self.tokens_consumed = int(tokens_consumed)
        self._loaded_key: Optional[tuple[int, int]] = None
        self._buffer: Optional[torch.Tensor] = None  # (owned tokens, d), source dtype
        self._perm: Optional[torch.Tensor] = None
        self._owned_token_range = (0, 0)
        self.peak_buffer_tokens = 0

    # ------------------------------------------------------------ schedule
    def window_order(self, epoch: int) -> torch.Tensor:
        return _permutation(self.n_windows, self.seed, epoch, -1)

    def window_bounds(self, window: int) -> tuple[int, int]:
        start = window * self.window_images
        return start, min(start + self.window_images, self.n_train_images)

    def _locate(self, position: int) -> tuple[int, int, int, int]:
        """Global stream position -> (epoch, window id, offset in window, tokens left in window)."""
        epoch, within = divmod(position, self.epoch_tokens)
        T = self.layout.n_tokens
        for window in self.window_order(epoch).tolist():
            start, stop = self.window_bounds(window)
            size = (stop - start) * T
            if within < size:
                return epoch, window, within, size - within
            within -= size
        raise AssertionError("position beyond epoch")  # unreachable: within < epoch_tokens

    def _load_window(self, epoch: int, window: int) -> None:
        if self._loaded_key == (epoch, window):
            return
        self._buffer = None  # release the previous window before reading the next one
        start, stop = self.window_bounds(window)
        n = stop - start
        mine = contiguous_span(n, self.rank, self.world_size)  # the split every stage uses
        lo, hi = start + mine.start, start + mine.stop
        T = self.layout.n_tokens
        data = self.layout.read_images(lo, hi).reshape(-1, self.layout.d_in)
        self._buffer = torch.from_numpy(np.ascontiguousarray(data))
        self._owned_token_range = ((lo - start) * T, (hi - start) * T)
        self._perm = _permutation(n * T, self.seed, epoch, window)
        self._loaded_key = (epoch, window)
        self.peak_buffer_tokens = max(self.peak_buffer_tokens, self._buffer.shape[0])

    # ------------------------------------------------------------ batches
    def next_batch(self) -> TokenBatch:
        pieces: list[torch.Tensor] = []
        needed = self.batch_size
        position = self.tokens_consumed
        while needed > 0:
            epoch, window, offset, remaining = self._locate(position)
            self._load_window(epoch, window)
            take = min(needed, remaining)
            assert self._perm is not None and self._buffer is not None
            window_tokens = self._perm[offset: offset + take]
            lo, hi = self._owned_token_range
            owned = window_tokens[(window_tokens >= lo) & (window_tokens < hi)] - lo
            pieces.append(self._buffer[owned])
            position += take
            needed -= take
        self.tokens_consumed = position
        tokens = torch.cat(pieces).float() if len(pieces) > 1 else pieces[0].float()
        return TokenBatch(tokens=tokens, global_batch_size=self.batch_size)

    def __iter__(self) -> Iterator[TokenBatch]:
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------ position
    def state_dict(self) -> dict[str, int]:
        return {"tokens_consumed": self.tokens_consumed, "seed": self.seed, "batch_size": self.batch_size,
                "window_images": self.window_images, "n_train_images": self.n_train_images}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "batch_size", "window_images", "n_train_images"):
            if int(state[key]) != int(getattr(self, key)):
                raise ValueError(f"cannot resume data stream: {key} was {state[key]}, now {getattr(self, key)}")
        self.tokens_consumed = int(state["tokens_consumed"])


def iter_eval_batches(layout: CacheLayout, first_image: int, n_images: int, batch_size: int,
                      max_tokens: Optional[int] = None, images_per_read: int = 64) -> Iterator[torch.Tensor]:
    """Held-out tokens in cache order, (≤batch_size, d) float32 batches, at most max_tokens in total."""
    pending: list[torch.Tensor] = []
    pending_count = 0
    emitted = 0
    limit = max_tokens if max_tokens is not None else float("inf")
    for start in range(first_image, first_image + n_images, images_per_read):
        stop = min(start + images_per_read, first_image + n_images)
        block = torch.from_numpy(layout.read_images(start, stop).reshape(-1, layout.d_in)).float()
        pending.append(block)
        pending_count += block.shape[0]
        while pending_count >= batch_size and emitted < limit:
            merged = torch.cat(pending)
            take = int(min(batch_size, limit - emitted))
            yield merged[:take]
            emitted += take
            pending, pending_count = [merged[take:]], merged.shape[0] - take
        if emitted >= limit:
            return
    if pending_count and emitted < limit:
        merged = torch.cat(pending)
        yield merged[: int(min(merged.shape[0], limit - emitted))]


def sample_tokens(layout: CacheLayout, n_train_images: int, n_samples: int, n_blocks: int = 8) -> torch.Tensor:
    """About n_samples tokens (N, d) float32 from n_blocks evenly spaced runs of consecutive training images.

    Independent of rank and world size, so every rank initialises identically."""
    T = layout.n_tokens
    images_needed = min(n_train_images, max(1, -(-n_samples // T)))
    n_blocks = max(1, min(n_blocks, images_needed))
    per_block = -(-images_needed // n_blocks)
    starts = np.linspace(0, n_train_images - per_block, n_blocks).astype(np.int64) if n_train_images > per_block \
        else np.zeros(1, dtype=np.int64)
    blocks = []
    for start in sorted({int(s) for s in starts}):
        stop = min(start + per_block, n_train_images)
        blocks.append(torch.from_numpy(layout.read_images(start, stop).reshape(-1, layout.d_in)).float())
    return torch.cat(blocks)[:n_samples]
