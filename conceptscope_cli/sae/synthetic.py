"""Synthetic activation cache entries (FORMATS.md layout) for tests and benchmarks.

Tokens are sparse non-negative combinations of a fixed random dictionary plus an offset
and a little noise, so an SAE can actually learn them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def synthetic_tokens(n: int, d: int, n_features: int = 64, active: int = 4, noise: float = 0.01,
                     seed: int = 0) -> np.ndarray:
    """(n, d) float32 tokens: offset + Σ_active a_i g_i + noise with a fixed seeded dictionary g (n_features, d)."""
    dictionary_rng = np.random.default_rng(1234)
    dictionary = dictionary_rng.standard_normal((n_features, d)).astype(np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    offset = dictionary_rng.standard_normal(d).astype(np.float32) * 0.5
    rng = np.random.default_rng(seed)
    chosen = np.argsort(rng.random((n, n_features)), axis=1)[:, :active]
    amplitudes = rng.exponential(1.0, size=(n, active)).astype(np.float32) + 0.5
    tokens = offset + np.einsum("na,nad->nd", amplitudes, dictionary[chosen])
    tokens += noise * rng.standard_normal((n, d)).astype(np.float32)
    return tokens.astype(np.float32)


def write_synthetic_cache(entry_dir: Path | str, n_images: int = 64, n_tokens: int = 8, d: int = 16,
                          images_per_shard: int = 24, n_features: int = 64, active: int = 4,
                          dtype: str = "float16", seed: int = 0, chunk_images: int = 8) -> Path:
    """Write `<entry_dir>/shards/shard-*.h5` (+ record.json) with (n, T, d) activations, through the
    same `ShardWriter` as `cscope extract` (so `extract.store.shard_infos` reads it)."""
    from conceptscope_cli.extract.store import ShardWriter, shard_path

    entry = Path(entry_dir)
    entry.mkdir(parents=True, exist_ok=True)
    tokens = synthetic_tokens(n_images * n_tokens, d, n_features, active, seed=seed).reshape(n_images, n_tokens, d)
    for shard_index, start in enumerate(range(0, n_images, images_per_shard)):
        stop = min(start + images_per_shard, n_images)
        n = stop - start
        writer = ShardWriter(shard_path(entry, shard_index), capacity=n, n_tokens=n_tokens, d_model=d, dtype=dtype,
                             chunk_images=chunk_images)
        writer.append(tokens[start:stop].astype(dtype), np.full(n, -1, dtype=np.int64),
                      np.arange(start, stop, dtype=np.int64), np.tile(np.arange(n_tokens, dtype=np.int32), (n, 1)))
        writer.close(row_start=start, row_stop=stop, skipped=[])
    (entry / "record.json").write_text(json.dumps({"synthetic": True, "n_images": n_images, "d_model": d,
                                                   "n_tokens": n_tokens}))
    return entry
