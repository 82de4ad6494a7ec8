"""`cscope categorize` through the CLI: outputs, determinism, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAST_STAGES as SAE_AND_DICT
from helpers import run_cli

CATEGORIZE = """
[categorize]
num_samples = 6
candidates = 5
"""


def _prepare(project: Path, shared_cache: Path, extra: str = CATEGORIZE) -> Path:
    text = (project / "cscope.toml").read_text().replace('num_workers = 0', f'num_workers = 0\ncache_dir = "{shared_cache}"')
    (project / "cscope.toml").write_text(text + SAE_AND_DICT + extra)
    return project


def _strip_meta(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "meta"}


@pytest.mark.slow  # CLI end to end, twice
def test_categorize_writes_documented_files_and_is_seeded(tiny_project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    project = _prepare(tiny_project, cache)
    result = run_cli(["categorize"], project)
    assert result.exit_code == 0, result.output
    assert "classes ranked by evidence of bias" in result.stdout and "wrote" in result.stdout
    outputs = project / "outputs" / "shapes"
    categorization = json.loads((outputs / "train_concept_categorization.json").read_text())
    scores = json.loads((outputs / "train_alignment_scores.json").read_text())
    assert set(categorization["classes"]) == {"red", "green", "blue"}
    for name, info in categorization["classes"].items():
        kinds = {e["latent"] for kind in ("target", "context", "uncertain") for e in info[kind]}
        assert {e["latent"] for e in info["bias"]} <= {e["latent"] for e in info["context"]}
        assert kinds == {int(k) for k in scores["classes"][name]["latents"]}
        assert len(kinds) <= 5 and scores["classes"][name]["n_sampled"] == 6
        for entry in info["target"] + info["context"]:
            assert {"latent", "name", "alignment_score", "normalized_alignment_score", "concept_strength"} <= set(entry)
        assert info["thresholds"]["target_threshold"] == 0.0
    # a kill while assembling (SIGKILL: no cleanup can run) leaves a temporary file; the next run removes it
    stale = outputs / f"train_alignment_scores.json.tmp{os.getpid()}"
    stale.write_text("{")
    assert run_cli(["categorize"], project).stdout.count("up to date") == 1
    assert not stale.exists() and not list(outputs.glob("*.tmp*"))

    # A second project with the same seed and data gives the same scores (the cache is shared,
    # the per-project outputs are recomputed).
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "cscope.toml").write_text((project / "cscope.toml").read_text().replace('path = "../images"', f'path = "{tmp_path / "images"}"'))
    assert run_cli(["categorize"], twin).exit_code == 0
    twin_scores = json.loads((twin / "outputs" / "shapes" / "train_alignment_scores.json").read_text())
    assert _strip_meta(twin_scores) == _strip_meta(scores)


@pytest.mark.slow  # CLI end to end
def test_degenerate_classes_do_not_crash(tiny_project: Path, tmp_path: Path) -> None:
    # More samples than images, a single candidate: defined outputs, no crash.
    project = _prepare(tiny_project, tmp_path / "cache", "[categorize]\nnum_samples = 500\ncandidates = 1\n")
    result = run_cli(["categorize", "--split", "test"], project)
    assert result.exit_code == 0, result.output
    data = json.loads((project / "outputs" / "shapes" / "test_concept_categorization.json").read_text())
    for info in data["classes"].values():
        assert info["n_images"] == 3 and info["bias"] == []
        assert len(info["target"]) + len(info["context"]) <= 1


@pytest.mark.slow  # kill test
def test_killed_categorize_resumes_to_identical_files(tiny_project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    extra = "[categorize]\nnum_samples = 8\ncandidates = 40\nbatch_size = 4\n"
    project = _prepare(tiny_project, cache, extra)
    assert run_cli(["dict"], project).exit_code == 0  # upstream stages, not part of what is killed
    classes = project / "outputs" / "shapes" / "train" / "categorize"
    proc = subprocess.Popen([sys.executable, "-m", "conceptscope_cli", "categorize"], cwd=project,
                            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(classes.glob("class_*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "categorize finished before it could be killed"
    done = sorted(p.name for p in classes.glob("class_*.json"))
    assert 1 <= len(done) < 3
    first_done = (classes / done[0]).read_bytes()
    resumed = run_cli(["categorize"], project)
    assert resumed.exit_code == 0, resumed.output
    assert (classes / done[0]).read_bytes() == first_done  # kept, not recomputed
    resumed_files = {p.name: p.read_bytes() for p in classes.glob("class_*.json")}

    for p in classes.glob("class_*.json"):
        p.unlink()
    (project / "outputs" / "shapes" / "train_concept_categorization.json").unlink()
    fresh = run_cli(["categorize"], project)
    assert fresh.exit_code == 0
    assert {p.name: p.read_bytes() for p in classes.glob("class_*.json")} == resumed_files
