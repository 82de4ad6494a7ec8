"""Image-level latents a(x) = mean over tokens of f(z_t(x)), with per-latent statistics.

One streaming pass over the cached activations encodes every token with the SAE,
averages over tokens (CLS included, REFERENCE §3), writes the positive entries to the
CSR matrix, and accumulates every statistic the dictionary needs. Memory is bounded by
the block size and the (classes × latents) accumulators, never by the split size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from conceptscope_cli.devices import host_to_device
from conceptscope_cli.dictionary.sparse import CSRWriter
from conceptscope_cli.distributed import current
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.extract.store import ActivationReader
from conceptscope_cli.progress import NullReporter, Reporter

# Frequency thresholds of the reference (fraction of images with a > tau).
TAUS: tuple[float, ...] = (0.0, 0.01, 0.1, 0.2, 0.3, 0.4, 0.5)
TOP_IMAGES = 100


class LatentStatistics:
    """Streaming per-latent statistics over image-level activations a (b, m).

    Accumulates: counts above each tau, sum and sum of squares, per-class sum, sum of
    squares and active count, and the top `top_k` images per latent (value, position).
    """

    def __init__(self, n_latents: int, n_classes: int, top_k: int = TOP_IMAGES) -> None:
        self.m, self.c, self.k = n_latents, max(n_classes, 1), top_k
        self.n = 0
        self.count_above = torch.zeros(len(TAUS), n_latents, dtype=torch.int64)
        self.total = torch.zeros(n_latents, dtype=torch.float64)
        self.class_sum = torch.zeros(self.c, n_latents, dtype=torch.float64)
        self.class_sumsq = torch.zeros(self.c, n_latents, dtype=torch.float64)
        self.class_active = torch.zeros(self.c, n_latents, dtype=torch.int64)
        self.class_count = torch.zeros(self.c, dtype=torch.int64)
        self.top_values = torch.full((0, n_latents), -1.0)
        self.top_positions = torch.zeros((0, n_latents), dtype=torch.int64)

    def update(self, a: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> None:
        """a (b, m) float32 on CPU; labels (b,) (-1 = unlabelled); positions (b,) entry positions."""
        self.n += a.shape[0]
        for i, tau in enumerate(TAUS):
            self.count_above[i] += (a > tau).sum(0)
        a64 = a.double()
        self.total += a64.sum(0)
        labelled = labels >= 0
        if labelled.any():
            y = labels[labelled]
            x = a64[labelled]
            self.class_sum.index_add_(0, y, x)
            self.class_sumsq.index_add_(0, y, x * x)
            self.class_active.index_add_(0, y, (x > 0).long())
            self.class_count += torch.bincount(y, minlength=self.c)
        values = torch.cat([self.top_values, a])
        index = torch.cat([self.top_positions, positions[:, None].expand(-1, self.m)])
        keep = min(self.k, values.shape[0])
        self.top_values, order = values.topk(keep, dim=0)
        self.top_positions = index.gather(0, order)

    def finalize(self, labels_of_position: np.ndarray) -> dict[str, np.ndarray]:
        n = max(self.n, 1)
        active = self.count_above[0].double()
        class_n = self.class_count.double().clamp_min(1)[:, None]
        class_mean = self.class_sum / class_n
        class_var = (self.class_sumsq / class_n - class_mean**2).clamp_min(0)
        top_positions = self.top_positions.T.numpy()  # (m, k)
        top_values = self.top_values.T.numpy()
        top_labels = labels_of_position[top_positions] if top_positions.size else top_positions
        return {
            "frequency": (self.count_above.double() / n).T.numpy(),  # (m, len(TAUS))
            "mean": (self.total / n).numpy(),
            "mean_when_active": (self.total / active.clamp_min(1)).numpy(),
            "class_mean": class_mean.numpy(),  # (C, m)
            "class_std": class_var.sqrt().numpy(),
            "class_frequency": (self.class_active.double() / class_n).numpy(),
            "class_count": self.class_count.numpy(),
            "top_positions": top_positions,  # (m, k) entry positions, strongest first
            "top_values": top_values,
            "top_labels": top_labels,
            "top_label_entropy": label_entropy(top_labels, top_values > 0, self.c),
        }


def label_entropy(labels: np.ndarray, mask: np.ndarray, n_classes: int) -> np.ndarray:
    """Shannon entropy (nats) of the class distribution of each latent's top images (PatchSAE).

    labels, mask (m, k); images with mask False (the latent is zero there) are ignored.
    A latent with no active top image gets entropy 0.
    """
    m = labels.shape[0]
    counts = np.zeros((m, max(n_classes, 1)))
    rows = np.repeat(np.arange(m), labels.shape[1]).reshape(labels.shape)
    ok = mask & (labels >= 0)
    np.add.at(counts, (rows[ok], labels[ok]), 1)
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -(np.where(p > 0, p * np.log(p), 0.0)).sum(1)


@dataclass
class LatentsResult:
    n_images: int
    n_latents: int
    nnz: int


def encode_images(sae: torch.nn.Module, acts: torch.Tensor, token_block: int = 1 << 14) -> torch.Tensor:
    """Image-level latents for activations (b, T, d): mean over T of sae.encode, (b, m)."""
    b, t, d = acts.shape
    flat = acts.reshape(b * t, d)
    out = torch.zeros(b, sae.W_enc.shape[1], dtype=torch.float32, device=acts.device)
    # Encode in token blocks so the (tokens, m) intermediate stays small whatever b and T.
    images_per_block = max(1, token_block // t)
    for start in range(0, b, images_per_block):
        stop = min(start + images_per_block, b)
        f = sae.encode(flat[start * t:stop * t].float())
        out[start:stop] = f.reshape(stop - start, t, -1).mean(1)
    return out


PARTS_DIR = "parts"


def part_path(entry_dir: Path, shard_index: int) -> Path:
    return entry_dir / PARTS_DIR / f"part-{shard_index:06d}.h5"


@torch.no_grad()
def compute_latent_parts(
    reader: ActivationReader,
    sae: torch.nn.Module,
    entry_dir: Path,
    *,
    device: torch.device,
    value_dtype: str = "float32",
    chunk_images: int = 64,
    reporter: Reporter | None = None,
) -> None:
    """This rank's parts: one CSR file per activation shard, `parts/part-XXXXXX.h5`.

    A part is written to a `.tmp` file and renamed when whole, so an interrupted run
    (or a dead rank) leaves only complete parts, which the next run skips.
    """
    reporter = reporter or NullReporter()
    ranks = current()
    m = int(sae.W_enc.shape[1])
    mine = [reader.shards[i] for i in ranks.span(len(reader.shards))]
    label = f" (rank {ranks.rank}/{ranks.world_size})" if ranks.active else ""
    reporter.task(f"dict: image latents{label}", sum(s.n_images for s in mine))
    for shard in mine:
        path = part_path(entry_dir, shard.index)
        if path.is_file():
            reporter.advance(shard.n_images)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = CSRWriter(path, m, value_dtype)
        try:
            for acts, labels, rows in reader.iter_shard(shard, chunk_images):
                a = encode_images(sae, host_to_device(acts, device))
                writer.append(a.cpu().numpy(), labels, rows)
                reporter.advance(len(rows))
        except BaseException:
            writer.abort()
            raise
        writer.close()


def merge_latent_parts(reader: ActivationReader, entry_dir: Path, n_latents: int, value_dtype: str) -> int:
    """Concatenate the parts, in shard order, into `latents.h5`; returns nnz. Streams part by part."""
    parts = [part_path(entry_dir, s.index) for s in reader.shards]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CscopeError(f"latent parts missing after every rank finished: {', '.join(missing[:5])}")
    writer = CSRWriter(entry_dir / "latents.h5", n_latents, value_dtype)
    try:
        for path in parts:
            with h5py.File(path, "r") as part:
                writer.append_csr(part["indptr"][:], part["indices"], part["values"], part["labels"][:],
                                  part["row_index"][:])
    except BaseException:
        writer.abort()
        raise
    writer.close()
    for path in parts:  # the merged matrix holds the same rows: parts are no longer needed
        path.unlink()
    (entry_dir / PARTS_DIR).rmdir()
    return writer.nnz


def statistics_block(n_latents: int) -> int:
    """Rows per dense block of the statistics pass: about 32 MB of float32 whatever m is."""
    return int(max(16, min(4096, (1 << 23) // max(n_latents, 1))))


def compute_statistics(matrix_path: Path, n_classes: int, reporter: Reporter | None = None,
                       block: int | None = None) -> dict[str, np.ndarray]:
    """Every per-latent statistic in one streaming pass over the stored CSR matrix.

    Computed from the stored values (so they describe exactly the matrix later stages read),
    in dense row blocks of bounded size.
    """
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    reporter = reporter or NullReporter()
    with LatentMatrix(matrix_path) as matrix:
        stats = LatentStatistics(matrix.n_latents, n_classes)
        reporter.task("dict: latent statistics", matrix.n_images)
        labels = torch.from_numpy(matrix.labels.astype(np.int64))
        for start, dense in matrix.iter_blocks(block or statistics_block(matrix.n_latents)):
            stop = start + dense.shape[0]
            stats.update(torch.from_numpy(dense), labels[start:stop], torch.arange(start, stop))
            reporter.advance(dense.shape[0])
        return {**stats.finalize(matrix.labels), "_n_images": np.int64(stats.n)}


def write_statistics(path: Path, final: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, array in final.items():
            if not name.startswith("_"):
                f.create_dataset(name, data=array)
        f.attrs["taus"] = np.array(TAUS)
        f.attrs["n_images"] = int(final["_n_images"])
    os.replace(tmp, path)


def compute_image_latents(
    reader: ActivationReader,
    sae: torch.nn.Module,
    out_dir: Path,
    *,
    n_classes: int,
    device: torch.device,
    value_dtype: str = "float32",
    chunk_images: int = 64,
    reporter: Reporter | None = None,
) -> LatentsResult:
    """Write `latents.h5` (CSR) and `stats.h5` for every image of an activation entry (one process)."""
    compute_latent_parts(reader, sae, out_dir, device=device, value_dtype=value_dtype, chunk_images=chunk_images,
                         reporter=reporter)
    m = int(sae.W_enc.shape[1])
    nnz = merge_latent_parts(reader, out_dir, m, value_dtype)
    final = compute_statistics(out_dir / "latents.h5", n_classes, reporter)
    write_statistics(out_dir / "stats.h5", final)
    return LatentsResult(int(final["_n_images"]), m, nnz)


def load_stats(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}


def select_valid_latents(
    stats: dict[str, np.ndarray], *, noisy_threshold: float, min_strong_images: int, strong_value: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ConceptScope's rule: drop noisy latents (mean-when-active > noisy_threshold) and keep
    those with at least `min_strong_images` images above `strong_value`.

    Returns (valid latent indices ascending, the boolean masks behind the decision).
    """
    noisy = stats["mean_when_active"] > noisy_threshold
    strong = (stats["top_values"] > strong_value).sum(1) >= min_strong_images
    valid = ~noisy & strong
    return np.flatnonzero(valid), {"noisy": noisy, "strong": strong}
