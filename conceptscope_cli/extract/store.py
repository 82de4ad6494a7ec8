"""HDF5 layout of an activation cache entry (conceptscope_cli/FORMATS.md, "Activation cache entry").

Writing: each shard is filled in `shard-XXXXXX.h5.tmp` and renamed when complete, so a
shard file that exists is whole. Finishing an entry writes `activations.h5`, whose
`activations` and `token_positions` are HDF5 virtual datasets over the shards (no copy)
and whose `labels` and `row_index` are small real arrays.

Reading: `ActivationReader` streams shard by shard, which is how training and the
dictionary stage consume the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

import conceptscope_cli

SHARDS_DIR = "shards"
VIEW_NAME = "activations.h5"


def shard_path(entry_dir: Path, shard: int) -> Path:
    return entry_dir / SHARDS_DIR / f"shard-{shard:06d}.h5"


class ShardWriter:
    """Appends batches to one shard; `close()` makes it visible atomically.

    Nothing it allocates per batch outlives the batch: the activations reach the file in whole
    chunks, straight from the batch or through one staging buffer of a chunk's rows, with HDF5's
    chunk cache off; labels, row indices and token positions fill arrays of the shard's capacity,
    written at close. Why: the chunk cache's buffers (one per chunk, each alive for a few batches)
    landed in the holes the forward's large temporaries leave in the C heap, so the next batch's
    temporaries no longer fitted there and the heap grew by ~8 MB per batch (peak RSS per shard
    up with the number of images; README "Scaling out").
    """

    def __init__(self, path: Path, *, capacity: int, n_tokens: int, d_model: int, dtype: str, chunk_images: int) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        # Only the shards folder is created: if the entry folder itself is gone (removed
        # under a running extract), recreating it would publish a short entry.
        path.parent.mkdir(exist_ok=True)
        self.file = h5py.File(self.tmp, "w", rdcc_nbytes=0)  # no chunk cache: writes go to disk as they come
        self.count = 0
        chunk = (max(1, min(chunk_images, capacity)), n_tokens, d_model)
        self.acts = self.file.create_dataset(
            "activations", shape=(capacity, n_tokens, d_model), maxshape=(capacity, n_tokens, d_model),
            dtype=dtype, chunks=chunk,
        )
        self.labels = self.file.create_dataset("labels", shape=(capacity,), maxshape=(capacity,), dtype="int64")
        self.rows = self.file.create_dataset("row_index", shape=(capacity,), maxshape=(capacity,), dtype="int64")
        self.positions = self.file.create_dataset(
            "token_positions", shape=(capacity, n_tokens), maxshape=(capacity, n_tokens), dtype="int32",
            chunks=(chunk[0], n_tokens),
        )
        self._stage = np.empty(chunk, dtype=self.acts.dtype)  # rows of the chunk being filled
        self._staged = 0
        self._written = 0  # rows of activations in the file
        self._labels = np.empty(capacity, np.int64)
        self._rows = np.empty(capacity, np.int64)
        self._positions = np.empty((capacity, n_tokens), np.int32)

    def append(self, acts: np.ndarray, labels: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> None:
        """acts (b, T, d); labels, rows (b,); positions (b, T)."""
        b = len(rows)
        if b == 0:
            return
        s = slice(self.count, self.count + b)
        self._labels[s] = labels
        self._rows[s] = rows
        self._positions[s] = positions
        per_chunk, done = len(self._stage), 0
        while done < b:
            if self._staged == 0 and b - done >= per_chunk:  # whole chunks straight from the batch
                n = (b - done) // per_chunk * per_chunk
                self.acts[self._written:self._written + n] = acts[done:done + n]
                self._written += n
                done += n
                continue
            take = min(b - done, per_chunk - self._staged)
            self._stage[self._staged:self._staged + take] = acts[done:done + take]
            self._staged += take
            done += take
            if self._staged == per_chunk:
                self._write_staged()
        self.count += b

    def _write_staged(self) -> None:
        self.acts[self._written:self._written + self._staged] = self._stage[:self._staged]
        self._written += self._staged
        self._staged = 0

    def close(self, *, row_start: int, row_stop: int, skipped: list[tuple[int, str]]) -> None:
        if self._staged:
            self._write_staged()
        for dataset, held in ((self.labels, self._labels), (self.rows, self._rows), (self.positions, self._positions)):
            dataset[:self.count] = held[:self.count]
        for dataset in (self.acts, self.labels, self.rows, self.positions):
            dataset.resize(self.count, axis=0)
        self.file.attrs["row_start"] = row_start
        self.file.attrs["row_stop"] = row_stop
        self.file.attrs["skipped"] = json.dumps(skipped)
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished shard; safe after a failed write or a failed `close`."""
        with contextlib.suppress(Exception):  # the file is discarded anyway (e.g. a full disk)
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def completed_shards(entry_dir: Path) -> list[int]:
    folder = entry_dir / SHARDS_DIR
    if not folder.is_dir():
        return []
    # A `.tmp` file is a shard being written (by this or another rank) or an interrupted
    # one; either way it is not complete, and whoever writes that shard next truncates it.
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("shard-*.h5"))


@dataclass(frozen=True)
class ShardInfo:
    index: int
    path: Path
    n_images: int
    row_start: int
    row_stop: int
    skipped: list[tuple[int, str]]


def shard_infos(entry_dir: Path) -> list[ShardInfo]:
    infos = []
    for index in completed_shards(entry_dir):
        path = shard_path(entry_dir, index)
        with h5py.File(path, "r") as f:
            infos.append(
                ShardInfo(
                    index, path, int(f["row_index"].shape[0]), int(f.attrs["row_start"]), int(f.attrs["row_stop"]),
                    [tuple(x) for x in json.loads(f.attrs["skipped"])],
                )
            )
    return infos


def write_view(entry_dir: Path, *, n_tokens: int, d_model: int, dtype: str, attrs: dict) -> int:
    """Write `activations.h5` over all shards; returns the number of images.

    Called once every writer is done, so any `.tmp` left is an abandoned shard: removed."""
    for stale in (entry_dir / SHARDS_DIR).glob("*.tmp"):
        stale.unlink()
    infos = [s for s in shard_infos(entry_dir) if s.n_images > 0]
    total = sum(s.n_images for s in infos)
    acts_layout = h5py.VirtualLayout(shape=(total, n_tokens, d_model), dtype=dtype)
    pos_layout = h5py.VirtualLayout(shape=(total, n_tokens), dtype="int32")
    labels = np.empty(total, dtype=np.int64)
    rows = np.empty(total, dtype=np.int64)
    offset = 0
    for info in infos:
        relative = os.path.relpath(info.path, entry_dir)  # relative: the entry folder is renamed on commit
        s = slice(offset, offset + info.n_images)
        acts_layout[s] = h5py.VirtualSource(relative, "activations", shape=(info.n_images, n_tokens, d_model))
        pos_layout[s] = h5py.VirtualSource(relative, "token_positions", shape=(info.n_images, n_tokens))
        with h5py.File(info.path, "r") as f:
            labels[s] = f["labels"][:]
            rows[s] = f["row_index"][:]
        offset += info.n_images
    tmp = entry_dir / (VIEW_NAME + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        f.create_virtual_dataset("activations", acts_layout, fillvalue=0)
        f.create_virtual_dataset("token_positions", pos_layout, fillvalue=-1)
        f.create_dataset("labels", data=labels)
        f.create_dataset("row_index", data=rows)
        for key, value in {**attrs, "n_images": total, "format_version": conceptscope_cli.FORMAT_VERSION}.items():
            f.attrs[key] = value
    os.replace(tmp, entry_dir / VIEW_NAME)
    return total


class ActivationReader:
    """Read-only access to a complete activation entry, streaming shard by shard."""

    def __init__(self, entry_dir: Path) -> None:
        self.entry_dir = Path(entry_dir)
        with h5py.File(self.entry_dir / VIEW_NAME, "r") as f:
            self.attrs = dict(f.attrs)
            self.labels: np.ndarray = f["labels"][:]  # (N,)
            self.row_index: np.ndarray = f["row_index"][:]  # (N,)
        self.shards = [s for s in shard_infos(self.entry_dir) if s.n_images > 0]

    @property
    def n_images(self) -> int:
        return int(self.attrs["n_images"])

    @property
    def n_tokens(self) -> int:
        return int(self.attrs["n_tokens"])

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    def iter_chunks(self, chunk_images: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (activations (b, T, d), labels (b,), row_index (b,)) in dataset order."""
        for info in self.shards:
            yield from self.iter_shard(info, chunk_images)

    def iter_shard(self, info: ShardInfo, chunk_images: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The chunks of one shard, in order (the unit that ranks share out)."""
        with h5py.File(info.path, "r") as f:
            acts = f["activations"]
            for start in range(0, info.n_images, chunk_images):
                stop = min(start + chunk_images, info.n_images)
                yield acts[start:stop], f["labels"][start:stop], f["row_index"][start:stop]

    def read_images(self, positions: np.ndarray) -> np.ndarray:
        """Activations of the images at entry positions `positions` (sorted reads), (k, T, d)."""
        order = np.argsort(positions)
        with h5py.File(self.entry_dir / VIEW_NAME, "r") as f:
            data = f["activations"][np.asarray(positions)[order]]
        out = np.empty_like(data)
        out[order] = data
        return out
