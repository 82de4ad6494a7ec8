"""Science core of `cscope categorize`: masks, alignment, normalisation, bias rule, sampling, P@k.

Expected numbers are written out by hand (fractions in the comments), not recomputed with the
code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conceptscope_cli.categorize.evaluate import bias_discovery_precision, top_k_precision
from conceptscope_cli.categorize.scores import (
    alignment_scores,
    categorize_class,
    class_similarity,
    normalise,
    sample_images,
    select_candidates,
)
from conceptscope_cli.masks import apply_masks, masked_variants, patch_map_to_mask, patch_maps_to_masks

# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def _hot_map() -> np.ndarray:
    patch_map = np.zeros((4, 4), dtype=np.float32)
    patch_map[1, 1] = 3.0  # one hot patch: pixels 8..15 of a 32 px crop
    return patch_map


def test_patch_map_to_mask_upsamples_and_min_max_normalises() -> None:
    mask = patch_map_to_mask(_hot_map(), (32, 32))
    assert isinstance(mask, np.ndarray) and mask.shape == (32, 32) and mask.dtype == np.float32
    # Bilinear (align_corners=False) from 8-px patches: the hot value reaches pixels 4..19 with
    # weight 1 - |(i + 0.5) / 8 - 0.5 - 1| per axis; the peak 0.9375^2 sits at pixels 11..12.
    assert mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
    support = np.argwhere(mask > 0)
    assert support.min(axis=0).tolist() == [4, 4] and support.max(axis=0).tolist() == [19, 19]
    assert mask[11, 11] == pytest.approx(1.0)
    assert mask[8, 8] == pytest.approx(0.36, abs=1e-6)  # (0.5625 / 0.9375)^2 = 0.6^2
    assert mask[4, 4] == pytest.approx((1 / 15) ** 2, abs=1e-6)  # (0.0625 / 0.9375)^2
    assert mask[:4].max() == 0.0 and mask[:, 20:].max() == 0.0
    # Scale of the activations does not matter after min-max; torch in gives torch out.
    scaled = patch_map_to_mask(torch.as_tensor(_hot_map() * 7.0), (32, 32))
    assert isinstance(scaled, torch.Tensor)
    np.testing.assert_allclose(scaled.numpy(), mask, atol=1e-6)
    batched = patch_maps_to_masks(torch.as_tensor(np.stack([_hot_map(), np.zeros((4, 4), np.float32)])), (32, 32))
    np.testing.assert_allclose(batched[0].numpy(), mask, atol=1e-6)
    assert batched[1].abs().max() == 0.0


@pytest.mark.parametrize("value", [0.0, 2.5, float("nan")])
def test_constant_map_gives_zero_mask(value: float) -> None:
    mask = patch_map_to_mask(np.full((4, 4), value, dtype=np.float32), (16, 16))
    assert np.all(mask == 0.0) and not np.isnan(mask).any()


def test_masked_variants_keep_and_remove_the_hot_region() -> None:
    mask = torch.as_tensor(patch_map_to_mask(_hot_map(), (32, 32)))[None]
    image = torch.full((1, 3, 32, 32), 0.8)
    suff, nec = masked_variants(image, mask)  # gamma 0.5 and 0.001
    assert suff.shape == nec.shape == (1, 3, 32, 32)
    # Sufficiency x * m^0.5: black (exact zeros) off the support, x * sqrt(m) on it.
    assert suff[0, :, :4].abs().max() == 0.0 and suff[0, :, :, 20:].abs().max() == 0.0
    assert suff[0, 0, 11, 11].item() == pytest.approx(0.8)
    assert suff[0, 0, 8, 8].item() == pytest.approx(0.8 * 0.6, abs=1e-6)
    assert (suff[0, :, 8:16, 8:16] >= 0.8 * 0.6 - 1e-6).all()
    # Necessity x * (1 - m^0.001): untouched off the support, ~black on it.
    assert torch.equal(nec[0, :, :4], image[0, :, :4]) and torch.equal(nec[0, :, :, 20:], image[0, :, :, 20:])
    assert nec[0, 0, 11, 11].item() == pytest.approx(0.0, abs=1e-7)
    assert nec[0, :, 8:16, 8:16].max().item() == pytest.approx(0.8 * (1 - 0.36**0.001), abs=1e-6)
    assert nec[0, :, 8:16, 8:16].max().item() < 1e-3
    # The same via apply_masks, and shape checks.
    assert torch.equal(apply_masks(image, mask, 0.5, invert=False), suff)
    with pytest.raises(ValueError):
        apply_masks(image, mask[:, :16], 0.5, invert=False)
    with pytest.raises(ValueError):
        apply_masks(image, mask, 0.0, invert=True)


# --------------------------------------------------------------------------------------------
# alignment, normalisation, categorisation
# --------------------------------------------------------------------------------------------

# 2 images x 3 latents.
SIM_ORIG = [0.2, 0.4]
SIM_SUFF = [[0.1, 0.4], [0.2, 0.2], [0.3, 0.2]]
SIM_NEC = [[0.1, 0.5], [0.4, 0.4], [0.2, 0.4]]


def test_alignment_scores_by_hand() -> None:
    out = alignment_scores(SIM_ORIG, SIM_SUFF, SIM_NEC)
    # latent 0: s = 0.1/0.2, 0.4/0.4 = 0.5, 1.0; n = 0.2/0.1, 0.4/0.5 = 2.0, 0.8
    # latent 1: s = 1.0, 0.5;  n = 0.5, 1.0
    # latent 2: s = 1.5, 0.5;  n = 1.0, 1.0
    np.testing.assert_allclose(out["sufficiency"], [0.75, 0.75, 1.0])
    np.testing.assert_allclose(out["necessity"], [1.4, 0.75, 1.0])
    np.testing.assert_allclose(out["alignment"], [1.075, 0.75, 1.0])
    np.testing.assert_allclose(out["sufficiency_std"], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(out["necessity_std"], [0.6, 0.25, 0.0], atol=1e-12)
    # per-image alignment: latent 0: 1.25, 0.9; latent 1: 0.75, 0.75; latent 2: 1.25, 0.75
    np.testing.assert_allclose(out["alignment_std"], [0.175, 0.0, 0.25], atol=1e-12)
    assert out["sufficiency_count"].tolist() == [2, 2, 2] and out["necessity_count"].tolist() == [2, 2, 2]


def test_normalise_by_hand() -> None:
    # A = 43/40, 3/4, 1; mean 113/120; deviations 16/120, -23/120, 7/120;
    # population variance (256 + 529 + 49) / (3 * 120^2) so z = (16, -23, 7) / sqrt(278).
    z = normalise([1.075, 0.75, 1.0])
    np.testing.assert_allclose(z, np.array([16.0, -23.0, 7.0]) / math.sqrt(278.0))
    np.testing.assert_allclose(normalise([3.0, 1.0, 1.0, 1.0, 1.0]), [2.0, -0.5, -0.5, -0.5, -0.5])


def test_categorize_from_hand_alignment() -> None:
    a = alignment_scores(SIM_ORIG, SIM_SUFF, SIM_NEC)["alignment"]
    # Threshold 1.0: the best z is 16/sqrt(278) = 0.96 < 1, so every latent is context.
    # Context strengths 0.5, 0.2, 0.2: mean 0.3, std sqrt(0.02); threshold 0.3 + 0.1414 = 0.4414.
    cats = categorize_class([7, 8, 9], a, [0.5, 0.2, 0.2], target_threshold=1.0)
    assert cats.target == [] and cats.context == [7, 8, 9] and cats.bias == [7]
    assert cats.target_threshold == 1.0
    assert cats.bias_threshold == pytest.approx(0.3 + math.sqrt(0.02))
    # Threshold 0.4: z = 0.96 and 0.42 are targets; one context latent left, so no bias.
    cats = categorize_class([7, 8, 9], a, [0.5, 0.2, 0.2], target_threshold=0.4)
    assert cats.target == [7, 9] and cats.context == [8] and cats.bias == [] and cats.bias_threshold is None


def test_bias_rule_by_hand() -> None:
    # A = 3, 1, 1, 1, 1 -> z = 2, -0.5 x 4: latent 10 is the only target.
    # Context strengths 0.1, 0.2, 0.3, 0.6: mean 0.3, variance (0.04 + 0.01 + 0 + 0.09) / 4 = 0.035.
    latents = [10, 11, 12, 13, 14]
    alignment = [3.0, 1.0, 1.0, 1.0, 1.0]
    strength = [0.9, 0.1, 0.2, 0.3, 0.6]
    cats = categorize_class(latents, alignment, strength, target_threshold=1.0, bias_sigma=1.0)
    assert cats.target == [10] and cats.context == [11, 12, 13, 14]
    assert cats.bias_threshold == pytest.approx(0.3 + math.sqrt(0.035))  # 0.487
    assert cats.bias == [14] and set(cats.bias) <= set(cats.context)
    np.testing.assert_allclose(cats.normalised_alignment, [2.0, -0.5, -0.5, -0.5, -0.5])
    # sigma 0: threshold = mean = 0.3 exactly; ">=" keeps the latent sitting on it.
    cats0 = categorize_class(latents, alignment, strength, target_threshold=1.0, bias_sigma=0.0)
    assert cats0.bias == [13, 14]
    assert 13 in cats0.bias and 10 not in cats0.bias


# --------------------------------------------------------------------------------------------
# degenerate cases
# --------------------------------------------------------------------------------------------


def test_zero_similarity_terms_are_dropped_never_inf() -> None:
    # Image 1 has sim(x) = 0: dropped from every sufficiency mean. Latent 0 has a zero necessity
    # similarity on image 0: that term is dropped. Latent 1 loses every necessity term.
    out = alignment_scores([0.2, 0.0], [[0.1, 0.3], [0.4, 0.3]], [[0.0, 0.1], [0.0, 1e-9]])
    for v in out.values():
        assert np.all(np.isfinite(v))
    np.testing.assert_allclose(out["sufficiency"], [0.5, 2.0])
    assert out["sufficiency_count"].tolist() == [1, 1]
    np.testing.assert_allclose(out["necessity"], [0.0, 1.0])  # 0.0 / 0.1; latent 1: neutral 1.0
    assert out["necessity_count"].tolist() == [1, 0]
    np.testing.assert_allclose(out["alignment"], [0.25, 1.5])
    np.testing.assert_allclose(out["alignment_std"], [0.0, 0.0])  # no image has both terms
    empty = alignment_scores(np.zeros(0), np.zeros((2, 0)), np.zeros((2, 0)))
    assert empty["alignment"].tolist() == [1.0, 1.0] and empty["sufficiency_count"].tolist() == [0, 0]


def test_fewer_than_two_candidates_and_zero_std() -> None:
    assert normalise([0.7]).tolist() == [0.0]
    assert normalise([]).tolist() == []
    assert normalise([0.4, 0.4, 0.4]).tolist() == [0.0, 0.0, 0.0]
    one = categorize_class([3], [0.7], [0.5], target_threshold=1.0)
    assert one.target == [] and one.context == [3] and one.bias == [] and one.bias_threshold is None
    assert categorize_class([3], [0.7], [0.5]).target == [3]  # default 0.0: A' = 0 is a target
    # Equal context strengths: nothing stands out, no bias.
    flat = categorize_class([1, 2, 3], [0.5, 0.5, 0.5], [0.2, 0.2, 0.2], target_threshold=1.0)
    assert flat.context == [1, 2, 3] and flat.bias == [] and flat.bias_threshold is None
    none = categorize_class([], [], [])
    assert none.target == none.context == none.bias == []


def test_no_context_latents_gives_empty_bias() -> None:
    cats = categorize_class([1, 2, 3], [0.1, 0.5, 0.9], [0.3, 0.2, 0.1], target_threshold=-10.0)
    assert cats.target == [1, 2, 3] and cats.context == [] and cats.bias == [] and cats.bias_threshold is None


def test_fewer_images_than_num_samples() -> None:
    assert sample_images([9, 3, 5], num_samples=10, seed=0, class_id=2).tolist() == [3, 5, 9]


# --------------------------------------------------------------------------------------------
# similarity, strength, candidates, sampling
# --------------------------------------------------------------------------------------------


def test_class_similarity_max_cosine_of_unnormalised_inputs() -> None:
    images = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    sim = class_similarity(images, np.array([[2.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(sim, [1.0, 1.0, 1 / math.sqrt(2), 0.0])
    single = class_similarity(torch.as_tensor(images), torch.tensor([1.0, 1.0]))  # (e,) text = K of 1
    np.testing.assert_allclose(single, [1 / math.sqrt(2)] * 2 + [1.0, 0.0])


def test_candidates() -> None:
    strength = [0.5, 0.0, 0.9, 0.5, 0.7]
    valid = [True, True, True, True, False]
    assert select_candidates(strength, valid, None).tolist() == [2, 0, 3]  # tie 0/3 by index, 1 never fires
    assert select_candidates(strength, valid, 2).tolist() == [2, 0]
    assert select_candidates(strength, valid, 10).tolist() == [2, 0, 3]
    assert select_candidates(strength, valid, 0).tolist() == []
    assert select_candidates(strength, None, None).tolist() == [2, 4, 0, 3]


def test_seeded_sampling() -> None:
    positions = np.arange(100, 300)
    a = sample_images(positions, 16, seed=0, class_id=1)
    b = sample_images(positions[::-1], 16, seed=0, class_id=1)
    assert a.tolist() == b.tolist() and len(a) == 16 and np.all(np.diff(a) > 0)
    assert set(a.tolist()) <= set(positions.tolist())
    assert a.tolist() != sample_images(positions, 16, seed=1, class_id=1).tolist()
    assert a.tolist() != sample_images(positions, 16, seed=0, class_id=2).tolist()


# --------------------------------------------------------------------------------------------
# bias-discovery precision@k
# --------------------------------------------------------------------------------------------


def _two_class_world() -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """20 test images per class; latent 100 is class 1's bias, latents 200/201 class 0's."""
    labels = np.array([0] * 20 + [1] * 20)
    context = np.array([1] * 10 + [0] * 10 + [0] * 5 + [1] * 15)
    acts = {b: np.zeros(40) for b in (100, 200, 201)}
    # Class 0 by latent 100: top 10 = images 0..6 (context 1) and 10..12 (context 0) -> 7/10.
    acts[100][0:7] = np.arange(10.0, 3.0, -1.0)
    acts[100][10:13] = [3.5, 3.4, 3.3]
    acts[100][7:10] = 0.5
    acts[100][13:20] = 0.1
    # Class 1 by latent 200: top 10 = 20..24 (context 0) and 25..29 -> 5/10; latent 201: 2/10.
    acts[200][20:30] = np.arange(30.0, 20.0, -1.0)
    acts[201][20:22] = 9.0
    acts[201][30:38] = 5.0
    return labels, context, acts


def test_precision_at_10_known_answer() -> None:
    labels, context, acts = _two_class_world()
    calls: list[int] = []

    def activation(latent: int) -> np.ndarray:
        calls.append(latent)
        return acts[latent]

    res = bias_discovery_precision({0: [200, 201], 1: [100]}, labels, context, activation, k=10)
    by_pair = {(p.class_id, p.bias_class): p for p in res.pairs}
    assert by_pair[(0, 1)].precision == pytest.approx(0.7) and by_pair[(0, 1)].best_latent == 100
    assert by_pair[(1, 0)].precision == pytest.approx(0.5) and by_pair[(1, 0)].best_latent == 200
    assert by_pair[(1, 0)].per_latent == {200: pytest.approx(0.5), 201: pytest.approx(0.2)}
    assert res.precision == pytest.approx(0.6) and res.std == pytest.approx(0.1)
    assert res.skipped_no_bias == [] and res.skipped_no_images == []
    assert sorted(calls) == [100, 200, 201]  # each latent read once
    assert len(res.table()) == 2


def test_precision_degenerate_pairs() -> None:
    labels, context, acts = _two_class_world()
    # Class 2: four test images (fewer than k), no bias latents. Class 3: bias latents, no images.
    labels = np.concatenate([labels, [2, 2, 2, 2]])
    context = np.concatenate([context, [0, 0, 1, -1]])
    for b in acts:
        acts[b] = np.concatenate([acts[b], np.zeros(4)])
    acts[200][40:44] = [1.0, 2.0, 3.0, 4.0]  # order 43, 42, 41, 40 -> contexts -1, 1, 0, 0 -> 2/4
    acts[100][40:44] = [4.0, 3.0, 2.0, 1.0]  # order 40..43 -> contexts 0, 0, 1, -1 -> 1/4
    res = bias_discovery_precision({0: [200], 1: [100], 2: [], 3: [100]}, labels, context, acts.__getitem__, k=10)
    by_pair = {(p.class_id, p.bias_class): p for p in res.pairs}
    assert by_pair[(2, 0)].precision == pytest.approx(0.5) and by_pair[(2, 0)].k == 4
    assert by_pair[(2, 1)].precision == pytest.approx(0.25) and by_pair[(2, 1)].num_images == 4
    assert sorted(res.skipped_no_bias) == [(0, 2), (1, 2)]
    assert sorted(res.skipped_no_images) == [(3, 0), (3, 1), (3, 2)]
    # Pairs with class 3 as c': its bias latent 100 ranks images whose context is never 3.
    assert by_pair[(0, 3)].precision == 0.0
    expected = [0.7, 0.0, 0.5, 0.0, 0.5, 0.25, 0.0]  # (0,1) (0,3) (1,0) (1,3) (2,0) (2,1) (2,3)
    assert res.precision == pytest.approx(sum(expected) / len(expected))
    nothing = bias_discovery_precision({}, labels, context, acts.__getitem__)
    assert nothing.precision is None and nothing.pairs == []


def test_top_k_precision_ties_and_nan() -> None:
    scores = np.array([1.0, np.nan, 1.0, 0.5])
    context = np.array([1, 1, 0, 1])
    assert top_k_precision(scores, context, 1, 2) == (0.5, 2)  # positions 0, 2 (NaN last)
    assert top_k_precision(scores[:0], context[:0], 1, 10) == (0.0, 0)


def test_effect_size_against_a_hand_computation() -> None:
    """Three classes, one latent: class 0 = [1, 3], class 1 = [0, 0, 0, 2], class 2 = [4].
    Class 0 vs rest [0, 0, 0, 2, 4]: rest mean 1.2, rest variance 20/5 - 1.44 = 2.56,
    pooled sqrt((1 + 2.56) / 2) = sqrt(1.78), d = 0.8 / sqrt(1.78)."""
    from conceptscope_cli.categorize.scores import effect_size, relative_strength

    groups = [np.array([1.0, 3.0]), np.array([0.0, 0.0, 0.0, 2.0]), np.array([4.0])]
    mean = np.array([[g.mean()] for g in groups])
    std = np.array([[g.std()] for g in groups])
    count = np.array([len(g) for g in groups])
    d = effect_size(mean, std, count)
    assert d.shape == (3, 1)
    assert d[0, 0] == pytest.approx(0.8 / np.sqrt(1.78))
    for y, g in enumerate(groups):  # the same from the raw values
        rest = np.concatenate([h for j, h in enumerate(groups) if j != y])
        assert d[y, 0] == pytest.approx((g.mean() - rest.mean()) / np.sqrt((g.var() + rest.var()) / 2))
    # Degenerate: a latent that never varies, a class alone in its split, an empty class.
    assert effect_size(np.zeros((2, 1)), np.zeros((2, 1)), np.array([3, 4]))[:, 0].tolist() == [0.0, 0.0]
    assert effect_size(np.array([[1.0]]), np.array([[0.5]]), np.array([5]))[0, 0] == 0.0
    assert effect_size(np.array([[0.0], [1.0]]), np.array([[0.0], [0.5]]), np.array([0, 5]))[0, 0] == 0.0
    lift = relative_strength(mean, np.array([(2 * 2 + 0.5 * 4 + 4) / 7]))
    assert lift[0, 0] == pytest.approx(2 / (10 / 7)) and relative_strength([[1.0]], [0.0])[0, 0] == 0.0
