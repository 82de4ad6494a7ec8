"""Issue 20: a cache entry is committed only when complete, `cache rm` respects locks, and
a failed write (full disk, read-only folder, a cache that is a file) is a clear error (exit 1)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conceptscope_cli.cache.store import CacheStore
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.extract import activations as extract_module
from conceptscope_cli.extract.activations import extract_activations
from conceptscope_cli.extract.store import ShardWriter, shard_path
from conceptscope_cli.project import Project
from helpers import run_cli, run_main


def _partial_dirs(project: Project) -> list[Path]:
    return project.cache.partials()


def test_rm_partial_keeps_an_entry_a_live_process_builds(tiny_project: Path) -> None:
    """The builder holds the entry's lock; `cache rm --partial` must leave its folder alone."""
    project = Project.open(tiny_project)
    store = project.cache
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            "from conceptscope_cli.cache.store import CacheStore\n"
            f"store = CacheStore({str(store.root)!r})\n"
            "with store.lock('activations', 'k1'):\n"
            "    store.begin('activations', 'k1', {'x': 1})\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.readline()\n"
        )], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        kept = run_cli(["cache", "rm", "--partial"], tiny_project)
        assert kept.exit_code == 0, kept.output
        assert (store.root / "activations" / "k1.partial" / "inputs.json").is_file()
        assert "kept incomplete activations/k1.partial" in kept.stdout and "removed" not in kept.stdout
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    # Once the builder is gone (interrupted), the same command removes the folder.
    removed = run_cli(["cache", "rm", "--partial"], tiny_project)
    assert removed.exit_code == 0 and "removed incomplete activations/k1.partial" in removed.stdout
    assert not (store.root / "activations" / "k1.partial").exists()


def test_lock_survives_its_file_being_removed(tmp_path: Path) -> None:
    """`remove` unlinks lock files while holding them; a later locker must not lock a stale inode."""
    store = CacheStore(tmp_path)
    with store.lock("things", "k"):
        (tmp_path / "things" / "k.lock").unlink()
        with store.try_lock("things", "k") as held:
            assert held  # a fresh lock file: nobody holds it
    with store.lock("things", "k"), store.try_lock("things", "k") as held:
        assert not held


def test_shard_writer_never_recreates_a_removed_entry(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ShardWriter(shard_path(tmp_path / "gone.partial", 0), capacity=2, n_tokens=1, d_model=2, dtype="float16",
                    chunk_images=1)
    assert not (tmp_path / "gone.partial").exists()


def test_partial_removed_during_extract_commits_nothing(tiny_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The red-team trial: the partial folder vanishes at a shard boundary (e.g. an old `rm`)."""
    original = ShardWriter.close

    def close_then_vanish(self: ShardWriter, **kwargs) -> None:
        original(self, **kwargs)
        if self.path.name == "shard-000001.h5":
            shutil.rmtree(self.path.parent.parent)

    monkeypatch.setattr(ShardWriter, "close", close_then_vanish)
    project = Project.open(tiny_project)
    with pytest.raises(CscopeError, match="removed while extracting"):
        extract_activations(project, split_name="train")
    assert [e for e in project.cache.entries() if e.kind != "listing"] == []  # the split's listing is complete


def test_entry_missing_rows_is_never_committed(tiny_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rows written + rows skipped must equal the rows of the split, or nothing is committed."""
    original = ShardWriter.close

    def close_then_lose(self: ShardWriter, **kwargs) -> None:
        original(self, **kwargs)
        if self.path.name == "shard-000001.h5":
            self.path.unlink()  # a shard lost after it was written

    monkeypatch.setattr(ShardWriter, "close", close_then_lose)
    project = Project.open(tiny_project)
    with pytest.raises(CscopeError, match=r"incomplete \(missing shards \[1\]"):
        extract_activations(project, split_name="train")
    assert [e for e in project.cache.entries() if e.kind != "listing"] == []  # the split's listing is complete
    monkeypatch.setattr(ShardWriter, "close", original)
    # The next run writes the missing shard and commits all 23 rows (22 images + 1 skipped).
    entry = extract_activations(project, split_name="train").entry
    assert entry.record["stats"]["n_images"] == 22 and entry.record["stats"]["n_skipped"] == 1


def test_check_complete_counts_rows_in_each_shard() -> None:
    from conceptscope_cli.extract.store import ShardInfo

    good = [ShardInfo(0, Path("a"), 7, 0, 8, [(3, "bad")]), ShardInfo(1, Path("b"), 2, 8, 10, [])]
    extract_module.check_complete(good, 8, 10, "d/s")
    short = [ShardInfo(0, Path("a"), 6, 0, 8, [(3, "bad")]), good[1]]
    with pytest.raises(CscopeError, match="shard 0 holds 6 rows"):
        extract_module.check_complete(short, 8, 10, "d/s")
    with pytest.raises(CscopeError, match="missing shards"):
        extract_module.check_complete(good, 8, 17, "d/s")


def _no_space(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    # h5py reports a failed flush as a RuntimeError quoting errno, not as an OSError.
    raise RuntimeError("Disable slist on flush dest failure failed (file write failed: filename = "
                       "'/x/shard-000000.h5.tmp', errno = 28, error message = 'No space left on device')")


def test_full_disk_while_closing_a_shard_is_a_clear_error(tiny_project: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ShardWriter, "close", _no_space)
    result = run_main(["extract", "--split", "train"], tiny_project, capsys, monkeypatch)
    assert result.exit_code == 1, result.output
    assert "no space left on the device" in result.stderr and "internal error" not in result.output
    project = Project.open(tiny_project)
    assert [e for e in project.cache.entries() if e.kind != "listing"] == []  # the split's listing is complete
    (partial,) = _partial_dirs(project)
    assert not list((partial / "shards").glob("*.tmp"))  # the unfinished shard was dropped


def test_read_only_output_folder_is_a_clear_error(tiny_project: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.EROFS, "Read-only file system", "/cache/activations/x.lock")

    from conceptscope_cli.cache import store

    monkeypatch.setattr(store.CacheStore, "begin", read_only)
    result = run_main(["extract", "--split", "test"], tiny_project, capsys, monkeypatch)
    assert result.exit_code == 1 and "the file system is read-only writing /cache/activations/x.lock" in result.stderr


@pytest.mark.slow  # several CLI runs
def test_cache_that_is_a_file_is_a_clear_error(tiny_project: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("x")
    result = run_cli(["extract", "--split", "test"], tiny_project, env={"CSCOPE_CACHE": str(not_a_folder)})
    assert result.exit_code == 1, result.output
    assert f"the cache {not_a_folder} (from the CSCOPE_CACHE environment variable) is not a directory" in result.stderr


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow  # real full disk / read-only mounts
def test_real_full_disk_and_read_only_cache(tiny_project: Path, tmp_path: Path) -> None:
    """On a real 1 MB tmpfs (root only): full disk → exit 1; a read-only complete cache still serves."""
    mount = tmp_path / "tmpfs"
    if not _mount_tmpfs(mount, "1m"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        (mount / "fill").write_bytes(b"\0" * 1000 * 1024)
        # --force: past the disk plan's up-front refusal, to the write that really fails
        full = run_cli(["extract", "--split", "train", "--force"], tiny_project,
                       env={"CSCOPE_CACHE": str(mount / "cache")})
        assert full.exit_code == 1, full.output
        assert "no space left on the device" in full.stderr and "internal error" not in full.output
        assert not list((mount / "cache" / "activations").glob("*/record.json"))
        (mount / "fill").unlink()
        first = run_cli(["extract", "--split", "test"], tiny_project, env={"CSCOPE_CACHE": str(mount / "cache")})
        assert first.exit_code == 0, first.output
        (mount / "cache" / "file-hashes.json").unlink()  # the memo must not be needed (nor written)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        again = run_cli(["extract", "--split", "test"], tiny_project, env={"CSCOPE_CACHE": str(mount / "cache")})
        assert again.exit_code == 0 and "up to date" in again.stdout, again.output
        other = run_cli(["extract", "--split", "train"], tiny_project, env={"CSCOPE_CACHE": str(mount / "cache")})
        assert other.exit_code == 1 and "read-only" in other.stderr, other.output
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
