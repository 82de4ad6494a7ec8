"""Memory stays bounded when the data doubles (small version of benchmarks/scale.py).

Each measurement runs in a fresh subprocess (peak RSS = ru_maxrss). The sizes are chosen so
that holding the whole input in memory would exceed the margin by a wide factor:
- `cscope dict`'s statistics pass (`compute_statistics`): 20k vs 40k rows × 2048 latents
  (a dense copy of the difference would be 160 MB; margin 30 MB),
- `train`'s loader (`ShuffledTokenStream`): 3000 vs 6000 images × 65 tokens × 256 float16
  (100 MB more data on disk; margin 30 MB).
Only memory is asserted, never time.
"""

from __future__ import annotations

import pytest

from helpers import load_benchmark

MARGIN_MB = 30.0


@pytest.fixture(scope="module")
def scale():
    return load_benchmark("scale")


@pytest.mark.slow  # memory at several sizes
def test_latent_statistics_memory_is_flat(scale, tmp_path):
    m, block = 2048, 512
    results = {}
    for rows in (20_000, 40_000):
        path = scale.write_latents(tmp_path / f"latents-{rows}.h5", rows, m, active=30, n_classes=100, seed=0)
        results[rows] = scale.run_worker("stats", latents=str(path), block=block)
        assert results[rows]["rows"] == rows
    small, large = results[20_000], results[40_000]
    assert large["nnz"] > 1.9 * small["nnz"]
    assert large["peak_mb"] <= small["peak_mb"] + MARGIN_MB, (
        f"LatentStatistics peak RSS grew from {small['peak_mb']:.0f} MB (20k rows) to "
        f"{large['peak_mb']:.0f} MB (40k rows)")


@pytest.mark.slow  # memory at several sizes
def test_activation_loader_memory_is_flat(scale, tmp_path):
    n, T, d = 3000, 65, 256
    batch, buffer = 4096, 16384
    n_batches = -(-int(1.5 * n * T) // batch)  # 1.5 epochs of the small entry
    results = {}
    for images in (n, 2 * n):
        entry = scale.write_activation_entry(tmp_path / f"acts-{images}", images, T, d, images_per_shard=1024)
        results[images] = scale.run_worker("loader", entry=str(entry), batch_size=batch, shuffle_buffer=buffer,
                                           n_batches=n_batches)
        assert results[images]["rows"] == images
        assert results[images]["peak_buffer_tokens"] <= buffer
    small, large = results[n], results[2 * n]
    assert large["peak_mb"] <= small["peak_mb"] + MARGIN_MB, (
        f"loader peak RSS grew from {small['peak_mb']:.0f} MB ({n} images) to {large['peak_mb']:.0f} MB "
        f"({2 * n} images)")
