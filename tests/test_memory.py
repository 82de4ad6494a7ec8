"""Peak memory stays bounded by one shard / part / class: after each, stages hand the heap's free
pages back to the OS (glibc `malloc_trim`). Without it the RSS of extract and dict grew with the
number of images (benchmarks/pipeline.py: extract 1,165 -> 1,401 -> 1,639 MB at 2k/8k/32k images)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_main

FRAGMENT = """
import sys
from conceptscope_cli.devices import release_free_memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

# 150 MB of 1 KB heap blocks, then every block but one in 200 freed: the survivors pin the heap,
# so glibc keeps the free pages mapped until it is asked to trim.
blocks = [bytes(1024) + bytes([i % 251]) for i in range(150_000)]
kept = blocks[::200]
del blocks
before = rss_mb()
trimmed = release_free_memory()
print(trimmed, before, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_release_free_memory_returns_a_fragmented_heap_to_the_os() -> None:
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True).stdout.split()
    trimmed, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert trimmed
    assert before - after > 100, (before, after)  # most of the 150 MB freed goes back


def test_extract_releases_memory_after_every_shard(tiny_project: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    from conceptscope_cli.extract import activations

    calls: list[int] = []
    monkeypatch.setattr(activations, "release_free_memory", lambda: calls.append(1) or True)
    result = run_main(["extract"], tiny_project, capsys, monkeypatch)
    assert result.exit_code == 0, result.output
    shards = list((tiny_project / ".cscope" / "cache" / "activations").glob("*/shards/shard-*.h5"))
    assert len(shards) > 1 and len(calls) == len(shards)


HEAP_FRAGMENT = """
import sys
import numpy as np
from conceptscope_cli.heap import fix_mmap_threshold

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

fixed = fix_mmap_threshold() if sys.argv[1] == "fixed" else None
big = np.ones(20_000_000 // 8); del big  # a 20 MB block freed: glibc's dynamic threshold rises to it
before = rss_mb()
blocks = [np.ones(2_000_000 // 8) for _ in range(50)]  # 100 MB of 2 MB tensors
kept = blocks[-1]
del blocks  # every block but the last freed (it pins the heap's top)
print(fixed, rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc are Linux's")
def test_fixed_mmap_threshold_returns_freed_tensors_at_once() -> None:
    """With the threshold fixed (what `cscope` does at start), 2 MB buffers get their own mappings
    and go back to the OS when freed, even after a larger free; with glibc's dynamic threshold they
    come from the heap and stay (the creep of extract's per-shard peak, conceptscope_cli/heap.py)."""
    def retained(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", HEAP_FRAGMENT, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], float(out[1])

    fixed, kept_fixed = retained("fixed")
    _, kept_dynamic = retained("dynamic")
    assert fixed == "True"
    assert kept_dynamic > 80, kept_dynamic  # the experiment shows the problem without the fix
    assert kept_fixed < 10, kept_fixed


def test_the_cli_fixes_the_mmap_threshold_only_when_asked(capsys, monkeypatch, tmp_path) -> None:  # noqa: ANN001
    """CSCOPE_MMAP_THRESHOLD opts in (it costs speed, heap.py); unset, glibc's adaptive threshold
    stays; a bad value is a usage error that names the variable."""
    from conceptscope_cli import heap

    calls: list[int] = []
    monkeypatch.setattr(heap, "fix_mmap_threshold", lambda threshold=0: calls.append(threshold) or True)
    monkeypatch.delenv(heap.ENV_VAR, raising=False)
    assert run_main(["--version"], tmp_path, capsys, monkeypatch).exit_code == 0
    assert calls == []
    monkeypatch.setenv(heap.ENV_VAR, "4MiB")
    result = run_main(["--version"], tmp_path, capsys, monkeypatch)
    assert calls == [4 * 1024 * 1024], result.output
    monkeypatch.setenv(heap.ENV_VAR, "lots")
    result = run_main(["--version"], tmp_path, capsys, monkeypatch)
    assert result.exit_code == 2 and "CSCOPE_MMAP_THRESHOLD='lots'" in result.stderr, result.stderr
    assert calls == [4 * 1024 * 1024]


def test_mmap_threshold_values() -> None:
    from conceptscope_cli.heap import threshold_from_env

    assert threshold_from_env({}) is None and threshold_from_env({"CSCOPE_MMAP_THRESHOLD": " "}) is None
    assert threshold_from_env({"CSCOPE_MMAP_THRESHOLD": "131072"}) == 131072
    assert threshold_from_env({"CSCOPE_MMAP_THRESHOLD": "128KiB"}) == 131072
    assert threshold_from_env({"CSCOPE_MMAP_THRESHOLD": "128k"}) == 131072
    for bad in ("0", "-5", "4MB", "1.5MiB", "x"):
        with pytest.raises(ValueError, match="CSCOPE_MMAP_THRESHOLD"):
            threshold_from_env({"CSCOPE_MMAP_THRESHOLD": bad})


def _heap_in_use() -> int:
    """Bytes in use in glibc's heap (mallinfo2's uordblks): what survives between two calls."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return int(libc.mallinfo2().uordblks)


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc's mallinfo2")
def test_shard_writer_keeps_no_heap_block_from_one_batch_to_the_next(tmp_path: Path) -> None:
    """What extract's writer allocates for a batch is gone when `append` returns: HDF5's chunk
    cache kept each chunk's buffer (here 69,632 B) for a few batches, in the holes the forward's
    temporaries leave in the C heap, and the heap grew by ~8 MB per batch (README "Scaling out").
    The rows written are the rows given, whole chunks, staged ones and the partial last one alike."""
    import h5py
    import numpy as np

    from conceptscope_cli.extract.store import ShardWriter, shard_path

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((b, 17, 128)).astype(np.float16) for b in (64,) * 9 + (40, 3, 61)]
    writer = ShardWriter(shard_path(tmp_path, 0), capacity=sum(len(b) for b in batches), n_tokens=17, d_model=128,
                         dtype="float16", chunk_images=16)
    start, grown = 0, []
    for i, acts in enumerate(batches):
        rows = np.arange(start, start + len(acts))
        writer.append(acts, rows % 3, rows, np.tile(np.arange(17, dtype=np.int32), (len(acts), 1)))
        start += len(acts)
        if i == 0:
            base = _heap_in_use()
        grown.append(_heap_in_use() - base)
    writer.close(row_start=0, row_stop=start, skipped=[])
    # Measured: ~3.5 KB per batch of HDF5's own metadata (the chunk index), 45 KB in all; with
    # the chunk cache on, 2.7 MB.
    assert max(grown) < 256 * 1024, grown
    with h5py.File(shard_path(tmp_path, 0)) as f:
        assert np.array_equal(f["activations"][()], np.concatenate(batches))
        assert f["activations"].chunks == (16, 17, 128)
        assert np.array_equal(f["row_index"][()], np.arange(start)) and np.array_equal(f["labels"][()], np.arange(start) % 3)
        assert f["token_positions"].shape == (start, 17) and int(f["token_positions"][-1, -1]) == 16


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc's mallinfo2")
def test_csr_writer_keeps_no_heap_block_after_a_flush(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Once the CSR writer has flushed its held entries, nothing of them stays in the C heap (the
    chunk cache held the chunks written last, up to 1 MiB, across the next batches); the file
    holds the entries given."""
    import numpy as np

    from conceptscope_cli.dictionary import sparse

    monkeypatch.setattr(sparse, "_GROW", 20_000)  # a flush every ~3 blocks of 64 rows x ~110 entries
    rng = np.random.default_rng(1)
    blocks = [np.where(rng.random((64, 512)) < 0.2, rng.random((64, 512)), 0).astype(np.float32) for _ in range(12)]
    writer = sparse.CSRWriter(tmp_path / "latents.h5", 512)
    after_flush = []
    for i, dense in enumerate(blocks):
        writer.append(dense, np.zeros(64, np.int64), np.arange(64 * i, 64 * (i + 1)))
        if writer._held_nnz == 0:  # just flushed
            after_flush.append(_heap_in_use())
    writer.close()
    assert len(after_flush) >= 3, after_flush
    grown = [x - after_flush[0] for x in after_flush]
    assert max(grown) < 64 * 1024, grown  # the small per-block indptr/labels/rows arrays; 413 KB with the cache
    import h5py

    with h5py.File(tmp_path / "latents.h5") as f:
        dense_all = np.concatenate(blocks)
        r, c = np.nonzero(dense_all > 0)
        assert np.array_equal(f["indices"][()], c) and np.array_equal(f["values"][()], dense_all[r, c])
        assert np.array_equal(f["indptr"][()], np.concatenate([[0], np.cumsum(np.bincount(r, minlength=len(dense_all)))]))


WATCH_FRAGMENT = """
import sys
from conceptscope_cli.devices import HeapWatch

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

watch, patient = HeapWatch(budget=50 * 2**20), HeapWatch(budget=10 * 2**30)
level = [watch.check(), patient.check()]  # the first check only takes the level
blocks = [bytes(1024) + bytes([i % 251]) for i in range(150_000)]  # 150 MB that stays, fragmented
kept = blocks[::200]
del blocks
before = rss_mb()
first = watch.check()
after = rss_mb()
print(patient.check(), first, watch.check(), watch.check(), before, after, watch.trims, patient.trims, any(level))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_heap_watch_trims_only_after_growing_past_its_budget() -> None:
    """A batch loop's HeapWatch trims when the resident set grew past its budget since its level
    (the 150 MB of freed blocks go back), then takes a new level and does not trim again until it
    grows once more; within its budget it does nothing."""
    out = subprocess.run([sys.executable, "-c", WATCH_FRAGMENT], capture_output=True, text=True,
                         check=True).stdout.split()
    patient, first, second, third = (word == "True" for word in out[:4])
    before, after, trims, patient_trims = float(out[4]), float(out[5]), int(out[6]), int(out[7])
    assert out[8] == "False"  # taking the level never trims
    assert not patient and patient_trims == 0
    assert first and not second and not third and trims == 1  # after a trim: a new level, no trim
    assert before - after > 100, (before, after)


def test_extract_watches_the_heap_after_every_batch(tiny_project: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    """Every batch of extract is followed by a HeapWatch check (the guard against a drifting heap
    within a shard; dict's loops call it the same way)."""
    from conceptscope_cli.extract import activations

    checks: dict[str, int] = {"extract": 0}

    def counting(stage: str) -> type:
        class Counting:
            def __init__(self, *args: object) -> None:
                pass

            def check(self) -> bool:
                checks[stage] += 1
                return False
        return Counting

    monkeypatch.setattr(activations, "HeapWatch", counting("extract"))
    result = run_main(["extract"], tiny_project, capsys, monkeypatch)
    assert result.exit_code == 0, result.output
    import h5py

    entry = next((tiny_project / ".cscope" / "cache" / "activations").glob("*/activations.h5"))
    with h5py.File(entry) as f:
        n_images = int(f.attrs["n_images"])
    from conceptscope_cli.config.sections import ExtractConfig
    from conceptscope_cli.project import Project

    cfg = Project.open(tiny_project).manifest.get(ExtractConfig)
    shards = list(entry.parent.glob("shards/shard-*.h5"))
    assert checks["extract"] == sum(-(-min(cfg.shard_size, n_images - i * cfg.shard_size) // cfg.batch_size)
                                    for i in range(len(shards))) > 1, (checks, n_images)


def test_an_image_folder_split_is_opened_once_per_process(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """`datasets` resolves every file of an image folder on each open (O(N) time and memory: ~150 s
    and +138 MB at 32,000 images) and a stage opened its split up to 5 times: an unchanged folder is
    opened once, the same handle handed out again; an added image or edited metadata opens it afresh."""
    import json

    import numpy as np
    from PIL import Image

    from conceptscope_cli.config.sections import DatasetConfig
    from conceptscope_cli.data import datasets as D

    monkeypatch.setattr(D, "_OPENED", {})
    loads: list[int] = []
    load_rows = D._load_rows
    monkeypatch.setattr(D, "_load_rows", lambda *a: loads.append(1) or load_rows(*a))
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def add(i: int) -> None:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        with open(folder / "metadata.jsonl", "a") as meta:
            meta.write(json.dumps({"file_name": f"{i}.png", "label": i % 2}) + "\n")

    for i in range(4):
        add(i)
    cfg = DatasetConfig(source="imagefolder", path="images", splits=["train"], class_names=["a", "b"])
    first = D.open_split("d", cfg, "train", tmp_path)
    assert D.open_split("d", cfg, "train", tmp_path) is first and len(loads) == 1
    add(4)
    grown = D.open_split("d", cfg, "train", tmp_path)
    assert grown is not first and len(loads) == 2 and len(grown.rows) == 5 and grown.fingerprint != first.fingerprint
    renamed = DatasetConfig(source="imagefolder", path="images", splits=["train"], class_names=["x", "y"])
    assert D.open_split("d", renamed, "train", tmp_path).class_names == ["x", "y"] and len(loads) == 3
