"""Statistical evidence that a concept is over-represented in a class (METHOD §Categorization).

For every tested pair (class y, concept c), with a_c(x) the image-level activation of c over
the whole split:

* effect: ``AUROC = P(a_c(x) > a_c(x′)) + ½ P(=)`` for x of class y and x′ of the rest of the
  split (Mann–Whitney U / (n_y · n_rest)); Cliff's ``δ = 2 · AUROC − 1`` ∈ [−1, 1];
* p-value: one-sided Mann–Whitney test (normal approximation with tie correction and a
  continuity correction) of "a_c is stochastically larger in y than in the rest";
* q-value: Benjamini–Hochberg over every pair tested in the run;
* a seeded Poisson bootstrap CI of δ over images (class and rest resampled independently);
* frequencies "present" (a_c(x) > 0) in the class and in the rest.

Everything works from activation *histograms*: each concept's positive activations are put
on a fixed log grid of ``levels`` levels spanning ``decades`` decades below the concept's
maximum over the split (values below the floor share the first level), and zeros share level 0.
Ranks are then ties within a level (counted half), so one streaming pass over the CSR latents
gives every statistic in O(nnz) time and O(pairs · levels) memory, independent of the number
of images. Everything here is pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import numpy as np

DEFAULT_LEVELS = 256
DEFAULT_DECADES = 4.0
DEFAULT_BOOTSTRAP = 400
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Histograms:
    """Activation histograms of the tested concepts (levels: 0 = zero, 1..L = log grid).

    ``total`` (U, L+1): every image of the split, per concept (unit). ``pair`` (P, L+1): the
    images of ``pair_class[p]`` for concept ``pair_unit[p]``. ``class_count`` (Cl,): images per
    class; ``n_images``: images in the split.
    """

    total: np.ndarray
    pair: np.ndarray
    pair_class: np.ndarray
    pair_unit: np.ndarray
    class_count: np.ndarray
    n_images: int


def quantize(values: np.ndarray, vmax: np.ndarray, levels: int = DEFAULT_LEVELS,
             decades: float = DEFAULT_DECADES) -> np.ndarray:
    """Level of each activation: 0 for ``v ≤ 0``, else ``1 + ⌊(L − 1) · (1 + log10(v / vmax) / decades)⌋``
    clipped to [1, L] (so ``v = vmax`` is level L and ``v ≤ vmax · 10^−decades`` is level 1).

    Args:
        values: (n,) activations.
        vmax: (n,) the concept's maximum over the split, per value (> 0 where values are positive).
    """
    v = np.asarray(values, dtype=np.float64)
    top = np.maximum(np.asarray(vmax, dtype=np.float64), 1e-30)
    out = np.zeros(v.shape, dtype=np.int64)
    pos = v > 0
    with np.errstate(divide="ignore"):
        rel = np.log10(np.minimum(v[pos], top[pos]) / top[pos]) / decades  # in (-inf, 0]
    out[pos] = 1 + np.clip(np.floor((levels - 1) * (1.0 + rel) + 1e-9), 0, levels - 1).astype(np.int64)
    return out


def _block_levels(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, unit_of_latent: np.ndarray,
                  unit_max: np.ndarray, multi: bool, levels: int, decades: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, unit, level) of every positive unit activation of one CSR block (a unit with several
    latents is active with the sum of its members'); the one quantisation both passes share."""
    n_units = unit_max.shape[0]
    b = len(indptr) - 1
    row = np.repeat(np.arange(b, dtype=np.int64), np.diff(np.asarray(indptr, dtype=np.int64)))  # type: ignore[arg-type]  # numpy stubs: diff -> timedelta64
    unit = unit_of_latent[np.asarray(indices, dtype=np.int64)]
    keep = unit >= 0
    row, unit, val = row[keep], unit[keep], np.asarray(values, dtype=np.float64)[keep]
    if multi and row.size:  # a group's activation is the sum of its members' (one entry per image)
        cell, inverse = np.unique(row * n_units + unit, return_inverse=True)
        val = np.bincount(inverse, weights=val)  # type: ignore[assignment]  # float64 with weights
        row, unit = cell // n_units, cell % n_units
    level = quantize(val, unit_max[unit], levels, decades)
    positive = level > 0
    return row[positive], unit[positive], level[positive]


def activation_histograms(
    blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    unit_of_latent: np.ndarray,
    unit_max: np.ndarray,
    pair_class: np.ndarray,
    pair_unit: np.ndarray,
    n_classes: int,
    levels: int = DEFAULT_LEVELS,
    decades: float = DEFAULT_DECADES,
) -> Histograms:
    """One pass over CSR row blocks of image-level latents -> the histograms of the tested pairs.

    Args:
        blocks: iterable of ``(indptr (b+1,) from 0, indices (nnz,), values (nnz,), labels (b,))``.
        unit_of_latent: (m,) int, the concept (unit) each latent belongs to, −1 for none. A unit
            with several latents (a group) is active with the SUM of its members' activations.
        unit_max: (U,) each unit's maximum activation over the split (the grid's top), > 0.
        pair_class, pair_unit: (P,) the tested pairs (class id, unit id), distinct.
        n_classes: number of classes (labels outside [0, n_classes) are counted in no class).

    Returns:
        :class:`Histograms`; time O(nnz), memory O((U + P) · levels) plus one block.
    """
    unit_of_latent = np.asarray(unit_of_latent, dtype=np.int64)
    unit_max = np.asarray(unit_max, dtype=np.float64)
    n_units = unit_max.shape[0]
    pair_class = np.asarray(pair_class, dtype=np.int64)
    pair_unit = np.asarray(pair_unit, dtype=np.int64)
    width = levels + 1
    keys = pair_class * n_units + pair_unit
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if np.unique(keys).shape[0] != keys.shape[0]:
        raise ValueError("tested (class, concept) pairs must be distinct")
    multi = np.bincount(unit_of_latent[unit_of_latent >= 0], minlength=n_units).max(initial=0) > 1
    total = np.zeros(n_units * width, dtype=np.int64)
    pair = np.zeros(keys.shape[0] * width, dtype=np.int64)
    class_count = np.zeros(n_classes, dtype=np.int64)
    n_images = 0
    for indptr, indices, values, labels in blocks:
        labels = np.asarray(labels, dtype=np.int64)
        b = labels.shape[0]
        n_images += b
        inside = (labels >= 0) & (labels < n_classes)
        class_count += np.bincount(labels[inside], minlength=n_classes)
        row, unit, level = _block_levels(indptr, indices, values, unit_of_latent, unit_max, multi, levels, decades)
        total += np.bincount(unit * width + level, minlength=total.shape[0])
        key = labels[row] * n_units + unit
        if not sorted_keys.size:
            continue
        slot = np.minimum(np.searchsorted(sorted_keys, key), sorted_keys.shape[0] - 1)
        hit = (sorted_keys[slot] == key) & inside[row]
        pair += np.bincount(order[slot[hit]] * width + level[hit], minlength=pair.shape[0])
    total = total.reshape(n_units, width)
    pair = pair.reshape(keys.shape[0], width)
    total[:, 0] = n_images - total[:, 1:].sum(axis=1)
    pair[:, 0] = class_count[pair_class] - pair[:, 1:].sum(axis=1) if keys.size else 0
    return Histograms(total, pair, pair_class, pair_unit, class_count, n_images)


def _placements(cls: np.ndarray) -> np.ndarray:
    """(P, L+1) V[p, l] = P(a level above l) + ½ P(at l) over the images of pair p's class: the
    AUROC of "the class above an image at level l"."""
    cls = np.asarray(cls, dtype=np.float64)
    n = np.maximum(cls.sum(axis=1, keepdims=True), 1.0)
    above = cls.sum(axis=1, keepdims=True) - np.cumsum(cls, axis=1)
    return (above + 0.5 * cls) / n


def class_vs_class_auroc(
    blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    unit_of_latent: np.ndarray,
    unit_max: np.ndarray,
    hist: Histograms,
    levels: int = DEFAULT_LEVELS,
    decades: float = DEFAULT_DECADES,
) -> np.ndarray:
    """AUROC of every tested pair's class against EACH class, from a second pass over the blocks.

    ``AUROC(y vs k) = mean over images x′ of k of V_y(level(x′))`` with V_y the placement of a
    level among y's images (:func:`_placements`, from ``hist.pair``), so one O(nnz) pass adds
    ``V_y(l) − V_y(0)`` for every positive entry of a tested unit to its (pair, class of the
    image) cell, on top of ``n_k · V_y(0)`` (every image of k at level 0). The blocks, grid and
    units must be those that made ``hist``.

    Returns:
        (P, C) float64; NaN where k is the pair's own class or k has no images. Memory O(P · C)
        whatever the number of images.
    """
    unit_of_latent = np.asarray(unit_of_latent, dtype=np.int64)
    unit_max = np.asarray(unit_max, dtype=np.float64)
    n_units = unit_max.shape[0]
    n_classes = hist.class_count.shape[0]
    n_pairs = hist.pair.shape[0]
    v = _placements(hist.pair)
    gain = v - v[:, :1]  # (P, L+1) change from level 0
    acc = (hist.class_count[None, :].astype(np.float64) * v[:, :1]).reshape(-1)  # (P·C,) every image at level 0
    # The pairs of each unit (CSR over units): a unit tested for several classes feeds several pairs.
    order = np.argsort(hist.pair_unit, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(hist.pair_unit, minlength=n_units))]).astype(np.int64)
    per_unit = np.diff(starts)
    multi = np.bincount(unit_of_latent[unit_of_latent >= 0], minlength=n_units).max(initial=0) > 1
    for indptr, indices, values, labels in blocks:
        labels = np.asarray(labels, dtype=np.int64)
        row, unit, level = _block_levels(indptr, indices, values, unit_of_latent, unit_max, multi, levels, decades)
        label = labels[row]
        tested = (per_unit[unit] > 0) & (label >= 0) & (label < n_classes)
        row, unit, level, label = row[tested], unit[tested], level[tested], label[tested]
        if not unit.size:
            continue
        count = per_unit[unit]
        entry = np.repeat(np.arange(unit.shape[0]), count)
        offset = np.arange(entry.shape[0]) - np.repeat(np.cumsum(count) - count, count)
        pair = order[starts[unit[entry]] + offset]
        np.add.at(acc, pair * n_classes + label[entry], gain[pair, level[entry]])
    counts = hist.class_count.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = acc.reshape(n_pairs, n_classes) / counts[None, :]
    out[:, counts == 0] = np.nan
    out[np.arange(n_pairs), hist.pair_class] = np.nan
    return out


def majority_value(delta: np.ndarray) -> np.ndarray:
    """Per row, the largest d that a strict majority of the row's finite values reach: with K
    values sorted from the top, the (⌊K/2⌋ + 1)-th (the median for odd K, the lower of the two
    middle values for even K); NaN for a row without finite values. (R, C) -> (R,).

    Why not the usual even-K median (the mean of the two middle values): with four other classes,
    two of them short of a concept (a context they are planted away from) would carry a claim
    half-way on their own; the majority value asks y to beat most other classes."""
    delta = np.asarray(delta, dtype=np.float64)
    n = np.isfinite(delta).sum(axis=1)
    ordered = np.sort(np.where(np.isfinite(delta), -delta, np.inf), axis=1)  # descending δ, NaN last
    out = np.full(delta.shape[0], np.nan)
    ok = n > 0
    out[ok] = -ordered[ok, n[ok] // 2]
    return out


def typical_delta(class_auroc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cliff's δ of each pair's class against the typical other class: the majority value
    (:func:`majority_value`) over the other classes (with images) of δ_k = 2 · AUROC(y vs k) − 1;
    and how many classes that is.

    Returns ``(delta_typical (P,), n_compared (P,))``; δ is NaN when no other class has images."""
    delta = 2.0 * np.asarray(class_auroc, dtype=np.float64) - 1.0
    return majority_value(delta), np.isfinite(delta).sum(axis=1).astype(np.int64)


def _normal_sf(z: np.ndarray) -> np.ndarray:
    """Upper tail of the standard normal, accurate far into the tail (erfc)."""
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    return 0.5 * erfc(np.asarray(z, dtype=np.float64) / math.sqrt(2.0)) if np.size(z) else np.zeros(0)


def _auroc(cls: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """AUROC of "class above rest" from (..., L+1) level histograms (ties count half)."""
    n_c, n_r = cls.sum(axis=-1), rest.sum(axis=-1)
    below = np.cumsum(rest, axis=-1) - rest  # rest images strictly below each level
    u = (cls * (below + 0.5 * rest)).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n_c > 0) & (n_r > 0), u / np.maximum(n_c * n_r, 1e-300), 0.5)


def rank_test(hist: Histograms) -> dict[str, np.ndarray]:
    """Mann–Whitney class-vs-rest test of every pair.

    Returns (P,) arrays: ``auroc``, ``delta`` (Cliff's δ = 2·AUROC − 1), ``z``, ``p_value``
    (one-sided, "greater in the class"; tie- and continuity-corrected normal approximation;
    1.0 when the class or the rest is empty or every value ties), ``n_class``, ``n_rest``,
    ``present_class`` / ``present_rest`` (fraction of images with a > 0), ``mean_class`` (not
    used for decisions: the level histogram has no means).
    """
    cls = hist.pair.astype(np.float64)
    tot = hist.total[hist.pair_unit].astype(np.float64)
    rest = tot - cls
    n_c, n_r = cls.sum(axis=1), rest.sum(axis=1)
    n = n_c + n_r
    auroc = _auroc(cls, rest)
    u = auroc * n_c * n_r
    tie = (tot ** 3 - tot).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = n_c * n_r / 12.0 * ((n + 1) - tie / np.maximum(n * (n - 1), 1.0))
        sd = np.sqrt(np.maximum(var, 0.0))
        z = np.where(sd > 0, (u - n_c * n_r / 2.0 - 0.5) / np.where(sd > 0, sd, 1.0), 0.0)
    p = np.where(sd > 0, _normal_sf(z), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        present_c = np.where(n_c > 0, 1.0 - cls[:, 0] / np.maximum(n_c, 1), 0.0)
        present_r = np.where(n_r > 0, 1.0 - rest[:, 0] / np.maximum(n_r, 1), 0.0)
    return {"auroc": auroc, "delta": 2.0 * auroc - 1.0, "z": z, "p_value": np.clip(p, 0.0, 1.0),
            "n_class": n_c.astype(np.int64), "n_rest": n_r.astype(np.int64),
            "present_class": present_c, "present_rest": present_r}


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH q-values (adjusted p-values) of a family of tests: ``q_(i) = min_{j ≥ i} p_(j) · P / j``, ≤ 1."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return p.copy()
    if np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("p-values must be finite and in [0, 1]")
    order = np.argsort(p, kind="stable")
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(q)
    out[order] = np.minimum(q, 1.0)
    return out


def bootstrap_delta_ci(hist: Histograms, seed: int, n_boot: int = DEFAULT_BOOTSTRAP,
                       confidence: float = DEFAULT_CONFIDENCE, chunk_cells: int = 1 << 23) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI of Cliff's δ of every pair by a seeded Poisson bootstrap over images.

    Each image gets weight ~ Poisson(1) (independently; the streaming form of resampling with
    replacement, Hanley & MacGibbon 2006), so a level holding k images of the class gets
    Poisson(k) and the class and rest are resampled independently (stratified). Every replicate
    re-ranks exactly, from its reweighted histograms.

    Args:
        seed: e.g. ``[project] seed``; pairs are drawn in order, so the same inputs give the same CI.
        n_boot: replicates (≥ 1). chunk_cells: bound on pairs × replicates × levels held at once.

    Returns:
        ``(low, high)`` (P,) arrays in [−1, 1]; the point δ when a class or its rest is empty.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    cls_all = hist.pair
    rest_all = hist.total[hist.pair_unit] - cls_all
    n_pairs = cls_all.shape[0]
    low, high = np.zeros(n_pairs), np.zeros(n_pairs)
    alpha = (1.0 - confidence) / 2.0
    # Drop levels no pair uses (most of the grid for most concepts is empty).
    used = (cls_all + rest_all).sum(axis=0) > 0
    cls_all, rest_all = cls_all[:, used], rest_all[:, used]
    step = max(1, chunk_cells // max(1, n_boot * max(1, cls_all.shape[1])))
    for start in range(0, n_pairs, step):
        cls, rest = cls_all[start:start + step], rest_all[start:start + step]
        cls_b = rng.poisson(np.broadcast_to(cls[:, None, :], (cls.shape[0], n_boot, cls.shape[1]))).astype(np.float64)
        rest_b = rng.poisson(np.broadcast_to(rest[:, None, :], (rest.shape[0], n_boot, rest.shape[1]))).astype(np.float64)
        delta = 2.0 * _auroc(cls_b, rest_b) - 1.0  # (p, B)
        low[start:start + step] = np.quantile(delta, alpha, axis=1)
        high[start:start + step] = np.quantile(delta, 1.0 - alpha, axis=1)
    return low, high


def delong_delta_ci(hist: Histograms, confidence: float = DEFAULT_CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """CI of Cliff's δ of every pair from the DeLong placement variance, on the logit scale.

    A class image at level b has placement V10 = P(rest below) + ½ P(rest at b); a rest image
    V01 = P(class above) + ½ P(class at b). ``Var(AUROC) ≈ var(V10) / n_class + var(V01) / n_rest``
    (DeLong et al. 1988; the large-sample limit of the stratified bootstrap). The interval is
    built on logit(AUROC) so it stays inside (0, 1), then mapped to δ = 2·AUROC − 1; it is the
    point when AUROC is 0 or 1 or nothing varies. O(levels) per pair, no randomness.
    """
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    cls = hist.pair.astype(np.float64)
    rest = hist.total[hist.pair_unit].astype(np.float64) - cls
    n_c, n_r = cls.sum(axis=1, keepdims=True), rest.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        v10 = (np.cumsum(rest, axis=1) - 0.5 * rest) / np.maximum(n_r, 1)
        above = cls.sum(axis=1, keepdims=True) - np.cumsum(cls, axis=1)
        v01 = (above + 0.5 * cls) / np.maximum(n_c, 1)
        auc = (cls * v10).sum(axis=1, keepdims=True) / np.maximum(n_c, 1)
        s10 = (cls * (v10 - auc) ** 2).sum(axis=1, keepdims=True) / np.maximum(n_c - 1, 1)
        s01 = (rest * (v01 - auc) ** 2).sum(axis=1, keepdims=True) / np.maximum(n_r - 1, 1)
        se = np.sqrt(s10 / np.maximum(n_c, 1) + s01 / np.maximum(n_r, 1))[:, 0]
    auc = auc[:, 0]
    ok = (auc > 0) & (auc < 1) & (se > 0) & (n_c[:, 0] > 0) & (n_r[:, 0] > 0)
    safe = np.where(ok, auc, 0.5)
    logit = np.log(safe / (1 - safe))
    half = np.where(ok, z * se / (safe * (1 - safe)), 0.0)
    low = np.where(ok, 1 / (1 + np.exp(-(logit - half))), auc)
    high = np.where(ok, 1 / (1 + np.exp(-(logit + half))), auc)
    return 2 * low - 1, 2 * high - 1


# Largest pairs x replicates x used levels the exact Poisson bootstrap may cost (~1 minute on one
# core); above it the DeLong interval (the bootstrap's large-sample limit) is used.
BOOTSTRAP_BUDGET = 5e7


def ci_method(hist: Histograms, n_boot: int) -> str:
    """"bootstrap" when the exact Poisson bootstrap fits BOOTSTRAP_BUDGET, else "delong"."""
    cls = hist.pair
    used = int(((cls + hist.total[hist.pair_unit]) > 0).any(axis=0).sum()) if cls.size else 0
    return "bootstrap" if cls.shape[0] * n_boot * max(used, 1) <= BOOTSTRAP_BUDGET else "delong"


@dataclass(frozen=True)
class Evidence:
    """Per-pair results of :func:`over_representation` (all (P,) arrays, aligned with the pairs)."""

    pair_class: np.ndarray
    pair_unit: np.ndarray
    auroc: np.ndarray
    delta: np.ndarray
    delta_low: np.ndarray
    delta_high: np.ndarray
    p_value: np.ndarray
    q_value: np.ndarray
    n_class: np.ndarray
    n_rest: np.ndarray
    present_class: np.ndarray
    present_rest: np.ndarray
    significant: np.ndarray  # q ≤ fdr, δ ≥ min_effect and (with a typical δ) δ_typical ≥ min_effect
    ci_method: str
    fdr: float
    min_effect: float
    n_tests: int
    # δ against the typical other class (majority_value) and the number of classes compared; NaN / 0
    # when not computed (base rate "rest").
    delta_typical: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_compared: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def index(self) -> dict[tuple[int, int], int]:
        return {(int(c), int(u)): i for i, (c, u) in enumerate(zip(self.pair_class, self.pair_unit))}


def over_representation(hist: Histograms, *, fdr: float, min_effect: float, seed: int, n_boot: int = DEFAULT_BOOTSTRAP,
                        confidence: float = DEFAULT_CONFIDENCE, ci: Union[str, bool] = "auto",
                        class_auroc: Optional[np.ndarray] = None) -> Evidence:
    """Rank test + BH over all pairs + CI; ``significant`` = q ≤ fdr and δ ≥ min_effect.

    ``ci``: "bootstrap", "delong", "auto" (bootstrap within BOOTSTRAP_BUDGET, else DeLong) or
    False (the point, no interval). ``class_auroc`` (P, C) (:func:`class_vs_class_auroc`): the
    effect must also reach ``min_effect`` against the typical other class (:func:`typical_delta`),
    so a class is not called over-represented only because some other classes lack the concept."""
    t = rank_test(hist)
    q = benjamini_hochberg(t["p_value"])
    method = (ci_method(hist, n_boot) if ci in ("auto", True) else str(ci)) if ci else "none"
    if method == "bootstrap":
        low, high = bootstrap_delta_ci(hist, seed, n_boot, confidence)
    elif method == "delong":
        low, high = delong_delta_ci(hist, confidence)
    else:
        low, high = t["delta"].copy(), t["delta"].copy()
    significant = (q <= fdr) & (t["delta"] >= min_effect)
    n_pairs = t["p_value"].shape[0]
    typical, n_compared = np.full(n_pairs, np.nan), np.zeros(n_pairs, dtype=np.int64)
    if class_auroc is not None:
        typical, n_compared = typical_delta(class_auroc)
        # No other class with images: the rest is empty too, and the rank test already says no.
        significant &= np.where(np.isfinite(typical), typical, -np.inf) >= min_effect
    return Evidence(hist.pair_class, hist.pair_unit, t["auroc"], t["delta"], low, high, t["p_value"], q,
                    t["n_class"], t["n_rest"], t["present_class"], t["present_rest"], significant, method,
                    float(fdr), float(min_effect), int(n_pairs), typical, n_compared)
