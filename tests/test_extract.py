"""`cscope extract` end to end on generated images and the tiny ViT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conceptscope_cli.backbone.capture import ResidualCapture
from conceptscope_cli.data.datasets import decode_image
from conceptscope_cli.extract.activations import extract_activations
from conceptscope_cli.extract.store import ActivationReader
from conceptscope_cli.project import Project
from helpers import run_cli, write_image_folder, write_manifest


@pytest.mark.slow  # extract end to end
def test_extract_skips_corrupt_image_and_keeps_indices(tiny_project: Path) -> None:
    result = run_cli(["extract", "--split", "train"], tiny_project)
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image(s): rows 5" in result.stdout
    assert "22 images × 17 tokens × 32 dims" in result.stdout

    project = Project.open(tiny_project)
    (entry_dir,) = [e.path for e in project.cache.entries() if e.kind == "activations"]
    record = json.loads((entry_dir / "record.json").read_text())
    assert record["stats"]["n_skipped"] == 1 and record["stats"]["skipped"][0]["row_index"] == 5
    assert "UnidentifiedImageError" in record["stats"]["skipped"][0]["error"]

    reader = ActivationReader(entry_dir)
    expected_rows = [r for r in range(23) if r != 5]
    assert reader.row_index.tolist() == expected_rows
    assert reader.labels.tolist() == [r % 3 for r in expected_rows]  # labels follow their rows
    with h5py.File(entry_dir / "activations.h5") as f:
        assert f["activations"].shape == (22, 17, 32) and f["activations"].dtype == np.float16
        assert f["token_positions"][0].tolist() == list(range(17))
        # Streaming reads through the shards give the same rows as the single-file view.
        streamed = np.concatenate([chunk for chunk, _, _ in reader.iter_chunks(chunk_images=3)])
        np.testing.assert_array_equal(streamed, f["activations"][:])


def test_cached_activations_equal_direct_capture(tiny_project: Path) -> None:
    project = Project.open(tiny_project)
    result = extract_activations(project, split_name="test")
    backbone_resolved = project.resolved_backbone()
    from conceptscope_cli.backbone.loader import load_backbone

    backbone = load_backbone(backbone_resolved, torch.device("cpu"))
    images = torch.stack(
        [backbone.preprocess(decode_image(str(tiny_project.parent / "images" / "test" / f"{i:05d}.png"))) for i in range(9)]
    )
    direct = ResidualCapture(backbone.visual, 1)(images).numpy()
    with h5py.File(result.entry.path / "activations.h5") as f:
        cached = f["activations"][:].astype(np.float32)
    np.testing.assert_allclose(cached, direct, rtol=2e-3, atol=2e-3)  # float16 storage


@pytest.mark.slow  # extract end to end, twice
def test_second_run_is_a_noop(tiny_project: Path) -> None:
    project = Project.open(tiny_project)
    first = extract_activations(project, split_name="test")
    mtime = (first.entry.path / "record.json").stat().st_mtime_ns
    second = extract_activations(Project.open(tiny_project), split_name="test")
    assert not first.reused and second.reused and second.entry.path == first.entry.path
    assert (second.entry.path / "record.json").stat().st_mtime_ns == mtime
    cli = run_cli(["extract", "--split", "test"], tiny_project)
    assert cli.exit_code == 0 and "up to date" in cli.stdout


@pytest.mark.slow  # extract end to end, twice
def test_tokens_per_image_subsample_is_seeded(tiny_project: Path) -> None:
    cli = run_cli(["extract", "--split", "test", "--tokens-per-image", "5"], tiny_project)
    assert cli.exit_code == 0, cli.output
    assert "9 images × 6 tokens × 32 dims" in cli.stdout
    project = Project.open(tiny_project)
    (entry,) = [e for e in project.cache.entries() if e.kind == "activations"]
    with h5py.File(entry.path / "activations.h5") as f:
        positions = f["token_positions"][:]
    assert (positions[:, 0] == 0).all()  # CLS always kept
    assert all(len(set(p[1:])) == 5 and (p[1:] >= 1).all() and (np.diff(p[1:]) > 0).all() for p in positions)
    assert len({tuple(p) for p in positions}) > 1  # different images keep different patches
    from conceptscope_cli.extract.activations import token_positions_for

    np.testing.assert_array_equal(token_positions_for(np.arange(9), 17, "all", 5, 0), positions)


def _slow_project(tmp_path: Path, tiny_model_dir: Path, name: str) -> Path:
    project = tmp_path / name
    write_manifest(
        project,
        f"""
        [project]
        device = "cpu"
        num_workers = 0
        cache_dir = "cache"
        [backbone]
        model = "local-dir:{tiny_model_dir}"
        [datasets.many]
        source = "imagefolder"
        path = "../images"
        [extract]
        batch_size = 2
        shard_size = 10
        chunk_images = 5
        """,
    )
    return project


@pytest.mark.slow  # kill test
def test_killed_extract_resumes_to_identical_entry(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_image_folder(tmp_path / "images", {"train": 120}, corrupt={"train": [17, 95]})
    killed = _slow_project(tmp_path, tiny_model_dir, "killed")
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "conceptscope_cli", "extract"], cwd=killed, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial_shards = lambda: list((killed / "cache" / "activations").glob("*.partial/shards/shard-*.h5"))  # noqa: E731
    deadline = time.time() + 120
    while len(partial_shards()) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extract finished before it could be killed"
    done_before = len(partial_shards())
    assert 3 <= done_before < 12
    assert not [p for p in (killed / "cache" / "activations").iterdir() if p.is_dir() and not p.name.endswith(".partial")]

    resumed = run_cli(["extract"], killed)
    assert resumed.exit_code == 0, resumed.output
    reference = run_cli(["extract"], _slow_project(tmp_path, tiny_model_dir, "reference"))
    assert reference.exit_code == 0, reference.output

    (a,) = [e for e in Project.open(killed).cache.entries() if e.kind == "activations"]
    (b,) = [e for e in Project.open(tmp_path / "reference").cache.entries() if e.kind == "activations"]
    assert a.key == b.key
    with h5py.File(a.path / "activations.h5") as fa, h5py.File(b.path / "activations.h5") as fb:
        for name in ("activations", "labels", "row_index", "token_positions"):
            np.testing.assert_array_equal(fa[name][:], fb[name][:])
        assert fa["row_index"].shape == (118,)
    assert a.record["stats"]["skipped"] == b.record["stats"]["skipped"]
