"""The context-only check (METHOD §Categorization, "Context-only check"): the token-dropping
forward and the statistics, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptscope_cli.categorize import context_check as K


def _auroc(a: np.ndarray, b: np.ndarray) -> float:
    """P(a > b) + ½ P(a = b), by brute force over all pairs."""
    diff = a[:, None] - b[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _world(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), [30, 25, 40, 20])
    values = rng.exponential(1.0, size=(len(labels), 3)) * (rng.random((len(labels), 3)) < 0.6)
    values[labels == 1, 0] += 1.5  # claim 0: class 1 over-represented
    values = np.round(values, 1)  # ties, as in sparse activations
    return values, labels


@pytest.mark.parametrize("base_rate", ["typical", "rest"])
def test_effect_matches_pairwise_cliffs_delta(base_rate: str) -> None:
    values, labels = _world()
    claim_class = np.array([1, 2, 0])
    out = K.context_only_effects(values, labels, claim_class, 4, base_rate=base_rate, n_boot=50, seed=0,
                                 confidence=0.9)
    for k, y in enumerate(claim_class):
        inside = values[labels == y, k]
        if base_rate == "rest":
            expected = 2 * _auroc(inside, values[labels != y, k]) - 1
        else:
            expected = float(np.median([2 * _auroc(inside, values[labels == z, k]) - 1 for z in range(4) if z != y]))
        assert out.effect[k] == pytest.approx(expected, abs=1e-12)
        assert out.effect_low[k] <= out.effect[k] + 1e-9 and out.effect[k] - 1e-9 <= out.effect_high[k]
    assert list(out.n_class) == [25, 40, 30] and list(out.n_compared) == [3, 3, 3]
    for k, y in enumerate(claim_class):
        assert out.present_class[k] == pytest.approx((values[labels == y, k] > 0).mean())
        assert out.present_rest[k] == pytest.approx((values[labels != y, k] > 0).mean())


def test_typical_effect_with_an_even_number_of_other_classes_is_the_majority_value() -> None:
    """Five classes: the context-only typical δ is the value most of the four other classes give
    (the lower middle one), as the evidence rule's δ_typ is, not the mean of the two middle ones."""
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(5), [60, 50, 80, 40, 70])
    values = np.round(rng.exponential(1.0, size=len(labels)) * (rng.random(len(labels)) < 0.6), 1)
    values[labels == 1] += 1.0  # class 0 has less of it than class 1, about as much as class 2,
    values[labels >= 3] = 0.0  # and far more than classes 3 and 4, which lack it
    out = K.context_only_effects(values[:, None], labels, np.array([0]), 5, base_rate="typical", n_boot=20, seed=0,
                                 confidence=0.9)
    deltas = sorted(2 * _auroc(values[labels == 0], values[labels == z]) - 1 for z in (1, 2, 3, 4))
    assert out.effect[0] == pytest.approx(deltas[1], abs=1e-12) and deltas[1] < (deltas[1] + deltas[2]) / 2 - 0.2


def test_bootstrap_weight_equals_duplicating_an_image() -> None:
    """A Poisson weight of 2 counts an image twice: the weighted δ equals δ on the data with that
    image duplicated (and a weight of 0 removes it)."""
    values, labels = _world(1)
    w = np.ones((1, len(labels)))
    w[0, 3], w[0, 40], w[0, 70] = 2.0, 0.0, 2.0
    keep = np.r_[np.arange(len(labels)), [3, 70]]
    keep = keep[keep != 40]
    for base_rate in ("typical", "rest"):
        weighted = K._weighted_deltas(values[:, 0], labels, 1, 4, w, base_rate)[0]
        plain = K._weighted_deltas(values[keep, 0], labels[keep], 1, 4, np.ones((1, len(keep))), base_rate)[0]
        assert weighted == pytest.approx(plain, abs=1e-12)


def test_ci_covers_and_narrows_with_more_images() -> None:
    rng = np.random.default_rng(3)

    def width(n: int) -> tuple[float, float, float]:
        labels = np.repeat(np.arange(3), n)
        values = (rng.random((3 * n, 1)) < np.where(labels == 0, 0.5, 0.2)[:, None]).astype(float)
        out = K.context_only_effects(values, labels, np.array([0]), 3, base_rate="typical", n_boot=200, seed=1,
                                     confidence=0.95)
        return float(out.effect_low[0]), float(out.effect[0]), float(out.effect_high[0])

    lo_s, mid_s, hi_s = width(40)
    lo_l, mid_l, hi_l = width(640)
    assert lo_l < 0.3 < hi_l  # presence 0.5 vs 0.2: δ = 0.3
    assert hi_l - lo_l < 0.5 * (hi_s - lo_s)


def test_survives_needs_the_size_floor_and_a_ci_above_zero() -> None:
    effects = K.ContextOnlyEffects(effect=np.array([0.5, 0.1, 0.3, np.nan]), effect_low=np.array([0.2, 0.05, -0.01, np.nan]),
                                   effect_high=np.array([0.7, 0.2, 0.5, np.nan]), n_class=np.ones(4, int),
                                   n_compared=np.ones(4, int), present_class=np.ones(4), present_rest=np.ones(4))
    assert list(K.survives(effects, 0.147)) == [True, False, False, False]


def test_dropping_patches_equals_a_forward_without_them() -> None:
    """No patch dropped: block L's output as the model computes it; patches dropped: the same as a
    forward of the remaining tokens alone, image by image (and the class token is kept)."""
    import open_clip

    from conceptscope_cli.backbone.capture import ResidualCapture
    from conceptscope_cli.backbone.dropping import activations_without_patches

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)  # random weights; only the geometry matters
    visual = model.visual.eval()
    visual.transformer.resblocks = visual.transformer.resblocks[:2]
    x = torch.randn(5, 3, 224, 224)
    n_patches = visual.positional_embedding.shape[0] - 1
    none = activations_without_patches(visual, 1, x, torch.zeros(5, n_patches, dtype=torch.bool))
    full = ResidualCapture(visual, 1)(x)
    assert all(torch.allclose(a, f, atol=1e-5) for a, f in zip(none, full))
    drop = torch.rand(5, n_patches) < 0.5
    drop[0] = True
    out = activations_without_patches(visual, 1, x, drop)
    for i in range(5):
        tokens = visual.conv1(x[i:i + 1]).flatten(2).transpose(1, 2)
        tokens = torch.cat([visual.class_embedding.view(1, 1, -1), tokens], 1) + visual.positional_embedding
        z = visual.ln_pre(tokens[:, torch.cat([torch.tensor([True]), ~drop[i]])])
        for block in visual.transformer.resblocks:
            z = block(z)
        assert out[i].shape == (1 + int((~drop[i]).sum()), z.shape[-1])
        assert torch.allclose(out[i], z[0], atol=1e-4)
