"""The disk plan: what a stage will write, checked against the cache's free space before work.

`free_bytes` is the one place that asks the file system (tests monkeypatch it). Estimates
are plain arithmetic over the dataset length, tokens, width and dtypes, so they can be
printed before the first image is decoded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from conceptscope_cli.errors import CscopeError

if TYPE_CHECKING:
    import numpy as np

# Per-image bookkeeping beside the activations: label + row index (int64) in every shard.
_PER_IMAGE_META = 16
# HDF5 superblock, object headers, B-trees and attributes of one shard file (measured: ~17 KB).
_PER_SHARD_FILE = 17_000
_CSR_CHUNK = 1 << 15  # entries per HDF5 chunk of the CSR indices/values (dictionary/sparse.py)


def latent_index_dtype(n_latents: int) -> np.dtype:
    """The narrowest unsigned integer holding latent ids 0..n_latents-1, as `latents.h5` stores
    them (lossless: ids are exact integers; at m = 32,768 uint16 saves 2 of the 8 bytes an active
    latent cost in int32 + float32)."""
    import numpy as np  # here: `cscope cache ls` imports this module and must not pay for numpy

    for dtype in (np.uint8, np.uint16, np.uint32):
        if int(n_latents) - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{n_latents} latents do not fit 32-bit latent ids")


def human_bytes(n: float) -> str:
    """`n` bytes in decimal units (1 KB = 1000 B, as the README's figures), for every message that shows a size."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    here = Path(path).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return int(shutil.disk_usage(here).free)


def activation_bytes(n_images: int, n_tokens: int, d_model: int, dtype: str, n_shards: int = 1) -> int:
    """An activation entry: (N, T, d) values + int32 token positions + per-image label/row,
    and each shard file's fixed HDF5 overhead."""
    itemsize = 2 if dtype == "float16" else 4
    return int(n_images) * (int(n_tokens) * (int(d_model) * itemsize + 4) + _PER_IMAGE_META) + \
        int(n_shards) * _PER_SHARD_FILE


def latents_bytes(n_images: int, nnz_per_image: float, n_latents: int, n_classes: int, value_dtype: str,
                  n_parts: int = 1, top_images: int = 100) -> int:
    """Peak size of a latents entry: the CSR parts beside the merged `latents.h5` (the parts
    go once merged), or the merged matrix beside `stats.h5`, whichever is larger.

    CSR: index (`latent_index_dtype`, 2 bytes for m <= 65,536) + value per stored entry, allocated in HDF5 chunks of 2^15 entries, and
    indptr/label/row per image; stats: (C × m) float64 tables ×3, the frequency table and
    the top-image lists."""
    itemsize = 2 if value_dtype == "float16" else 4
    index_size = latent_index_dtype(n_latents).itemsize

    def csr(images: float) -> int:
        chunks = -(-int(images * nnz_per_image) // _CSR_CHUNK) or 1
        return chunks * _CSR_CHUNK * (index_size + itemsize) + int(images) * 24 + _PER_SHARD_FILE

    parts = n_parts * csr(n_images / max(n_parts, 1))
    merged = csr(n_images)
    stats = int(n_latents) * (3 * 8 * max(int(n_classes), 1) + 10 * 8 + top_images * (4 + 8 + 8)) + _PER_SHARD_FILE
    return max(parts + merged, merged + stats)


def check_disk(what: str, expected: int, cache_root: Path, *, force: bool, log: Callable[[str], None]) -> None:
    """Print the plan; refuse (exit 1) when `expected` bytes exceed the free space, unless forced."""
    free = free_bytes(cache_root)
    log(f"disk plan: {what} writes about {human_bytes(expected)}; {human_bytes(free)} free under {cache_root}")
    if expected <= free:
        return
    if force:
        log("disk plan: does not fit, continuing because of --force")
        return
    raise CscopeError(
        f"not enough disk for {what}: about {human_bytes(expected)} needed, {human_bytes(free)} free under {cache_root}",
        hint="cache fewer tokens ([extract] tokens_per_image = K), compute latents straight from the images "
             "([dict] source = \"images\", no token cache), point the cache at a larger disk ([project] cache_dir or "
             "CSCOPE_CACHE), or pass --force",
    )
