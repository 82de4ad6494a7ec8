"""Stability across SAE seeds (`[categorize] replicates`): replicate SAEs are ordinary cache entries,
each bias claim's fraction is the hand count of replicates whose same-class bias list holds a
concept correlated (within classes) with it, and an unchanged re-run is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conceptscope_cli.categorize import replicates as R
from conceptscope_cli.dictionary.sparse import CSRWriter, LatentMatrix
from helpers import FAST_STAGES, make_tiny_project, run_cli


def _within_corr(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> float:
    """Pooled within-class correlation of two columns, densely (the test's own computation)."""
    a, b = a.astype(np.float64).copy(), b.astype(np.float64).copy()
    for y in np.unique(labels):
        a[labels == y] -= a[labels == y].mean()
        b[labels == y] -= b[labels == y].mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def test_cross_correlation_and_matching_by_hand(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    base = rng.random(100)
    left = np.stack([base, rng.random(100), np.zeros(100)], 1).astype(np.float32)
    right = np.stack([0.6 * base, 0.4 * base + 0.05 * rng.random(100), rng.random(100)], 1).astype(np.float32)
    paths = []
    for name, dense in (("l.h5", left), ("r.h5", right)):
        writer = CSRWriter(tmp_path / name, 3)
        writer.append(dense, labels, np.arange(100))
        writer.close()
        paths.append(tmp_path / name)
    with LatentMatrix(paths[0]) as lm, LatentMatrix(paths[1]) as rm:
        corr = R.cross_correlation(lm, [(0,), (1,)], rm, [(0, 1), (2,)])  # right concept 0 = sum of two latents
    assert corr[0, 0] == pytest.approx(_within_corr(left[:, 0], right[:, 0] + right[:, 1], labels))
    assert corr[0, 0] > 0.99 and corr[1, 1] == pytest.approx(_within_corr(left[:, 1], right[:, 2], labels))
    claims = [(0, (0,)), (1, (0,)), (0, (1,))]
    replicate = [(0, (0, 1)), (0, (2,))]  # nothing in class 1
    full = corr[np.ix_([0, 0, 1], [0, 1])]
    matches = R.match_claims(claims, replicate, full, 0.5)
    assert [m.made for m in matches] == [True, False, False]
    assert matches[0].concept == (0, 1) and matches[1].correlation is None
    assert matches[2].correlation == pytest.approx(max(full[2]))


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    # The reference bias rule with sigma 0 and few targets makes claims in every class.
    extra = FAST_STAGES + ("\n[categorize]\nnum_samples = 6\ncandidates = 8\ntarget_threshold = 1.0\n"
                           'bias_threshold_sigma = 0.0\nbias_rule = "reference"\nreplicates = 2\n')
    project = make_tiny_project(tmp_path_factory.mktemp("replicates"), tiny_model_dir, extra)
    first = run_cli(["categorize"], project, timeout=900)
    assert first.exit_code == 0, first.output
    return project


@pytest.mark.slow  # several seconds of `cscope` subprocesses: kept out of the fast loop (make test-fast)
def test_replicate_fractions_equal_a_hand_count(replicated: Path) -> None:
    from conceptscope_cli.project import Project

    project = Project.open(replicated)
    out = replicated / "outputs" / "shapes"
    main = json.loads((out / "train_concept_categorization.json").read_text())
    assert main["meta"]["replicates"]["sae_seeds"] == [1, 2]  # [project] seed 0 + 1, + 2
    threshold = main["meta"]["replicates"]["match_threshold"]
    reps = {seed: json.loads((replicated / "outputs" / "replicates" / f"sae-seed-{seed}" / "shapes"
                              / "train_concept_categorization.json").read_text()) for seed in (1, 2)}
    sae_entries = {e.key for e in project.cache.entries() if e.kind == "sae"}
    assert len(sae_entries) == 3  # the main SAE and two replicates, each an ordinary cache entry
    assert len({reps[1]["meta"]["sae_entry"], reps[2]["meta"]["sae_entry"], main["meta"]["sae_entry"]}) == 3

    def column(meta: dict, concept: dict) -> tuple[np.ndarray, np.ndarray]:
        """A concept's activation: the sum of its member latents' columns."""
        entry = project.cache.lookup("latents", meta["latents_entry"])
        with LatentMatrix(entry.path / "latents.h5") as matrix:
            return np.sum([matrix.column(k) for k in concept["members"]], axis=0), matrix.labels

    n_claims = 0
    for name, info in main["classes"].items():
        for entry in info["bias"]:
            n_claims += 1
            a, labels = column(main["meta"], entry)
            made = 0
            for rep in reps.values():
                best = max((_within_corr(a, column(rep["meta"], e)[0], labels)
                            for e in rep["classes"][name]["bias"]), default=None)
                made += best is not None and best >= threshold
            print(name, entry["latent"], "made by", made, [m["correlation"] for m in entry["replicates"]["matches"]])
            assert entry["replicates"]["made_by"] == made, (name, entry["latent"])
            assert entry["replicate_fraction"] == made / 2 and 0.0 <= entry["replicate_fraction"] <= 1.0
    assert n_claims > 0  # the reference bias rule always makes claims


@pytest.mark.slow  # several seconds of `cscope` subprocesses: kept out of the fast loop (make test-fast)
def test_replicates_rerun_is_a_noop_and_zero_removes_the_fields(replicated: Path) -> None:
    path = replicated / "outputs" / "shapes" / "train_concept_categorization.json"
    before = path.read_text()
    again = run_cli(["categorize"], replicated)
    assert again.exit_code == 0, again.output
    assert "up to date" in again.stdout and path.read_text() == before
    off = run_cli(["categorize", "--replicates", "0"], replicated)
    assert off.exit_code == 0, off.output
    data = json.loads(path.read_text())
    assert "replicates" not in data["meta"]
    assert all("replicates" not in e for c in data["classes"].values() for e in c["bias"])


def test_replicates_flag_is_validated(tiny_project: Path) -> None:
    # The override is range-checked before any stage runs: an uncategorized project is enough
    # (the `replicated` fixture cost this fast-loop test ~15 s of categorize).
    bad = run_cli(["categorize", "--replicates", "-1"], tiny_project)
    assert bad.exit_code == 2 and "--replicates" in bad.stderr and "must be >= 0" in bad.stderr
