"""Issue 20: the cache survives moving a project (content-keyed dataset fingerprint) and is
shared correctly by two projects running at once (one CSCOPE_CACHE)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conceptscope_cli.config.sections import DatasetConfig
from conceptscope_cli.data.datasets import folder_fingerprint, open_split
from helpers import FAST_CATEGORIZE, FAST_STAGES, make_tiny_project, run_cli, write_image_folder


def test_folder_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    first = write_image_folder(tmp_path / "a", {"train": 6})
    moved = tmp_path / "elsewhere" / "b"
    shutil.copytree(first, moved)
    assert folder_fingerprint(first) == folder_fingerprint(moved)
    cfg = DatasetConfig(source="imagefolder", path=str(first), splits=["train"])
    assert open_split("d", cfg, "train", tmp_path).fingerprint == open_split(
        "d", DatasetConfig(source="imagefolder", path=str(moved), splits=["train"]), "train", tmp_path).fingerprint
    # Any change of the files changes it: a label in the metadata, an image's size, a new file.
    meta = moved / "train" / "metadata.jsonl"
    meta.write_text(meta.read_text().replace('"label": 1', '"label": 2', 1))
    assert folder_fingerprint(moved) != folder_fingerprint(first)
    shutil.copy(first / "train" / "metadata.jsonl", meta)
    assert folder_fingerprint(moved) == folder_fingerprint(first)
    (moved / "train" / "00000.png").write_bytes(b"x")
    assert folder_fingerprint(moved) != folder_fingerprint(first)


def _fingerprint_of_the_sorted_list(folder: Path) -> str:
    """The key as first defined: every relative path listed (os.walk) and sorted whole, then hashed.
    folder_fingerprint must keep giving exactly this key (cache entries are keyed by it)."""
    import hashlib

    digest, entries = hashlib.sha256(), []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        entries += [(os.fsencode((Path(root) / f).relative_to(folder).as_posix()), Path(root) / f)
                    for f in files if not f.startswith(".")]
    for relative, path in sorted(entries):
        digest.update(relative + b"\0" + str(path.stat().st_size).encode() + b"\0")
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            digest.update(path.read_bytes())
        digest.update(b"\n")
    return "files-sha256:" + digest.hexdigest()[:32]


def test_folder_fingerprint_walks_one_directory_at_a_time_in_the_same_order(tmp_path: Path) -> None:
    """The streamed walk hashes the files in the order of the full sorted list: names where a
    directory's "/" decides ("b.txt" before "b/", "b-c/" before "b/"), nesting, dot-files and
    dot-directories (skipped), a link to a file (hashed) and a link to a directory (not walked)."""
    root = tmp_path / "world"
    for relative, data in {"b/x/y.png": b"1", "b/z.jsonl": b"{}", "b.txt": b"t", "b-c/q.png": b"22",
                           "a": b"a", "a0/k.png": b"333", "train/0001.png": b"4", "train/0002.png": b"55",
                           "train/metadata.jsonl": b"{\"label\": 1}\n", ".hidden/h.png": b"h",
                           "train/.DS_Store": b"d", "\u00e9t\u00e9/x.png": b"e"}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    os.symlink(root / "b.txt", root / "link.txt")
    os.symlink(root / "train", root / "linked_dir")
    assert folder_fingerprint(root) == _fingerprint_of_the_sorted_list(root)
    (root / "b-c" / "q.png").write_bytes(b"2")
    assert folder_fingerprint(root) == _fingerprint_of_the_sorted_list(root)
    (root / "b" / "x" / "y.png").rename(root / "b" / "x" / "w.png")  # a rename changes the key
    assert folder_fingerprint(root) == _fingerprint_of_the_sorted_list(root)


@pytest.mark.slow
def test_copied_project_is_up_to_date(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A finished project copied to another folder (with its images) trains and extracts nothing."""
    project = make_tiny_project(tmp_path / "a", tiny_model_dir, FAST_STAGES + FAST_CATEGORIZE)
    first = run_cli(["run"], project, timeout=900)
    assert first.exit_code == 0, first.output
    shutil.copytree(tmp_path / "a", tmp_path / "moved" / "b", symlinks=True)
    copy = tmp_path / "moved" / "b" / "proj"
    again = run_cli(["run"], copy, timeout=900)
    assert again.exit_code == 0, again.output
    assert "every stage is up to date; nothing to do" in again.stdout
    assert "trained" not in again.stdout and "cached activations" not in again.stdout
    assert str(tmp_path / "a") not in again.stdout  # what it reports lives in the copy
    stamp = json.loads(next((copy / "outputs" / "report").rglob(".export.stamp")).read_text())
    assert all(not Path(f["path"]).is_absolute() for f in stamp["files"])


@pytest.mark.slow
def test_two_projects_share_one_cache_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Different seeds, one CSCOPE_CACHE, started together: one activation entry, one SAE each."""
    cache = tmp_path / "shared-cache"
    projects = []
    for seed in (0, 1):
        project = make_tiny_project(tmp_path / f"p{seed}", tiny_model_dir, FAST_STAGES)
        text = (project / "cscope.toml").read_text().replace("seed = 0", f"seed = {seed}")
        # Every token: a token subsample is drawn with the project's seed, full activations are not.
        text = text.replace("[extract]\n", "[extract]\ntokens_per_image = 0\n")
        (project / "cscope.toml").write_text(text + '\n[run]\nstages = ["extract", "train"]\n')
        projects.append(project)
    env = {**os.environ, "CSCOPE_CACHE": str(cache), "COLUMNS": "200", "NO_COLOR": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "conceptscope_cli", "run"], cwd=p, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in projects]
    outputs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    kinds = {kind.name: sorted(e.name for e in kind.iterdir() if e.is_dir() and (e / "record.json").is_file())
             for kind in cache.iterdir() if kind.is_dir()}
    assert len(kinds["activations"]) == 2  # train and test, extracted once for both projects
    assert len(kinds["sae"]) == 2  # one SAE per seed
    assert not list(cache.glob("*/*.partial"))
    seeds = sorted(json.loads((cache / "sae" / k / "record.json").read_text())["inputs"]["training"]["seed"]
                   for k in kinds["sae"])
    assert seeds == [0, 1]
