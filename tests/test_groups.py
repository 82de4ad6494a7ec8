"""Concept groups (conceptscope_cli/dictionary/groups.py): the math against hand computations,
complete linkage against a brute-force reference, and the dict stage's `concept_groups.json`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conceptscope_cli.dictionary import groups as G
from conceptscope_cli.dictionary.group_file import ConceptGroups, read_concept_groups
from conceptscope_cli.dictionary.latents import LatentStatistics
from conceptscope_cli.dictionary.sparse import CSRWriter, LatentMatrix
from conceptscope_cli.errors import MissingArtifactError
from helpers import run_cli

# 6 images (labels 0,0,0,1,1,1) x 5 latents. Latent 1 = 2 x latent 0 (a duplicate on another
# scale); latent 2 is 0 in class 0 and 3 in class 1 (it follows the class only); latent 4 never fires.
HAND = np.array([
    [1, 2, 0, 0, 0],
    [2, 4, 0, 1, 0],
    [0, 0, 0, 3, 0],
    [1, 2, 3, 0, 0],
    [3, 6, 3, 1, 0],
    [2, 4, 3, 0, 0],
], dtype=np.float32)
HAND_LABELS = np.array([0, 0, 0, 1, 1, 1])


def _write(path: Path, dense: np.ndarray, labels: np.ndarray, block: int = 2) -> LatentMatrix:
    writer = CSRWriter(path, dense.shape[1])
    for start in range(0, len(dense), block):
        stop = min(start + block, len(dense))
        writer.append(dense[start:stop], labels[start:stop], np.arange(start, stop))
    writer.close()
    return LatentMatrix(path)


def test_gram_and_within_class_correlation_by_hand(tmp_path: Path) -> None:
    with _write(tmp_path / "l.h5", HAND, HAND_LABELS) as matrix:
        stats = G.gram_statistics(matrix, np.array([0, 1, 2, 3]), nnz_per_block=3)  # several blocks
    # Gram by hand: Σ a0 a1 = 2+8+0+2+18+8 = 38, Σ a0² = 1+4+0+1+9+4 = 19, Σ a2 a3 = 3·1 = 3.
    assert stats.gram[0, 1] == pytest.approx(38) and stats.gram[0, 0] == pytest.approx(19)
    assert stats.gram[2, 3] == pytest.approx(3) and stats.gram[3, 2] == pytest.approx(3)
    np.testing.assert_allclose(stats.sums[:2, 0], [3, 6])  # class sums of latent 0
    np.testing.assert_array_equal(stats.counts, [3, 3, 0])  # two classes, no unlabelled image
    corr, dof = G.within_class_correlation(stats)
    assert dof == 6 - 2
    assert corr[0, 1] == pytest.approx(1.0)  # a duplicate is perfectly correlated, whatever its scale
    # Latent 2 is constant within each class: no within-class variation, correlation 0 (the plain
    # correlation over the split with latent 0 is 0.53: it only follows the class).
    assert corr[0, 2] == 0.0 and np.corrcoef(HAND[:, 0], HAND[:, 2])[0, 1] > 0.5
    # (0, 3) by hand: class 0 deviations (0,1,-1)·(-4/3,-1/3,5/3) = -2; class 1 (-1,1,0)·(-1/3,2/3,-1/3)
    # = 1; S_00 = 2 + 2, S_33 = 42/9 + 6/9 -> r = -1 / sqrt(4 · 16/3) = -sqrt(3)/8.
    assert corr[0, 3] == pytest.approx(-math.sqrt(3) / 8)


def test_unlabelled_images_form_their_own_group(tmp_path: Path) -> None:
    labels = np.array([0, 0, 0, -1, -1, -1])
    with _write(tmp_path / "l.h5", HAND, labels) as matrix:
        stats = G.gram_statistics(matrix, np.array([0, 3]))
    np.testing.assert_array_equal(stats.counts, [3, 3])  # class 0, then the unlabelled slot
    corr, _ = G.within_class_correlation(stats)
    assert corr[0, 1] == pytest.approx(-math.sqrt(3) / 8)


def test_fisher_lower_bound() -> None:
    # tanh(atanh(0.5) - 2.326 / sqrt(100)) = 0.30653 (computed by hand with a calculator)
    assert G.fisher_lower_bound(np.array([[0.5]]), 102)[0, 0] == pytest.approx(0.30653, abs=1e-5)
    assert G.fisher_lower_bound(np.array([[0.9]]), 3)[0, 0] == -1.0  # too few images: never links


def _brute_complete_linkage(s: np.ndarray, threshold: float) -> list[list[int]]:
    """Reference: recompute every cluster pair's minimum similarity at each step."""
    clusters = [[i] for i in range(len(s))]
    while True:
        best, pair = -np.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                value = s[np.ix_(clusters[a], clusters[b])].min()
                if value > best:
                    best, pair = value, (a, b)
        if pair is None or best < threshold:
            return sorted((sorted(c) for c in clusters), key=lambda c: c[0])
        a, b = pair
        clusters[a] = clusters[a] + clusters.pop(b)


def test_complete_linkage_does_not_chain_and_matches_brute_force() -> None:
    chain = np.array([[1, 0.9, 0.1], [0.9, 1, 0.8], [0.1, 0.8, 1]])
    assert G.complete_linkage(chain, 0.5) == [[0, 1], [2]]  # single linkage would give one cluster
    rng = np.random.default_rng(0)
    for trial in range(30):
        k = int(rng.integers(2, 25))
        x = rng.standard_normal((k, 4))
        s = np.corrcoef(x)  # a realistic symmetric similarity with structure
        s += rng.uniform(0, 1e-9, s.shape)
        s = (s + s.T) / 2
        for threshold in (0.2, 0.5, 0.8):
            assert G.complete_linkage(s, threshold) == _brute_complete_linkage(s, threshold), (trial, threshold)


def test_group_block_and_columns_sum_members(tmp_path: Path) -> None:
    indptr = np.array([0, 3, 4, 4])
    indices = np.array([0, 1, 3, 2])
    values = np.array([1.0, 2.0, 0.5, 7.0])
    assignment = np.array([0, 0, -1, 1])  # latents 0, 1 -> group 0; latent 3 -> group 1; 2 in none
    gi, gj, gv = G.group_block(indptr, indices, values, assignment)
    np.testing.assert_array_equal(gi, [0, 2, 2, 2])  # row 1 held only latent 2 (no group)
    np.testing.assert_array_equal(gj, [0, 1])
    np.testing.assert_allclose(gv, [3.0, 0.5])
    with _write(tmp_path / "l.h5", HAND, HAND_LABELS) as matrix:
        cols = G.group_columns(matrix, [(0, 1), (3,), (0, 3)])  # (0, 3) overlaps the others
        np.testing.assert_allclose(cols, np.stack([HAND[:, 0] + HAND[:, 1], HAND[:, 3], HAND[:, 0] + HAND[:, 3]], 1))
        groups = ConceptGroups({}, [G.ConceptGroup(0, (1, 0), (2 / 3, 1 / 3), 1.0, 1.0),
                                    G.ConceptGroup(1, (3,), (1.0,), 1.0, 1.0)])
        stats = groups.statistics(matrix, n_classes=2)
    dense = np.stack([HAND[:, 0] + HAND[:, 1], HAND[:, 3]], 1)
    reference = LatentStatistics(2, 2)
    reference.update_sparse(np.arange(6), *_csr(dense), HAND_LABELS)
    expected = reference.finalize(HAND_LABELS)
    for key in ("class_mean", "class_std", "frequency", "top_positions"):
        np.testing.assert_allclose(stats[key], expected[key], err_msg=key)
    np.testing.assert_allclose(stats["class_mean"][:, 0], [(3 + 6 + 0) / 3, (3 + 9 + 6) / 3])


def _csr(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(dense > 0)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(dense)))])
    return indptr, cols, dense[rows, cols]


def _planted_world(n_per_class: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3 classes. Latents 0-2: one concept split in three (each fires on 'water' images with its own
    noise); 3: a bias of class 0 (90% of class 0, 10% elsewhere) independent of 'water'; 4: class 0's
    target (every class-0 image); 5: noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    n = len(labels)
    water = rng.random(n) < 0.5
    star = np.where(labels == 0, rng.random(n) < 0.9, rng.random(n) < 0.1)
    dense = np.zeros((n, 6), dtype=np.float32)
    for k in range(3):
        dense[:, k] = water * rng.uniform(0.5, 1.0, n)
    dense[:, 3] = star * rng.uniform(0.5, 1.0, n)
    dense[:, 4] = (labels == 0) * rng.uniform(0.5, 1.0, n)
    dense[:, 5] = rng.random(n) < 0.3
    return dense, labels


def test_split_concept_collapses_and_a_bias_stays_apart_from_its_class(tmp_path: Path) -> None:
    dense, labels = _planted_world()
    with _write(tmp_path / "l.h5", dense, labels, block=64) as matrix:
        edges, sums = G.correlation_edges(matrix, np.arange(6), G.DEFAULT_THRESHOLD)
    groups = G.build_groups(edges, sums, G.DEFAULT_THRESHOLD)
    members = sorted(sorted(g.members) for g in groups)
    assert members == [[0, 1, 2], [3], [4], [5]]
    # Over the split, the bias and the class's target are correlated (0.8): grouping on the plain
    # correlation would merge the bias into the target; within classes they are not.
    assert np.corrcoef(dense[:, 3], dense[:, 4])[0, 1] > 0.7
    water = next(g for g in groups if len(g.members) == 3)
    assert water.representative == water.members[0] and sum(water.shares) == pytest.approx(1.0)
    assert water.shares == tuple(sorted(water.shares, reverse=True)) and water.min_correlation > 0.3
    ungrouped = G.build_groups(edges, sums, G.DEFAULT_THRESHOLD, enabled=False)
    assert [g.members for g in ungrouped] == [(k,) for k in range(6)]


def test_tiled_edges_match_the_dense_correlation(tmp_path: Path) -> None:
    """Row tiles of the Gram (a budget of 3 rows here: 2 passes) give exactly the pairs and
    correlations of the one-matrix computation, and the sparse linkage the dense one."""
    dense, labels = _planted_world(80)
    latents = np.array([0, 1, 2, 3, 4, 5])
    with _write(tmp_path / "l.h5", dense, labels, block=16) as matrix:
        corr, dof = G.within_class_correlation(G.gram_statistics(matrix, latents))
        bound = G.fisher_lower_bound(corr, dof)
        for budget in (3 * 8 * 6, 1 << 20):
            edges, sums = G.correlation_edges(matrix, latents, 0.2, memory_bytes=budget, nnz_per_block=40)
            expected = [(a, b) for a in range(6) for b in range(a + 1, 6) if bound[a, b] >= 0.2]
            assert list(zip(edges.i.tolist(), edges.j.tolist())) == expected and expected
            np.testing.assert_allclose(edges.corr, [corr[a, b] for a, b in expected])
            assert sums.dof == dof
            assert G.sparse_complete_linkage(6, edges, 0.2) == G.complete_linkage(bound, 0.2)


def test_read_concept_groups_missing_is_exit_3(tmp_path: Path) -> None:
    with pytest.raises(MissingArtifactError, match="no concept groups") as caught:
        read_concept_groups(tmp_path)
    assert caught.value.exit_code == 3 and "cscope dict" in (caught.value.hint or "")


@pytest.mark.slow  # CLI end to end
@pytest.mark.parametrize("grouped", [True, False])
def test_dict_writes_concept_groups(tiny_project: Path, grouped: bool) -> None:
    from helpers import FAST_STAGES

    extra = FAST_STAGES + ("" if grouped else "group_latents = false\n")
    with open(tiny_project / "cscope.toml", "a") as manifest:
        manifest.write(extra)
    built = run_cli(["dict", "--split", "train"], tiny_project)
    assert built.exit_code == 0, built.output
    out = tiny_project / "outputs" / "shapes" / "train"
    concept = json.loads((out / "concept_dict.json").read_text())
    groups = read_concept_groups(out)
    members = [m for g in groups.groups for m in g.members]
    assert sorted(members) == sorted(int(k) for k in concept["latents"])  # each valid latent exactly once
    for g in groups.groups:
        assert g.name == concept["latents"][str(g.representative)]["name"]
    assert groups.meta["grouping"]["enabled"] is grouped
    if not grouped:
        assert all(len(g.members) == 1 for g in groups.groups)
    again = run_cli(["dict", "--split", "train"], tiny_project)
    assert again.exit_code == 0 and "up to date" in again.stdout


@pytest.mark.slow  # CLI end to end
def test_group_threshold_is_validated(tiny_project: Path) -> None:
    with open(tiny_project / "cscope.toml", "a") as manifest:
        manifest.write("\n[dict]\ngroup_threshold = 1.5\n")
    line = (tiny_project / "cscope.toml").read_text().splitlines().index("group_threshold = 1.5") + 1
    result = run_cli(["dict"], tiny_project)
    assert result.exit_code == 2, result.output
    assert f"cscope.toml:{line}: `group_threshold` in section [dict]: must be in (0, 1)" in result.stderr


def test_categorize_scores_concept_groups(categorized_tiny_project: Path) -> None:
    """Candidates are groups (no two candidates of a class share a group), each entry carries its
    group's members, and its strength and evidence are those of the SUM of the members' activations
    (hand-computed from the latent columns)."""
    from conceptscope_cli.project import Project

    out = categorized_tiny_project / "outputs" / "shapes"
    groups = read_concept_groups(out / "train")
    by_rep = {g.representative: g for g in groups.groups}
    categorization = json.loads((out / "train_concept_categorization.json").read_text())
    scores = json.loads((out / "train_alignment_scores.json").read_text())
    project = Project.open(categorized_tiny_project)
    entry = project.cache.lookup("latents", categorization["meta"]["latents_entry"])
    checked_multi = 0
    with LatentMatrix(entry.path / "latents.h5") as matrix:
        for info in scores["classes"].values():
            latents = [int(k) for k in info["latents"]]
            assert all(k in by_rep for k in latents)  # every candidate is a group's representative
            members = [set(info["latents"][str(k)]["members"]) for k in latents]
            assert sum(len(m) for m in members) == len(set().union(*members)) if members else True
            y = info["class"]
            for k in latents:
                assert info["latents"][str(k)]["members"] == list(by_rep[k].members)
                column = np.sum([matrix.column(x) for x in by_rep[k].members], axis=0)
                in_class = matrix.labels == y
                assert info["latents"][str(k)]["concept_strength"] == pytest.approx(column[in_class].mean(), rel=1e-5)
                assert info["latents"][str(k)]["present_class"] == pytest.approx((column[in_class] > 0).mean())
                checked_multi += len(by_rep[k].members) > 1
    assert checked_multi > 0  # the tiny project has multi-latent groups among its candidates
    for info in categorization["classes"].values():
        for e in info["target"] + info["context"]:
            assert e["members"][0] == e["latent"]


def test_correlation_edges_watch_the_heap_after_every_block(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The Gram pass checks its HeapWatch after every block's product (a trim when the products'
    freed buffers pile up in the C heap, README "Scaling out"); the edges are the same."""
    checks: list[int] = []

    class Counting:
        def __init__(self, *args: object) -> None:
            pass

        def check(self) -> bool:
            checks.append(1)
            return False

    dense, labels = _planted_world(300)  # blocks of at least 64 rows: several blocks
    latents = np.arange(6)
    with _write(tmp_path / "l.h5", dense, labels, block=16) as matrix:
        reference, _ = G.correlation_edges(matrix, latents, 0.2, nnz_per_block=40)
        monkeypatch.setattr(G, "HeapWatch", Counting)
        edges, _ = G.correlation_edges(matrix, latents, 0.2, nnz_per_block=40)
        blocks = sum(1 for _, _, _, indices, _ in G.iter_csr_blocks(matrix, 40) if len(indices))
    assert len(checks) == blocks > 1
    np.testing.assert_array_equal(edges.i, reference.i)
    np.testing.assert_array_equal(edges.corr, reference.corr)


class _CopyingSource:
    """A CSRSource over arrays that copies each block as `LatentMatrix.csr_block` does (HDF5 reads
    are fresh arrays), recording the stored values of every block asked for."""

    def __init__(self, n_images: int, n_latents: int, per_row: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n_images, self.n_latents = n_images, n_latents
        self.labels = np.arange(n_images, dtype=np.int64) % 3
        self.labels[::7] = -1  # some unlabelled images: their own slot
        self.indptr = np.arange(n_images + 1, dtype=np.int64) * per_row
        self.indices = np.sort(np.argsort(rng.random((n_images, n_latents)), axis=1)[:, :per_row], axis=1) \
            .astype(np.uint16).ravel()
        self.values = rng.random(n_images * per_row).astype(np.float32) + 0.01
        self.block_nnz: list[int] = []

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def csr_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        self.block_nnz.append(hi - lo)
        return self.indptr[start:stop + 1] - lo, self.indices[lo:hi].astype(np.int32), self.values[lo:hi].copy()


def _gram_pass_peak(n_images: int) -> tuple[int, list[int]]:
    """Peak bytes of numpy's allocations (tracemalloc) in the dict stage's Gram pass, and its blocks."""
    import tracemalloc

    source = _CopyingSource(n_images, 64, 24)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        G.correlation_edges(source, np.arange(64), 0.2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, source.block_nnz


def test_gram_pass_working_memory_does_not_depend_on_the_number_of_images() -> None:
    """The concept-group pass (correlation_edges, dict's stage peak before it was fixed) reads
    blocks of at most `sparse.STREAM_BLOCK_NNZ` stored values and allocates nothing of length N
    or nnz: its peak of numpy allocations is the same for 4x the images (measured: within a few
    KB). Blocks of 2^20 values held the whole split below ~9,000 images (here: the peak grew 4x),
    and a label-slot array of N entries (8 bytes per image) fails the 16 KiB margin as well."""
    from conceptscope_cli.dictionary.sparse import STREAM_BLOCK_NNZ

    small, small_blocks = _gram_pass_peak(12_000)
    large, large_blocks = _gram_pass_peak(48_000)
    assert max(small_blocks) <= STREAM_BLOCK_NNZ and max(large_blocks) <= STREAM_BLOCK_NNZ
    assert max(small_blocks) > STREAM_BLOCK_NNZ // 2  # full blocks at both sizes: a fair comparison
    assert large - small < 16 * 1024, (small, large)
