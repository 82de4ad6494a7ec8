"""Image-level latents a(x) = mean over tokens of f(z_t(x)), with per-latent statistics.

One streaming pass over the cached activations encodes every token with the SAE,
averages over tokens (CLS included, METHOD §3), writes the positive entries to the
CSR matrix, and accumulates every statistic the dictionary needs. Memory is bounded by
the block size and the (classes × latents) accumulators, never by the split size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import h5py
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from conceptscope_cli.devices import HeapWatch, host_to_device, release_free_memory
from conceptscope_cli.dictionary.sparse import STREAM_BLOCK_NNZ, CSRWriter, LatentMatrix
from conceptscope_cli.distributed import current
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.extract.store import ActivationReader
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.sae.model import SparseAutoencoder

# Frequency thresholds of the reference (fraction of images with a > tau).
TAUS: tuple[float, ...] = (0.0, 0.01, 0.1, 0.2, 0.3, 0.4, 0.5)
TOP_IMAGES = 100


class LatentStatistics:
    """Streaming per-latent statistics of image-level activations, fed sparse (CSR) row blocks.

    Accumulates: counts above each tau, sum, per-class sum, sum of squares and active
    count, and the top `top_k` images per latent (value, entry position; ties go to the
    smaller position). Work per block is O(nnz of the block), never O(rows × latents):
    a zero adds nothing to any sum, and only images where a latent is active can enter its
    top list. Unused top slots hold value -1 and position -1. Memory: the (classes × latents)
    accumulators plus a bounded buffer of top-list candidates, whatever the number of rows.
    """

    def __init__(self, n_latents: int, n_classes: int, top_k: int = TOP_IMAGES) -> None:
        self.m, self.c, self.k = n_latents, max(n_classes, 1), top_k
        self.n = 0
        self.count_above = np.zeros((len(TAUS), n_latents), dtype=np.int64)
        # Sums accumulate entry by entry in stream order (index_add_), so they do not depend on how
        # the rows are cut into blocks. Flat (C*m,) class tables: no (C, m) temporaries.
        self.total = torch.zeros(n_latents, dtype=torch.float64)
        self.class_sum = torch.zeros(self.c * n_latents, dtype=torch.float64)
        self.class_sumsq = torch.zeros(self.c * n_latents, dtype=torch.float64)
        self.class_active = torch.zeros(self.c * n_latents, dtype=torch.int64)
        self.class_count = np.zeros(self.c, dtype=np.int64)
        self.top_values = np.full((n_latents, top_k), -1.0, dtype=np.float32)  # strongest first
        self.top_positions = np.full((n_latents, top_k), -1, dtype=np.int64)
        self._kth = np.full(n_latents, -np.inf, dtype=np.float32)  # value an image must beat to enter
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_size = 0
        # Amortised (a merge costs O(m·k + pending)) and bounded: the buffer is full at a few
        # thousand images already, so it does not grow with the split beyond that.
        self._merge_at = max(STREAM_BLOCK_NNZ, n_latents * top_k)

    def update(self, a: Float[Tensor, "b m"], labels: Int[Tensor, " b"], positions: Int[Tensor, " b"]) -> None:
        """Dense rows: a (b, m) float32 on CPU; labels (b,) (-1 = unlabelled); positions (b,)."""
        dense = a.numpy()
        rows, latents = np.nonzero(dense > 0)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=dense.shape[0]))])
        self.update_sparse(np.asarray(positions), indptr, latents, dense[rows, latents], np.asarray(labels))

    def update_sparse(self, positions: Int[np.ndarray, " b"], indptr: Int[np.ndarray, " b+1"],
                      indices: Int[np.ndarray, " nnz"], values: Float[np.ndarray, " nnz"],
                      labels: Int[np.ndarray, " b"]) -> None:
        """A CSR block: positions, labels (b,); indptr (b+1,) from 0; indices, values (nnz,), values > 0."""
        b = len(positions)
        self.n += b
        latents = np.asarray(indices, dtype=np.int64)
        v32 = np.asarray(values, dtype=np.float32)
        v64 = v32.astype(np.float64)
        for i, tau in enumerate(TAUS):  # compared in float32, as the stored values are
            self.count_above[i] += np.bincount(latents[v32 > np.float32(tau)], minlength=self.m)
        self.total.index_add_(0, torch.from_numpy(latents), torch.from_numpy(v64))
        row_of = np.repeat(np.arange(b), np.diff(indptr))
        labels = np.asarray(labels, dtype=np.int64)
        self.class_count += np.bincount(labels[labels >= 0], minlength=self.c)
        label_of = labels[row_of]
        labelled = label_of >= 0
        flat = torch.from_numpy(label_of[labelled] * self.m + latents[labelled])
        x = torch.from_numpy(v64[labelled])
        self.class_sum.index_add_(0, flat, x)
        self.class_sumsq.index_add_(0, flat, x * x)
        self.class_active.index_add_(0, flat, torch.ones_like(flat))
        # Top lists: only entries that beat the latent's current k-th value can enter.
        enters = v32 > self._kth[latents]
        if enters.any():
            self._pending.append((latents[enters], v32[enters], np.asarray(positions, dtype=np.int64)[row_of[enters]]))
            self._pending_size += int(enters.sum())
            if self._pending_size >= self._merge_at:
                self._merge()

    def _merge(self) -> None:
        """Fold pending candidates into the top lists: sort by (latent, -value, position), keep k."""
        if not self._pending:
            return
        held_latent, held_slot = np.nonzero(self.top_positions >= 0)
        latent = np.concatenate([held_latent] + [p[0] for p in self._pending])
        value = np.concatenate([self.top_values[held_latent, held_slot]] + [p[1] for p in self._pending])
        position = np.concatenate([self.top_positions[held_latent, held_slot]] + [p[2] for p in self._pending])
        order = np.lexsort((position, -value, latent))
        latent, value, position = latent[order], value[order], position[order]
        rank = np.arange(len(latent)) - np.searchsorted(latent, latent, side="left")
        keep = rank < self.k
        self.top_values.fill(-1.0)
        self.top_positions.fill(-1)
        self.top_values[latent[keep], rank[keep]] = value[keep]
        self.top_positions[latent[keep], rank[keep]] = position[keep]
        full = self.top_positions[:, -1] >= 0
        self._kth = np.where(full, self.top_values[:, -1], -np.inf).astype(np.float32)
        self._pending, self._pending_size = [], 0

    def finalize(self, labels_of_position: np.ndarray) -> dict[str, np.ndarray]:
        """The statistics (computed in place: the accumulators are consumed, call once)."""
        self._merge()
        n = max(self.n, 1)
        total = self.total.numpy()
        active = self.count_above[0].astype(np.float64)
        class_n = np.maximum(self.class_count, 1).astype(np.float64)[:, None]
        # In place: at ImageNet size each (C, m) float64 array is 262 MB.
        class_mean = self.class_sum.numpy().reshape(self.c, self.m)
        class_mean /= class_n
        class_var = self.class_sumsq.numpy().reshape(self.c, self.m)
        class_var /= class_n
        for lo in range(0, self.c, 64):  # E[x²] - E[x]², in row chunks to avoid a (C, m) temporary
            class_var[lo:lo + 64] -= np.square(class_mean[lo:lo + 64])
        np.clip(class_var, 0, None, out=class_var)
        width = min(self.k, self.n)  # a split with fewer images than k has shorter lists
        top_positions = self.top_positions[:, :width]  # (m, width) entry positions, strongest first
        top_values = self.top_values[:, :width]
        top_labels = np.where(top_positions >= 0, np.asarray(labels_of_position)[np.clip(top_positions, 0, None)], -1) \
            if top_positions.size else top_positions
        return {
            "frequency": (self.count_above / n).T,  # (m, len(TAUS))
            "mean": total / n,
            "mean_when_active": total / np.maximum(active, 1),
            "class_mean": class_mean,  # (C, m)
            "class_std": np.sqrt(class_var, out=class_var),
            "class_frequency": self.class_active.numpy().reshape(self.c, self.m) / class_n,
            "class_count": self.class_count,
            "top_positions": top_positions,
            "top_values": top_values,
            "top_labels": top_labels,
            "top_label_entropy": label_entropy(top_labels, top_values > 0, self.c),
        }


def label_entropy(labels: Int[np.ndarray, "m K"], mask: Bool[np.ndarray, "m K"], n_classes: int) -> Float[np.ndarray, " m"]:
    """Shannon entropy (nats) of the class distribution of each latent's top images (PatchSAE).

    labels, mask (m, k); images with mask False (the latent is zero there) or label -1 are
    ignored. A latent with no such image gets entropy 0. Counts are taken over (latent,
    label) pairs that occur, never over a dense (m, classes) table.
    """
    m = labels.shape[0]
    ok = mask & (labels >= 0)
    rows = np.broadcast_to(np.arange(m)[:, None], labels.shape)[ok]
    base = max(int(n_classes), int(labels.max(initial=0)) + 1, 1)
    pairs, counts = np.unique(rows.astype(np.int64) * base + labels[ok], return_counts=True)
    owner = pairs // base
    totals = np.bincount(owner, weights=counts, minlength=m)
    p = counts / totals[owner]
    return np.bincount(owner, weights=-p * np.log(p), minlength=m).astype(np.float64)


@dataclass
class LatentsResult:
    n_images: int
    n_latents: int
    nnz: int


def encode_images(sae: SparseAutoencoder, acts: Float[Tensor, "b T d"], token_block: int = 1 << 14) -> Float[Tensor, "b m"]:
    """Image-level latents for activations (b, T, d): mean over T of sae.encode, (b, m)."""
    b, t, d = acts.shape
    flat = acts.reshape(b * t, d)
    # Encode in token blocks so the (tokens, m) intermediate stays small whatever b and T.
    images_per_block = max(1, token_block // t)
    if images_per_block >= b:  # one block (the usual batch): no output buffer to fill and copy
        return sae.encode(flat.float()).reshape(b, t, -1).mean(1)
    out = torch.zeros(b, sae.W_enc.shape[1], dtype=torch.float32, device=acts.device)
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
    sae: SparseAutoencoder,
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
    reporter.task(f"dict: image latents{ranks.label}", sum(s.n_images for s in mine))
    for shard in mine:
        path = part_path(entry_dir, shard.index)
        if path.is_file():
            reporter.advance(shard.n_images)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = CSRWriter(path, m, value_dtype)
        heap = HeapWatch()
        try:
            for acts, labels, rows in reader.iter_shard(shard, chunk_images):
                writer.append(encode_images(sae, host_to_device(acts, device)).cpu().numpy(), labels, rows)
                heap.check()
                reporter.advance(len(rows))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        release_free_memory()  # peak RSS bounded by one part, not by the number of images


@torch.no_grad()
def compute_latent_parts_from_images(
    split: Any,
    tokens: Any,
    sae: SparseAutoencoder,
    entry_dir: Path,
    *,
    n_rows: int,
    shard_size: int,
    batch_size: int,
    num_workers: int,
    value_dtype: str = "float32",
    reporter: Reporter | None = None,
) -> list[int]:
    """This rank's parts from the images: rows [i·shard_size, (i+1)·shard_size) of the split
    become `parts/part-XXXXXX.h5` (the shard numbering of `cscope extract`), decoded in
    DataLoader workers, run to block L (`tokens`, an `ImageTokens`) and through the SAE encoder
    on the device, the image means written as CSR. No token is stored. Corrupt images are
    skipped and listed in the part's `skipped` attribute. Parts are atomic, as from the cache.
    Returns every part index of the split.
    """
    from conceptscope_cli.data.datasets import decoded_loader

    reporter = reporter or NullReporter()
    ranks = current()
    m = int(sae.W_enc.shape[1])
    n_parts = -(-n_rows // shard_size)
    mine = ranks.span(n_parts)

    def rows_in(i: int) -> int:
        return min(shard_size, n_rows - i * shard_size)

    reporter.task(f"dict: image latents from images{ranks.label}", sum(rows_in(i) for i in mine))
    device = tokens.backbone.device
    pending = []
    for index in mine:
        if part_path(entry_dir, index).is_file():
            reporter.advance(rows_in(index))
        else:
            pending.append(index)

    def open_loader(index: int) -> Any:
        start = index * shard_size
        return decoded_loader(split, start, start + rows_in(index), tokens.backbone.preprocess,
                              batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")

    for index, batches in part_batches(pending, open_loader, in_flight=2 * max(num_workers, 1)):
        path = part_path(entry_dir, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = CSRWriter(path, m, value_dtype)
        skipped: list[tuple[int, str]] = []
        heap = HeapWatch()  # within the part: a drifting heap trimmed before it grows far
        try:
            for batch in batches:
                skipped.extend(batch.failures)
                if batch.images is not None:
                    _append_image_latents(writer, sae, tokens, batch)
                    heap.check()
                reporter.advance(len(batch.row_index) + len(batch.failures))
            writer.close(attrs={"skipped": json.dumps(skipped)})
        except BaseException:
            writer.abort()
            raise
        release_free_memory()  # peak RSS bounded by one part, not by the number of images
    return list(range(n_parts))


def _append_image_latents(writer: CSRWriter, sae: SparseAutoencoder, tokens: Any, batch: Any) -> None:
    """One decoded batch's image latents into the part. A function of its own so that its tensors
    are freed when it returns, not held through the next batch's forward (README "Scaling out")."""
    a = encode_images(sae, tokens(batch.images))
    writer.append(a.cpu().numpy(), batch.labels, batch.row_index)


def part_batches(indices: list[int], open_loader: Callable[[int], Any], in_flight: int
                 ) -> Iterator[tuple[int, Iterator[Any]]]:
    """(part index, its batches) for each part in order, from `open_loader(index)` (a DataLoader).

    The next part's loader is started once every batch left in this part is already requested
    from the workers (`in_flight`: the DataLoader's prefetch, 2 per worker), so its workers decode
    while this part's last batches run through the model: no part waits for its first batch
    (at ImageNet scale one batch of JPEGs per worker, ~0.4 s, per part of 2,048 images). At most
    two parts' row lists are held at once. Each part's batches must be consumed before the next.
    """
    upcoming: Optional[Iterator[Any]] = None
    for n, index in enumerate(indices):
        current = upcoming if upcoming is not None else iter(open_loader(index))
        upcoming = None
        following = indices[n + 1] if n + 1 < len(indices) else None

        def batches(current: Iterator[Any] = current, following: Optional[int] = following) -> Iterator[Any]:
            nonlocal upcoming
            remaining = len(current)  # type: ignore[arg-type]  # a DataLoader iterator has a length
            for batch in current:
                remaining -= 1
                if following is not None and upcoming is None and remaining <= in_flight:
                    upcoming = iter(open_loader(following))
                yield batch

        yield index, batches()


def missing_part_rows(entry_dir: Path, n_rows: int, shard_size: int) -> int:
    """Rows of the split whose image-source part is not written yet (all ranks together)."""
    n_parts = -(-n_rows // shard_size)
    return sum(min(shard_size, n_rows - i * shard_size) for i in range(n_parts) if not part_path(entry_dir, i).is_file())


@torch.no_grad()
def probe_active_per_image(split: Any, tokens: Any, sae: SparseAutoencoder, n_images: int) -> float:
    """Mean number of active latents per image on the split's first `n_images` (the CSR size
    estimate of the disk plan: measured, since it depends on the SAE and the data)."""
    from conceptscope_cli.data.datasets import decoded_loader

    loader = decoded_loader(split, 0, n_images, tokens.backbone.preprocess, batch_size=n_images, num_workers=0)
    for batch in loader:
        if batch.images is not None:
            return float((encode_images(sae, tokens(batch.images)) > 0).sum(1).float().mean())
    return 0.0


def skipped_in_parts(entry_dir: Path, indices: list[int]) -> list[tuple[int, str]]:
    """The corrupt rows the image-source parts skipped (read before the parts are merged)."""
    out: list[tuple[int, str]] = []
    for index in indices:
        with h5py.File(part_path(entry_dir, index), "r") as part:
            out.extend(tuple(x) for x in json.loads(part.attrs.get("skipped", "[]")))
    return sorted(out)


def merge_latent_parts(reader: ActivationReader | None, entry_dir: Path, n_latents: int, value_dtype: str,
                       indices: list[int] | None = None) -> int:
    """Concatenate the parts, in shard order, into `latents.h5`; returns nnz. Streams part by part.

    The parts are the reader's shards, or `indices` for parts made from the images."""
    order = indices if indices is not None else [s.index for s in reader.shards]  # type: ignore[union-attr]
    parts = [part_path(entry_dir, i) for i in order]
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


def statistics_block(matrix: LatentMatrix, nnz_per_block: int = STREAM_BLOCK_NNZ) -> int:
    """Rows per block of the statistics pass: about `nnz_per_block` stored values on average
    (`sparse.STREAM_BLOCK_NNZ`, ~13 MB of working arrays), whatever the number of rows or latents."""
    return matrix.block_rows(nnz_per_block)


def compute_statistics(matrix_path: Path, n_classes: int, reporter: Reporter | None = None,
                       block: int | None = None) -> dict[str, np.ndarray]:
    """Every per-latent statistic in one streaming pass over the stored CSR matrix.

    Computed from the stored values (so they describe exactly the matrix later stages read),
    in CSR row blocks of bounded size (`statistics_block`).
    """
    reporter = reporter or NullReporter()
    with LatentMatrix(matrix_path) as matrix:
        stats = LatentStatistics(matrix.n_latents, n_classes)
        reporter.task("dict: latent statistics", matrix.n_images)
        step = block or statistics_block(matrix)
        for start in range(0, matrix.n_images, step):
            stop = min(start + step, matrix.n_images)
            indptr, indices, values = matrix.csr_block(start, stop)
            stats.update_sparse(np.arange(start, stop), indptr, indices, values, matrix.labels[start:stop])
            reporter.advance(stop - start)
        return stats.finalize(matrix.labels)


def write_statistics(path: Path, final: dict[str, np.ndarray], n_images: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, array in final.items():
            f.create_dataset(name, data=array)
        f.attrs["taus"] = np.array(TAUS)
        f.attrs["n_images"] = int(n_images)
    os.replace(tmp, path)


def finish_latents(reader: ActivationReader | None, entry_dir: Path, n_latents: int, *, n_classes: int | None,
                   value_dtype: str = "float32", reporter: Reporter | None = None,
                   indices: list[int] | None = None) -> LatentsResult:
    """After every part exists: merge them into `latents.h5`, then write `stats.h5` from it."""
    nnz = merge_latent_parts(reader, entry_dir, n_latents, value_dtype, indices)
    with LatentMatrix(entry_dir / "latents.h5") as matrix:
        n_images = matrix.n_images
        if n_classes is None:  # from the labels, as the cache path does from its reader's
            n_classes = int(matrix.labels.max()) + 1 if n_images and matrix.labels.max() >= 0 else 1
    write_statistics(entry_dir / "stats.h5", compute_statistics(entry_dir / "latents.h5", n_classes, reporter),
                     n_images)
    release_free_memory()  # the pass's freed blocks would otherwise stay mapped through the tiles
    return LatentsResult(n_images, n_latents, nnz)


def compute_image_latents(
    reader: ActivationReader,
    sae: SparseAutoencoder,
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
    return finish_latents(reader, out_dir, int(sae.W_enc.shape[1]), n_classes=n_classes, value_dtype=value_dtype,
                          reporter=reporter)


def load_stats(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}


def select_valid_latents(
    stats: dict[str, np.ndarray], *, noisy_threshold: float, min_strong_images: int, strong_value: float
) -> tuple[Int[np.ndarray, " v"], dict[str, Bool[np.ndarray, " m"]]]:
    """ConceptScope's rule: drop noisy latents (mean-when-active > noisy_threshold) and keep
    those with at least `min_strong_images` images above `strong_value`.

    Returns (valid latent indices ascending, the boolean masks behind the decision).
    """
    noisy = stats["mean_when_active"] > noisy_threshold
    strong = (stats["top_values"] > strong_value).sum(1) >= min_strong_images
    valid = ~noisy & strong
    return np.flatnonzero(valid), {"noisy": noisy, "strong": strong}
