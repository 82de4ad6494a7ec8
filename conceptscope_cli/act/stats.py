"""The math behind groups, check-model and diff: plain functions over numpy arrays.

Letter key: N images, C classes, B bootstrap resamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Cut", "youden_cut", "group_ids", "balancing_weights", "balanced_subset", "bootstrap_gap",
           "effect_size", "effect_se", "z_of"]


def z_of(confidence: float) -> float:
    """Two-sided standard-normal quantile for a confidence level (1.96 for 0.95)."""
    from statistics import NormalDist

    return float(NormalDist().inv_cdf(0.5 + confidence / 2))


@dataclass(frozen=True)
class Cut:
    """present ⇔ activation > threshold; j = TPR − FPR of that cut (Youden's J = 2·balanced accuracy − 1)."""

    threshold: float
    j: float
    tpr: float
    fpr: float


def youden_cut(values: np.ndarray, positive: np.ndarray) -> Cut:
    """The cut of `values` (N,) that best separates `positive` (N,) bool from the rest.

    Over every cut between two consecutive distinct observed values, maximise Youden's
    J = TPR − FPR (equivalently balanced accuracy). The threshold is the midpoint of the two
    values bordering the best cut (the first one on ties, i.e. the highest threshold), so it
    depends only on the order of the values: it is scale-free. No positive or no negative
    image: J = 0 and the threshold is the largest value (nothing present).
    """
    values = np.asarray(values, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if values.size == 0:
        return Cut(0.0, 0.0, 0.0, 0.0)
    top = float(values.max())
    if n_pos == 0 or n_neg == 0:
        return Cut(top, 0.0, 0.0, 0.0)
    order = np.argsort(-values, kind="stable")
    v, p = values[order], positive[order]
    tp, fp = np.cumsum(p), np.cumsum(~p)
    last = np.flatnonzero(np.r_[v[1:] != v[:-1], True])  # last index of each run of equal values
    tpr, fpr = tp[last] / n_pos, fp[last] / n_neg
    j = tpr - fpr
    best = int(np.argmax(j))  # first maximum: the highest threshold among equals
    if j[best] <= 0:
        return Cut(top, 0.0, 0.0, 0.0)
    i = last[best]
    below = v[i + 1] if i + 1 < len(v) else v[i] - 1.0
    return Cut(float((v[i] + below) / 2), float(j[best]), float(tpr[best]), float(fpr[best]))


def group_ids(labels: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Group of every image under one claim: 2·label + present (N,) int64 (label ∧ c, label ∧ ¬c)."""
    return 2 * np.asarray(labels, dtype=np.int64) + np.asarray(present, dtype=np.int64)


def balancing_weights(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Inverse group frequency within each class: w_i = n_y / (G_y · n_g) (N,) float64.

    Within class y (n_y images in G_y non-empty groups) every group's weights sum to n_y / G_y,
    so the groups of a class weigh the same and the class keeps its total weight n_y (the mean
    weight is 1 and the class prior is unchanged).
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    weights = np.zeros(len(labels), dtype=np.float64)
    for y in np.unique(labels):
        in_class = labels == y
        ids, inverse, counts = np.unique(groups[in_class], return_inverse=True, return_counts=True)
        weights[in_class] = in_class.sum() / (len(ids) * counts[inverse])
    return weights


def balanced_subset(labels: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Positions (ascending) of a subset where every group of a class has as many images as that
    class's smallest group: a seeded draw without replacement from each larger group."""
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for y in np.unique(labels):
        members = [np.flatnonzero((labels == y) & (groups == g)) for g in np.unique(groups[labels == y])]
        size = min(len(m) for m in members)
        keep.extend(rng.choice(m, size=size, replace=False) for m in members)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Gap:
    """acc(a) − acc(b) with a percentile bootstrap interval; None when a group is empty."""

    gap: float | None
    low: float | None
    high: float | None
    accuracy_a: float | None
    accuracy_b: float | None
    n_a: int
    n_b: int

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def bootstrap_gap(correct_a: np.ndarray, correct_b: np.ndarray, *, n_boot: int, seed: int | tuple[int, ...],
                  confidence: float = 0.95) -> Gap:
    """Accuracy gap between two groups (0/1 correctness arrays) with a stratified bootstrap CI.

    Each group is resampled with replacement on its own (its size fixed), B = `n_boot` times;
    the number of correct images in a resample of a group of n with k correct is exactly
    Binomial(n, k/n), which is drawn directly. CI = the (1−confidence)/2 and (1+confidence)/2
    percentiles of the resampled gaps.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return Gap(None, None, None, float(a.mean()) if a.size else None, float(b.mean()) if b.size else None,
                   int(a.size), int(b.size))
    rng = np.random.default_rng(seed)
    pa, pb = float(a.mean()), float(b.mean())
    gaps = rng.binomial(a.size, pa, n_boot) / a.size - rng.binomial(b.size, pb, n_boot) / b.size  # (B,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(gaps, [tail, 1 - tail])
    return Gap(pa - pb, float(low), float(high), pa, pb, int(a.size), int(b.size))


def effect_size(values: np.ndarray, in_class: np.ndarray) -> float:
    """(mean_y − mean_rest) / sqrt((var_y + var_rest) / 2), population variances; 0 when nothing
    varies or a side is empty (the categorize strength of FORMATS.md, on any activation column)."""
    values = np.asarray(values, dtype=np.float64)
    in_class = np.asarray(in_class, dtype=bool)
    x, r = values[in_class], values[~in_class]
    if x.size == 0 or r.size == 0:
        return 0.0
    scale = np.sqrt((x.var() + r.var()) / 2)
    return float((x.mean() - r.mean()) / scale) if scale > 0 else 0.0


def effect_se(d: float, n_class: int, n_rest: int) -> float:
    """Large-sample standard error of a standardised mean difference (Hedges & Olkin 1985):
    sqrt((n1 + n2) / (n1 n2) + d² / (2 (n1 + n2)))."""
    n1, n2 = max(int(n_class), 1), max(int(n_rest), 1)
    return float(np.sqrt((n1 + n2) / (n1 * n2) + d * d / (2 * (n1 + n2))))


def cliffs_delta(values: np.ndarray, in_class: np.ndarray) -> tuple[float, float]:
    """Cliff's δ = 2·AUROC − 1 of the class's values against the rest (ties count half), and its
    standard error 2·SE(AUROC) by Hanley & McNeil (1982). The variance is evaluated at the
    AUROC shrunk by half an observation, (A·n1·n2 + ½) / (n1·n2 + 1), so a perfect separation
    still gets a non-zero error. (0, 0) when a side is empty; exact, O(N log N)."""
    values = np.asarray(values, dtype=np.float64)
    in_class = np.asarray(in_class, dtype=bool)
    n1, n2 = int(in_class.sum()), int((~in_class).sum())
    if n1 == 0 or n2 == 0:
        return 0.0, 0.0
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mid-ranks of each distinct value
    u = average_rank[inverse][in_class].sum() - n1 * (n1 + 1) / 2.0
    a = u / (n1 * n2)
    s = (a * n1 * n2 + 0.5) / (n1 * n2 + 1)
    q1, q2 = s / (2 - s), 2 * s * s / (1 + s)
    var = (s * (1 - s) + (n1 - 1) * (q1 - s * s) + (n2 - 1) * (q2 - s * s)) / (n1 * n2)
    return float(2 * a - 1), float(2 * np.sqrt(max(var, 0.0)))
