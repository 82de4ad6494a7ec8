"""The context-only check of bias claims (METHOD §Categorization, "Context-only check").

A bias claim says that concept c is over-represented in class y, measured on whole images. A
latent that is a conjunction "this context around this class's object" passes that test by the
class's own gain (METHOD, "What the false claims are"), and nothing in the latent's activation
tells it from a real over-representation. With the object's bounding box (`[datasets.NAME]
object_box_column`), the claim is measured again on the image without the object: the patch
tokens the box touches are dropped from the ViT's sequence (`backbone/dropping.py`), the rest is
encoded, and the concept's image-level activation is compared between class y and the other
classes exactly as the evidence rule does (same base rate, Cliff's δ). A claim whose
over-representation does not survive is moved from `bias` to `entangled`.

Shapes: N sampled images (of every class), K claims, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from jaxtyping import Float, Int

from conceptscope_cli.categorize.evidence import majority_value

BaseRate = Literal["typical", "rest"]
_REPLICATE_CHUNK = 64  # bootstrap replicates per vectorised step: memory O(chunk × N)


@dataclass(frozen=True)
class ContextOnlyEffects:
    """Per claim (K,): Cliff's δ of the context-only activation, class vs the base rate, its
    percentile bootstrap CI, the class's images behind it, the other classes compared, and the
    fraction of images where the concept is active at all (class, rest): a concept that is
    silent without the object everywhere has nothing to show there."""

    effect: Float[np.ndarray, " K"]
    effect_low: Float[np.ndarray, " K"]
    effect_high: Float[np.ndarray, " K"]
    n_class: Int[np.ndarray, " K"]
    n_compared: Int[np.ndarray, " K"]
    present_class: Float[np.ndarray, " K"]
    present_rest: Float[np.ndarray, " K"]


def _weighted_deltas(values: Float[np.ndarray, " N"], labels: Int[np.ndarray, " N"], y: int, n_classes: int,
                     weights: Float[np.ndarray, "B N"], base_rate: BaseRate) -> Float[np.ndarray, " B"]:
    """δ of class y for each weight row: 2·AUROC − 1 against the rest (pooled) or the majority
    value (`evidence.majority_value`) over the other classes with weight (the typical class); NaN
    when nothing is compared.

    AUROC(y vs z) = Σ_{j∈z} w_j · A(v_j) / (W_y · W_z), A(v) = Σ_{i∈y} w_i ([v_i > v] + ½[v_i = v]):
    one pass over the images' value levels, ties counted half (the Mann–Whitney convention)."""
    levels, inverse = np.unique(values, return_inverse=True)
    n_levels, n_rep = len(levels), weights.shape[0]
    in_class = labels == y
    # (B, L) weight of class y at each level; A(l) = W_y − Σ_{l' ≤ l} h + ½ h(l)
    flat = (np.arange(n_rep)[:, None] * n_levels + inverse[in_class][None, :]).ravel()
    h = np.bincount(flat, weights=weights[:, in_class].ravel(), minlength=n_rep * n_levels).reshape(n_rep, n_levels)
    w_y = h.sum(1)
    above = w_y[:, None] - np.cumsum(h, axis=1) + 0.5 * h
    others = ~in_class
    onehot = np.zeros((int(others.sum()), n_classes))
    onehot[np.arange(int(others.sum())), labels[others]] = 1.0
    w_other = weights[:, others]
    wins = (w_other * above[:, inverse[others]]) @ onehot  # (B, C)
    w_z = w_other @ onehot  # (B, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        if base_rate == "rest":
            return 2.0 * wins.sum(1) / (w_y * w_z.sum(1)) - 1.0
        delta = 2.0 * wins / (w_y[:, None] * w_z) - 1.0  # (B, C); NaN where class z has no weight
        delta[:, y] = np.nan
        delta[w_y == 0] = np.nan
        return majority_value(delta)


def context_only_effects(values: Float[np.ndarray, "N K"], labels: Int[np.ndarray, " N"],
                         claim_class: Int[np.ndarray, " K"], n_classes: int, *, base_rate: BaseRate,
                         n_boot: int, seed: int, confidence: float) -> ContextOnlyEffects:
    """Context-only effect of each claim (column k of `values`, the concept's activation on the
    sampled images without the object; `claim_class[k]` its class), with a seeded Poisson
    bootstrap over images (each image weight ~ Poisson(1), the same draw for every claim, as the
    evidence rule's bootstrap; METHOD §Categorization)."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    claim_class = np.asarray(claim_class, dtype=np.int64)
    n_images, n_claims = values.shape
    if labels.shape != (n_images,) or claim_class.shape != (n_claims,):
        raise ValueError(f"labels must be ({n_images},) and claim_class ({n_claims},)")
    rng = np.random.default_rng([int(seed), 0xC0E7])
    draws = rng.poisson(1.0, size=(n_boot, n_images)).astype(np.float64)
    counts = np.bincount(labels, minlength=n_classes)
    effect, low, high = (np.full(n_claims, np.nan) for _ in range(3))
    n_class = counts[claim_class].astype(np.int64)
    n_compared = np.array([int((np.delete(counts, y) > 0).sum()) for y in claim_class], dtype=np.int64)
    present_class, present_rest = np.full(n_claims, np.nan), np.full(n_claims, np.nan)
    tail = (1.0 - confidence) / 2.0
    for k in range(n_claims):
        y = int(claim_class[k])
        if counts[y] == 0 or n_compared[k] == 0:
            continue
        active = values[:, k] > 0
        present_class[k], present_rest[k] = active[labels == y].mean(), active[labels != y].mean()
        effect[k] = _weighted_deltas(values[:, k], labels, y, n_classes, np.ones((1, n_images)), base_rate)[0]
        boot = np.concatenate([_weighted_deltas(values[:, k], labels, y, n_classes, draws[s:s + _REPLICATE_CHUNK],
                                                base_rate) for s in range(0, n_boot, _REPLICATE_CHUNK)])
        boot = boot[np.isfinite(boot)]
        if len(boot):
            low[k], high[k] = np.quantile(boot, [tail, 1.0 - tail])
    return ContextOnlyEffects(effect, low, high, n_class, n_compared, present_class, present_rest)


def survives(effects: ContextOnlyEffects, min_effect: float) -> np.ndarray:
    """(K,) bool: the over-representation holds without the object — the context-only effect is
    at least `min_effect` (the evidence rule's size floor) and its CI excludes 0."""
    with np.errstate(invalid="ignore"):
        return (effects.effect >= min_effect) & (effects.effect_low > 0)
