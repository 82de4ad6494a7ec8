"""The pure parts of the categorize and dict stages (issue 19 item 6), called on hand-made inputs:
no files, no model. Each test fails when the math it guards is broken (sufficiency and necessity
swapped, candidates written under their column instead of their latent, the noisy rule dropped)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from conceptscope_cli.artifacts import ConceptEntry
from conceptscope_cli.categorize.concepts import ConceptSpace
from conceptscope_cli.categorize.stage import (
    ClassSimilarities,
    ClassStrengths,
    class_candidates,
    class_similarities,
    score_class,
)
from conceptscope_cli.config.sections import CategorizeConfig, DictConfig
from conceptscope_cli.dictionary.stage import concept_entries, describe_latents


def _quadrant_embed(pixels: torch.Tensor) -> torch.Tensor:
    """A fake CLIP: (brightness of the top-left quadrant, of the bottom-right one, a constant), normalised."""
    h, w = pixels.shape[2] // 2, pixels.shape[3] // 2
    features = torch.stack([pixels[:, :, :h, :w].mean((1, 2, 3)), pixels[:, :, h:, w:].mean((1, 2, 3)),
                            torch.full((len(pixels),), 0.5)], dim=1)
    return torch.nn.functional.normalize(features, dim=-1)


def test_class_similarities_keep_and_remove_each_candidates_patches() -> None:
    """The class is 'a bright top-left'. Candidate 0's patch map covers the top-left: keeping it
    keeps the similarity (sufficiency high), removing it loses it (necessity low); candidate 1
    covers the bottom-right, so the opposite holds."""
    pixels = torch.zeros(2, 3, 8, 8)
    pixels[:, :, :4, :4] = 1.0
    maps = torch.zeros(2, 2, 2, 2)  # (S, c, gh, gw)
    maps[:, 0, 0, 0] = 1.0
    maps[:, 1, 1, 1] = 1.0
    text = torch.tensor([[1.0, 0.0, 0.0]])  # the class prompt: "bright top-left"
    sims = class_similarities(pixels, maps, text, _quadrant_embed, 0.5, 0.001)
    assert sims.original.shape == (2,) and sims.sufficiency.shape == sims.necessity.shape == (2, 2)
    np.testing.assert_allclose(sims.original, 1 / np.sqrt(1 + 0.5 ** 2), rtol=1e-6)
    kept, lost = sims.sufficiency / sims.original, sims.necessity / sims.original
    assert (kept[0] > 0.9).all() and (kept[1] < 0.2).all()
    assert (lost[0] < 0.01).all() and (lost[1] > 0.9).all()


def _space() -> ConceptSpace:
    # Three concepts over latents 10..13; concept 1 is a group of two latents named by 11.
    return ConceptSpace(members=[(10,), (11, 12), (13,)], representative=np.array([10, 11, 13]), stats={},
                        grouped=True, assignment=np.array([-1] * 10 + [0, 1, 1, 2]))


def _strengths() -> ClassStrengths:
    class_mean = np.array([[0.5, 0.9, 0.1], [0.2, 0.2, 0.2]])  # (C=2, G=3)
    stats = {"class_mean": class_mean, "mean": class_mean.mean(0), "class_std": np.full((2, 3), 0.1),
             "class_count": np.array([5, 7]), "class_frequency": np.full((2, 3), 0.5),
             "frequency": np.array([[0.3], [0.4], [0.5]])}
    return ClassStrengths.of(stats)


def test_score_class_splits_target_context_and_bias() -> None:
    """Concept 0's region carries the class (kept: similarity stays, removed: it drops): target.
    Concepts 1 and 2 carry nothing of it: context; concept 1 is much stronger in the class than
    concept 2: bias. Entries are keyed by the representative latent, with the group's members."""
    cfg = dataclasses.replace(CategorizeConfig(), alignment="robust", strength="mean", target_threshold=0.0,
                              bias_threshold_sigma=1.0, bootstrap=50, candidates=3)
    columns = class_candidates(_strengths(), 0, cfg)
    assert columns.tolist() == [1, 0, 2]  # by class-0 strength, strongest first
    original = np.full(4, 0.3)
    by_column = {0: (0.3, 0.05), 1: (0.05, 0.3), 2: (0.06, 0.29)}  # (sufficiency, necessity) similarities
    sims = ClassSimilarities(original, np.array([[by_column[c][0]] * 4 for c in columns]),
                             np.array([[by_column[c][1]] * 4 for c in columns]))
    result = score_class(0, columns, np.arange(4), sims, _strengths(), _space(), cfg, seed=0)
    cats = result["categories"]
    assert cats["target"] == [10]
    assert sorted(cats["context"]) == [11, 13] and cats["bias"] == [11]
    assert result["similarities"]["candidates"] == [11, 10, 13]
    latent = result["latents"]["11"]
    assert latent["members"] == [11, 12] and latent["concept_strength"] == 0.9
    np.testing.assert_allclose(result["latents"]["10"]["sufficiency"], 1.0)  # 0.3 / 0.3
    np.testing.assert_allclose(result["latents"]["10"]["necessity"], 1 - 0.05 / 0.3)
    assert result["latents"]["10"]["alignment"] > result["latents"]["13"]["alignment"] > result["latents"]["11"]["alignment"]


def test_describe_latents_applies_the_valid_rule_and_summarises_each() -> None:
    cfg = dataclasses.replace(DictConfig(), valid_rule="reference", noisy_threshold=0.5, strong_value=0.2,
                              min_strong_images=2)
    stats = {
        "mean_when_active": np.array([0.9, 0.3, 0.1, 0.2]),  # latent 0 is noisy
        "top_values": np.array([[0.9, 0.8, 0.7], [0.8, 0.7, 0.1], [0.3, 0.1, 0.0], [0.5, 0.4, 0.3]]),  # 2: one strong image
        "mean": np.array([0.5, 0.2, 0.01, 0.1]),
        "frequency": np.array([[0.9], [0.3], [0.1], [0.2]]),
        "top_label_entropy": np.array([1.0, 0.2, 0.5, 0.9]),
        "class_mean": np.array([[0.5, 0.0, 0.0, 0.1], [0.5, 0.4, 0.02, 0.1]]),
        "class_frequency": np.array([[0.9, 0.0, 0.0, 0.2], [0.9, 0.6, 0.2, 0.2]]),
    }
    described = describe_latents(stats, cfg, ["cat", "dog"])
    assert described.valid.tolist() == [1, 3]
    assert (described.n_latents, described.n_noisy, described.n_strong) == (4, 1, 3)
    assert described.thresholds == {"noisy_threshold": 0.5, "strong_value": 0.2}
    assert set(described.latent_stats) == {"1", "3"}
    top = described.latent_stats["1"]["top_classes"]
    assert [c["name"] for c in top] == ["dog"] and top[0]["frequency"] == 0.6  # class 0 has no activation
    assert described.latent_stats["3"]["max_value"] == 0.5


def test_concept_entries_name_and_place_each_valid_latent(tmp_path: Path) -> None:
    names = {1: {"name": "stripes", "score": 0.7, "clarity": 0.2, "error": None}}
    tiles = {1: {"path": tmp_path / "reference" / "1.png", "rows": [4, 2]}}
    entries = concept_entries(np.array([1, 3]), names, tiles, tmp_path, "clip")
    assert entries[1] == ConceptEntry(name="stripes", score=0.7, clarity=0.2, source="clip", error=None,
                                      reference_image="reference/1.png", reference_rows=[4, 2])
    assert entries[3].name is None and entries[3].reference_image is None


def test_concept_patch_maps_sum_members_on_the_grid() -> None:
    """A concept's map is the sum of its members' maps, laid out row-major on the (gh, gw) grid."""
    from conceptscope_cli.categorize.stage import concept_patch_maps

    features = torch.zeros(1, 6, 5)  # S = 1, a 2 x 3 grid, m = 5
    features[0, 1, 2] = 1.0  # latent 2 on patch (0, 1)
    features[0, 5, 3] = 2.0  # latent 3 on patch (1, 2)
    features[0, 5, 2] = 0.5  # and latent 2 there too: the concept (2, 3) has 2.5 on it
    features[0, 5, 4] = 7.0  # latent 4, in no candidate
    maps = concept_patch_maps(features, [(2, 3), (3,)], (2, 3))
    assert maps.shape == (1, 2, 2, 3)
    assert maps[0, 0].tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 2.5]]
    assert maps[0, 1].tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]
