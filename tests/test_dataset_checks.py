"""Issue 20: `class_names` must fit the dataset's labels (exit 1 with the reason, never silently shifted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptscope_cli.config.sections import DatasetConfig
from conceptscope_cli.data.datasets import open_split
from conceptscope_cli.errors import CscopeError


def _class_folders(root: Path, classes: list[str], n: int = 3, empty: tuple[str, ...] = ()) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    for c in empty:
        (root / "train" / c).mkdir(parents=True)
    return root


def _open(folder: Path, **keys):  # noqa: ANN003, ANN202
    cfg = DatasetConfig(source="imagefolder", path=str(folder), splits=["train"], **keys)
    return open_split("shapes", cfg, "train", folder)


def test_class_names_count_must_match_class_folders(tmp_path: Path) -> None:
    """The red-team case: an empty folder is no class, so 'empty' would get the ring images."""
    folder = _class_folders(tmp_path / "d", ["circle", "ring", "square"], empty=("empty",))
    with pytest.raises(CscopeError, match=r"class_names has 4 names but the labels have 3 classes \(circle, ring, square\)"):
        _open(folder, class_names=["circle", "empty", "ring", "square"])


def test_class_names_must_not_move_a_folder_name(tmp_path: Path) -> None:
    folder = _class_folders(tmp_path / "d", ["circle", "ring", "square"])
    with pytest.raises(CscopeError, match="puts 'ring' at position 0, but the dataset's class 'ring' is label 1"):
        _open(folder, class_names=["ring", "circle", "square"])
    # Renaming every class (same count, no folder name reused) is what class_names is for.
    handle = _open(folder, class_names=["round", "hollow", "boxy"])
    assert handle.class_names == ["round", "hollow", "boxy"]


def test_integer_labels_beyond_class_names_are_refused(tmp_path: Path) -> None:
    """Two names for five integer labels used to drop three classes' images silently."""
    root = tmp_path / "d" / "train"
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as meta:
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(root / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "label": i % 5}) + "\n")
    with pytest.raises(CscopeError, match="class_names has 2 names but the labels go up to 4"):
        _open(tmp_path / "d", class_names=["a", "b"])
    assert _open(tmp_path / "d", class_names=list("abcde")).class_names == list("abcde")


def test_file_name_that_is_not_utf8_is_skipped_and_counted(tmp_path: Path, tiny_model_dir: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to fail the whole split (exit 70 from `datasets`). `cscope extract` in-process
    (run_main): the exit code and the messages are the subject, not the process."""
    import os

    from helpers import run_main, write_manifest

    folder = _class_folders(tmp_path / "d", ["circle", "ring"])
    bad = os.fsencode(str(folder / "train" / "ring")) + b"/bad\xff.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.fsdecode(bad))
    project = write_manifest(tmp_path / "proj", f"""
        [project]
        device = "cpu"
        num_workers = 0
        [backbone]
        model = "local-dir:{tiny_model_dir}"
        [datasets.shapes]
        source = "imagefolder"
        path = "{folder}"
        """).parent
    result = run_main(["extract"], project, capsys, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "6 images" in result.stdout and "bad\\xff.png" in result.output
    from conceptscope_cli.project import Project

    (entry,) = [e for e in Project.open(project).cache.entries() if e.kind == "activations"]
    stats = entry.record["stats"]
    assert stats["n_skipped_files"] == 1 and stats["skipped_files"] == ["train/ring/bad\\xff.png"]
