"""Image-level SAE latents stored sparsely (CSR) in HDF5, and a reader for later stages.

Layout of `latents.h5` (conceptscope_cli/FORMATS.md, "Image-level latents"):
`indptr` (N+1,) int64, `indices` (nnz,) the narrowest unsigned integer that holds every
latent id (uint8 for m <= 256, uint16 for m <= 65,536, else uint32; files written before
this hold int32, read the same), `values` (nnz,) float32|float16, `labels` (N,) int64,
`row_index` (N,) int64; attrs `n_images`, `n_latents`. Row i holds the latents with
a(x_i) > 0, sorted by latent index. Readers hand out indices as int32 whatever is stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from conceptscope_cli.cache.disk import latent_index_dtype as index_dtype
from conceptscope_cli.errors import CscopeError

_GROW = 1 << 20  # nnz added per resize of the append-only datasets
# Stored values per row block of the streaming statistics passes (dict's stats.h5, the concept
# statistics and the evidence of categorize): their working arrays are ~100 bytes per value, so
# ~13 MB per block. Small enough that a block is full at a few thousand images already: a larger
# block only fills as the split grows, and peak RSS with it (benchmarks/pipeline.py).
STREAM_BLOCK_NNZ = 1 << 17


def check_index_dtype(dtype: np.dtype, n_latents: int, path: Path) -> None:
    """Refuse a latents file whose stored ids cannot be (integers that hold every id of) its latents."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or n_latents - 1 > np.iinfo(dtype).max:
        raise CscopeError(f"{path}: latent ids stored as {dtype} cannot hold {n_latents} latents "
                          "(not a latents file this version reads)", hint="rebuild it with `cscope dict`")


class CSRWriter:
    """Append dense row blocks; only their positive entries are stored."""

    def __init__(self, path: Path, n_latents: int, value_dtype: str = "float32") -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        # No chunk cache: its per-chunk buffers, alive across many appends, sat in the holes the
        # forwards' temporaries leave in the C heap and made it grow per batch (README "Scaling out").
        # Writes go to disk as they come (a partial chunk at a flush's ends is read back by HDF5).
        self.file = h5py.File(self.tmp, "w", rdcc_nbytes=0)
        self.n_latents = n_latents
        self.nnz = 0
        self.n_rows = 0
        chunk = 1 << 15  # 128 KiB of indices per HDF5 chunk: small overhead for small splits
        self.index_dtype = index_dtype(n_latents)
        self.indices = self.file.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=self.index_dtype,
                                                chunks=(chunk,))
        self.values = self.file.create_dataset("values", shape=(0,), maxshape=(None,), dtype=value_dtype, chunks=(chunk,))
        self.indptr_parts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.labels: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        # Entries appended but not yet in the file: one HDF5 write per ~_GROW entries instead of
        # two per (small) block; bounded, so memory does not grow with the rows.
        self._held: list[tuple[np.ndarray, np.ndarray]] = []
        self._held_nnz = 0

    def append(self, dense: np.ndarray, labels: np.ndarray, row_index: np.ndarray) -> None:
        """dense (b, m) non-negative; labels, row_index (b,)."""
        r, c = np.nonzero(dense > 0)  # row-major order: sorted by row, then latent
        counts = np.bincount(r, minlength=dense.shape[0])
        self.indptr_parts.append(self.nnz + np.cumsum(counts))
        self._held.append((c.astype(self.index_dtype), dense[r, c]))  # h5py converts the values as before
        self._held_nnz += len(c)
        self.nnz += len(c)
        self.n_rows += dense.shape[0]
        self.labels.append(np.asarray(labels, dtype=np.int64))
        self.rows.append(np.asarray(row_index, dtype=np.int64))
        if self._held_nnz >= _GROW:
            self._flush()

    def _flush(self) -> None:
        """Write the held entries at [nnz - held, nnz)."""
        if not self._held:
            return
        start = self.nnz - self._held_nnz
        if self.nnz > self.indices.shape[0]:
            size = max(self.nnz, self.indices.shape[0] + _GROW)
            self.indices.resize((size,))
            self.values.resize((size,))
        self.indices[start:self.nnz] = np.concatenate([ids for ids, _ in self._held])
        self.values[start:self.nnz] = np.concatenate([vals for _, vals in self._held])
        self._held, self._held_nnz = [], 0

    def append_csr(self, indptr: np.ndarray, indices: "h5py.Dataset | np.ndarray", values: "h5py.Dataset | np.ndarray",
                   labels: np.ndarray, row_index: np.ndarray, chunk_nnz: int = 1 << 22) -> None:
        """Append rows already in CSR form (indptr starts at 0), copying nnz in bounded chunks."""
        self._flush()
        n = int(indptr[-1])
        new = self.nnz + n
        if new > self.indices.shape[0]:
            self.indices.resize((new,))
            self.values.resize((new,))
        for lo in range(0, n, chunk_nnz):
            hi = min(lo + chunk_nnz, n)
            ids = np.asarray(indices[lo:hi])
            # A narrower store would wrap an out-of-range id silently: refuse it instead.
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.n_latents):
                raise ValueError(f"latent ids outside [0, {self.n_latents}) in a CSR block")
            self.indices[self.nnz + lo:self.nnz + hi] = ids.astype(self.index_dtype)
            self.values[self.nnz + lo:self.nnz + hi] = values[lo:hi]
        self.indptr_parts.append(self.nnz + np.asarray(indptr[1:], dtype=np.int64))
        self.nnz = new
        self.n_rows += len(indptr) - 1
        self.labels.append(np.asarray(labels, dtype=np.int64))
        self.rows.append(np.asarray(row_index, dtype=np.int64))

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def close(self, attrs: dict | None = None) -> None:
        self._flush()
        self.indices.resize((self.nnz,))
        self.values.resize((self.nnz,))
        self.file.create_dataset("indptr", data=np.concatenate(self.indptr_parts))
        self.file.create_dataset("labels", data=np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64))
        self.file.create_dataset("row_index", data=np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64))
        self.file.attrs["n_images"] = self.n_rows
        self.file.attrs["n_latents"] = self.n_latents
        for key, value in (attrs or {}).items():
            self.file.attrs[key] = value
        self.file.close()
        os.replace(self.tmp, self.path)


class LatentMatrix:
    """Read access to `latents.h5` without loading the whole matrix.

    `indptr`, `labels` and `row_index` (8 bytes per image each) are held in memory;
    indices and values are read by slices.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = h5py.File(self.path, "r")
        self.indptr: np.ndarray = self.file["indptr"][:]
        self.labels: np.ndarray = self.file["labels"][:]
        self.row_index: np.ndarray = self.file["row_index"][:]
        self.n_images = int(self.file.attrs["n_images"])
        self.n_latents = int(self.file.attrs["n_latents"])
        check_index_dtype(self.file["indices"].dtype, self.n_latents, self.path)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "LatentMatrix":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def block_rows(self, nnz_per_block: int = STREAM_BLOCK_NNZ, min_rows: int = 256) -> int:
        """Rows per block holding about `nnz_per_block` stored values on average (at least `min_rows`)."""
        per_row = self.nnz / max(self.n_images, 1)
        return int(max(min_rows, min(1 << 20, nnz_per_block / max(per_row, 1.0))))

    def row_block(self, start: int, stop: int) -> np.ndarray:
        """Dense rows [start, stop) as (stop-start, m) float32."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        indices = self.file["indices"][lo:hi].astype(np.int32)
        values = self.file["values"][lo:hi].astype(np.float32)
        out = np.zeros((stop - start, self.n_latents), dtype=np.float32)
        row_of = np.repeat(np.arange(stop - start), np.diff(self.indptr[start:stop + 1]))
        out[row_of, indices] = values
        return out

    def csr_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, stop) as CSR: (indptr (b+1,) from 0, indices (nnz,) int32, values (nnz,))."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return self.indptr[start:stop + 1] - lo, self.file["indices"][lo:hi].astype(np.int32), self.file["values"][lo:hi]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Dense rows at arbitrary positions, (k, m) float32, in the order given."""
        out = np.zeros((len(positions), self.n_latents), dtype=np.float32)
        for i, p in enumerate(np.asarray(positions)):
            lo, hi = int(self.indptr[p]), int(self.indptr[p + 1])
            out[i, self.file["indices"][lo:hi]] = self.file["values"][lo:hi]
        return out

    def class_positions(self, label: int) -> np.ndarray:
        """Positions of the images of one class."""
        return np.flatnonzero(self.labels == label)

    def column(self, latent: int, chunk_nnz: int = 1 << 22) -> np.ndarray:
        """a_latent(x) for every image, (N,) float32, scanning indices in bounded chunks."""
        out = np.zeros(self.n_images, dtype=np.float32)
        for lo in range(0, self.nnz, chunk_nnz):
            hi = min(lo + chunk_nnz, self.nnz)
            hit = np.flatnonzero(self.file["indices"][lo:hi] == latent)
            if hit.size:
                flat = lo + hit
                out[np.searchsorted(self.indptr, flat, side="right") - 1] = self.file["values"][lo:hi][hit]
        return out

    def top_rows(self, latent: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, values) of the k images where the latent is strongest, descending."""
        column = self.column(latent)
        k = min(k, len(column))
        top = np.argpartition(-column, k - 1)[:k] if k else np.zeros(0, np.int64)
        order = top[np.argsort(-column[top], kind="stable")]
        return order, column[order]
