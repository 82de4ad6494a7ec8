"""Synthetic CSR latents shared by the benchmarks (scale.py, categorize.py, groups.py) and tests/test_scale_memory.py.

The distribution: Zipf-like latent popularity (exponent 0.6, seeded permutation), 8 preferred
latents per class, ~`active` draws per row with exponential values (scale 0.2, + 1e-3 so none is
zero). Each writer keeps its own layout (dense blocks or direct CSR); the draws are the same.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def reusable(path: Path, spec: dict[str, int]) -> bool:
    """True when `path` is an h5 file whose attrs match `spec`; otherwise it is removed (if present)."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if all(int(f.attrs.get(k, -1)) == v for k, v in spec.items()):
                return True
    except OSError:  # a half-written file from an interrupted run
        pass
    path.unlink()
    return False


class LatentDraws:
    """The seeded generator: `block(start, b, active)` gives rows start..start+b-1, reproducibly per block."""

    def __init__(self, n_latents: int, n_classes: int, seed: int) -> None:
        popularity = 1.0 / np.arange(1, n_latents + 1) ** 0.6
        popularity = np.random.default_rng(seed).permutation(popularity / popularity.sum())
        self.cdf = np.cumsum(popularity)
        self.class_latents = np.random.default_rng([seed, 1]).integers(0, n_latents, size=(n_classes, 8))
        self.n_latents, self.n_classes, self.seed = n_latents, n_classes, seed

    def block(self, start: int, b: int, active: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels (b,), columns (b, active) unsorted with repeats, values (b, active) float32 > 0)."""
        rng = np.random.default_rng([self.seed, 2, start])
        labels = rng.integers(0, self.n_classes, size=b)
        cols = np.searchsorted(self.cdf, rng.random((b, active)) * self.cdf[-1]).clip(max=self.n_latents - 1)
        cols[:, :8] = self.class_latents[labels]
        values = rng.exponential(0.2, size=(b, active)).astype(np.float32) + 1e-3
        return labels, cols, values
