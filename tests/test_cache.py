"""The shared cache: atomic entries, locking between processes, `cscope cache ls/rm`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from conceptscope_cli.cache.store import CacheStore, content_key, resolve_cache_root
from conceptscope_cli.project import Project
from helpers import run_cli


def test_key_is_order_independent_and_input_sensitive() -> None:
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_entry_invisible_until_committed(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    with store.lock("things", "k1"):
        pending = store.begin("things", "k1", {"x": 1})
        (pending.path / "data.bin").write_bytes(b"12345")
        assert store.lookup("things", "k1") is None and store.entries() == []
        entry = store.commit(pending, summary={"what": "test"}, stats={"n": 1})
    assert store.lookup("things", "k1") == entry
    record = entry.record
    assert record["inputs"] == {"x": 1} and record["summary"] == {"what": "test"}
    assert record["size_bytes"] >= 5 and "torch" in record["versions"]
    assert not (tmp_path / "things" / "k1.partial").exists()


def test_cache_root_precedence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CSCOPE_CACHE", raising=False)
    assert resolve_cache_root(tmp_path, None) == tmp_path / ".cscope" / "cache"
    assert resolve_cache_root(tmp_path, "c") == tmp_path / "c"
    monkeypatch.setenv("CSCOPE_CACHE", str(tmp_path / "shared"))
    assert resolve_cache_root(tmp_path, "c") == tmp_path / "shared"


@pytest.mark.slow  # several processes
def test_concurrent_writers_end_with_one_valid_entry(tiny_project: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    command = [sys.executable, "-m", "conceptscope_cli", "extract", "--split", "train"]
    procs = [subprocess.Popen(command, cwd=tiny_project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    stdouts = "".join(out for out, _ in outputs)
    assert stdouts.count("cached activations") == 1 and stdouts.count("up to date") == 1
    entries = [e for e in Project.open(tiny_project).cache.entries() if e.kind == "activations"]
    assert len(entries) == 1
    assert not list(entries[0].path.parent.glob("*.partial"))
    with h5py.File(entries[0].path / "activations.h5") as f:
        assert f["activations"].shape == (22, 17, 32)


@pytest.mark.slow  # CLI end to end
def test_cache_ls_and_rm(tiny_project: Path) -> None:
    assert run_cli(["extract", "--split", "test"], tiny_project).exit_code == 0
    listing = run_cli(["cache", "ls"], tiny_project)
    # the activations and the split's image-folder listing
    assert listing.exit_code == 0 and "activations" in listing.stdout and "2 entries" in listing.stdout
    assert "listing" in listing.stdout
    (entry,) = [e for e in Project.open(tiny_project).cache.entries() if e.kind == "activations"]
    missing = run_cli(["cache", "rm", "zzzz"], tiny_project)
    assert missing.exit_code == 1 and "no cache entry matches 'zzzz'" in missing.stderr
    removed = run_cli(["cache", "rm", entry.key[:6]], tiny_project)
    assert removed.exit_code == 0 and f"removed activations/{entry.key}" in removed.stdout
    assert [e.kind for e in Project.open(tiny_project).cache.entries()] == ["listing"] and not entry.path.exists()


def test_init_writes_template_and_refuses_overwrite(tmp_path: Path) -> None:
    first = run_cli(["init", "proj"], tmp_path)
    assert first.exit_code == 0 and (tmp_path / "proj" / "cscope.toml").is_file()
    assert 'name = "proj"' in (tmp_path / "proj" / "cscope.toml").read_text()
    again = run_cli(["init", "proj"], tmp_path)
    assert again.exit_code == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert run_cli(["init", "proj", "--force"], tmp_path).exit_code == 0
    assert run_cli(["--help"], tmp_path).exit_code == 0
