"""The streaming passes over the CSR latents hold one bounded block, not the split (issue 17).

`cscope dict`'s statistics (`stats.h5`), categorize's concept statistics (`concept_space`) and its
over-representation evidence (`class_evidence`) each run under tracemalloc on the same synthetic
latents at N and 4N images. Their peak of traced (numpy) memory must not grow with N beyond what
they keep per image by design (indptr, labels, row_index: 24 bytes per image): a pass that reads
its rows in blocks that grow with the split (or a top-list buffer that does) fails. The results
must also not depend on how the rows are cut into blocks.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conceptscope_cli.dictionary.sparse import CSRWriter

M, ACTIVE, CLASSES = 256, 64, 4
SMALL, LARGE = 4_000, 16_000  # 256k and 1M stored values


def _write(path: Path, n: int, seed: int = 0) -> Path:
    """n rows of ~ACTIVE positive values among M latents (exponential), labels 0..CLASSES-1."""
    rng = np.random.default_rng(seed)
    writer = CSRWriter(path, M)
    for start in range(0, n, 1000):
        b = min(1000, n - start)
        dense = np.where(rng.random((b, M)) < ACTIVE / M, rng.exponential(0.3, (b, M)) + 1e-3, 0).astype(np.float32)
        writer.append(dense, rng.integers(0, CLASSES, b), np.arange(start, start + b))
    writer.close()
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    from conceptscope_cli.dictionary.latents import compute_statistics, write_statistics

    out = {}
    for n in (SMALL, LARGE):
        folder = tmp_path_factory.mktemp(f"latents{n}")
        _write(folder / "latents.h5", n)
        write_statistics(folder / "stats.h5", compute_statistics(folder / "latents.h5", CLASSES), n)
        out[n] = folder
    return out


def _traced_peak(fn: Callable[[], object]) -> float:
    """Peak traced memory (MB) of fn above what was allocated before it."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def _assert_flat(name: str, fn: Callable[[Path], object], latents: dict[int, Path]) -> None:
    small, large = (_traced_peak(lambda n=n: fn(latents[n])) for n in (SMALL, LARGE))
    per_image = 3 * 8 * (LARGE - SMALL) / 1e6  # indptr, labels, row_index held whole by design
    whole = 4 * ACTIVE * LARGE / 1e6  # one float32 array of every stored value of the large split
    # A block (or buffer) that grows with the split adds at least ~one such array per 4 bytes/value.
    assert large <= small + per_image + 0.25 * whole, (
        f"{name}: traced peak {small:.1f} MB at {SMALL} images, {large:.1f} MB at {LARGE} "
        f"(a whole-split float32 array is {whole:.1f} MB)")


def test_dict_statistics_pass_is_flat_in_the_number_of_images(latents: dict[int, Path]) -> None:
    from conceptscope_cli.dictionary.latents import compute_statistics

    _assert_flat("compute_statistics", lambda folder: compute_statistics(folder / "latents.h5", CLASSES), latents)


def test_concept_statistics_pass_is_flat_in_the_number_of_images(latents: dict[int, Path]) -> None:
    from conceptscope_cli.categorize.concepts import concept_space
    from conceptscope_cli.dictionary.group_file import ConceptGroups
    from conceptscope_cli.dictionary.groups import ConceptGroup

    groups = ConceptGroups({"grouping": {"enabled": True}},
                           [ConceptGroup(g, (2 * g, 2 * g + 1), (0.5, 0.5), 1.0, 1.0, None) for g in range(M // 2)])
    _assert_flat("concept_space", lambda folder: concept_space(folder / "latents.h5", groups, CLASSES), latents)


def test_evidence_passes_are_flat_in_the_number_of_images(latents: dict[int, Path], monkeypatch) -> None:  # noqa: ANN001
    from conceptscope_cli.categorize import stage
    from conceptscope_cli.config.sections import CategorizeConfig

    # The two passes over the rows only: the tests and CIs after them are O(pairs x levels).
    seen = []
    monkeypatch.setattr(stage, "_evidence_fields", lambda pairs, hist, *a: seen.append(hist) or ({}, "none"))
    # Every latent a candidate of every class, with the typical-class second pass.
    per_class = [{"class": y, "similarities": {"candidates": list(range(M))}} for y in range(CLASSES)]
    cfg = CategorizeConfig()
    assert cfg.base_rate == "typical" and cfg.bias_rule == "evidence"  # both passes run
    _assert_flat("class_evidence", lambda folder: stage.class_evidence(per_class, folder, CLASSES, cfg, 0), latents)
    assert [h.n_images for h in seen] == [SMALL, LARGE]


def test_statistics_do_not_depend_on_the_block_size(tmp_path: Path) -> None:
    """Sums accumulate in stream order, so blocks of 7 rows give the bytes one block gives (values
    over many decades, so that adding per-block partial sums would round differently)."""
    from conceptscope_cli.dictionary.latents import compute_statistics

    rng = np.random.default_rng(5)
    n, m = 3000, 16
    dense = np.where(rng.random((n, m)) < 0.5, rng.lognormal(0.0, 4.0, (n, m)), 0).astype(np.float32)
    writer = CSRWriter(tmp_path / "latents.h5", m)
    writer.append(dense, rng.integers(0, CLASSES, n), np.arange(n))
    writer.close()
    one = compute_statistics(tmp_path / "latents.h5", CLASSES, block=n)
    many = compute_statistics(tmp_path / "latents.h5", CLASSES, block=7)
    for name in one:
        assert np.array_equal(one[name], many[name]), name
