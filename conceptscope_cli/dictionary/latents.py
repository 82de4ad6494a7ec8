"""Image-level latents a(x) = mean over tokens of f(z_t(x)), with per-latent statistics.

One streaming pass over the cached activations encodes every token with the SAE,
averages over tokens (CLS included, REFERENCE §3), writes the positive entries to the
CSR matrix, and accumulates every statistic the dictionary needs. Memory is bounded by
the block size and the (classes × latents) accumulators, never by the split size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from conceptscope_cli.dictionary.sparse import CSRWriter
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


@torch.no_grad()
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
    """Write `latents.h5` (CSR) and `stats.h5` for every image of an activation entry."""
    reporter = reporter or NullReporter()
    m = int(sae.W_enc.shape[1])
    writer = CSRWriter(out_dir / "latents.h5", m, value_dtype)
    stats = LatentStatistics(m, n_classes)
    position = 0
    reporter.task("dict: image latents", reader.n_images)
    try:
        for acts, labels, rows in reader.iter_chunks(chunk_images):
            a = encode_images(sae, torch.from_numpy(acts).to(device)).cpu()
            writer.append(a.numpy(), labels, rows)
            positions = torch.arange(position, position + len(rows))
            stats.update(a, torch.from_numpy(labels.astype(np.int64)), positions)
            position += len(rows)
            reporter.advance(len(rows))
    except BaseException:
        writer.file.close()
        writer.tmp.unlink(missing_ok=True)
        raise
    writer.close()
    final = stats.finalize(reader.labels)
    tmp = out_dir / "stats.h5.tmp"
    with h5py.File(tmp, "w") as f:
        for name, array in final.items():
            f.create_dataset(name, data=array)
        f.attrs["taus"] = np.array(TAUS)
        f.attrs["n_images"] = stats.n
    tmp.rename(out_dir / "stats.h5")
    return LatentsResult(stats.n, m, writer.nnz)


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
