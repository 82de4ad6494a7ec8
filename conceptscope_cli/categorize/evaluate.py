"""Bias-discovery precision@k of the ConceptScope paper (METHOD §5).

Definition implemented by :func:`bias_discovery_precision`:

For every ordered pair of distinct classes (c, c′) from the class list:

1. ``X_c`` = the test images whose label is c, ``n_c = |X_c|``; ``k_c = min(k, n_c)``.
2. For each bias latent b of c′ (found on the training split), rank ``X_c`` by the image-level
   activation ``a_b(x)``, largest first; ties are broken by the smaller test position, NaN ranks
   last. ``P_b`` = (number of the first ``k_c`` images whose context label is c′) / ``k_c``.
3. ``P(c, c′) = max_b P_b``.

The reported precision is the unweighted mean of ``P(c, c′)`` over the evaluated pairs. A pair is
skipped (and listed) when c has no test images, or when c′ has no bias latent; those skips are
not scored as 0. When nothing is evaluated the precision is None.

Differences from the reference code, on purpose: a class with fewer than k test images is scored
on all its images (``k_c`` in the denominator, not k); a class without bias latents is skipped
instead of crashing; ties are broken deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class PairPrecision:
    """Precision@k of one pair: images of ``class_id`` ranked by the bias latents of ``bias_class``."""

    class_id: int
    bias_class: int
    precision: float  # max over the bias latents of bias_class
    best_latent: int  # the latent reaching it (first in the given order on ties)
    k: int  # images in the top list: min(k, num_images)
    num_images: int  # test images of class_id
    per_latent: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BiasDiscoveryResult:
    """Overall precision@k (None when no pair could be scored) and the per-pair table."""

    precision: Optional[float]
    std: Optional[float]  # population std of the pair precisions (as the reference reports)
    k: int
    pairs: list[PairPrecision]
    skipped_no_bias: list[tuple[int, int]]  # (c, c′) where c′ has no bias latent
    skipped_no_images: list[tuple[int, int]]  # (c, c′) where c has no test image

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def table(self) -> list[dict[str, object]]:
        """The per-pair rows as plain dicts (for JSON / CSV)."""
        return [
            {
                "class": p.class_id,
                "bias_class": p.bias_class,
                "precision": p.precision,
                "best_latent": p.best_latent,
                "k": p.k,
                "num_images": p.num_images,
            }
            for p in self.pairs
        ]


def top_k_precision(scores: np.ndarray, context: np.ndarray, target: int, k: int) -> tuple[float, int]:
    """Fraction of the ``min(k, n)`` highest-scoring images whose context label is ``target``.

    Args:
        scores: (n,) activations; NaN ranks last, ties go to the smaller position.
        context: (n,) context labels of the same images.
        target: the context label that counts as a hit.
        k: list length.

    Returns:
        ``(precision, k_used)``; ``(0.0, 0)`` when n = 0.
    """
    n = scores.shape[0]
    k_used = min(int(k), n)
    if k_used == 0:
        return 0.0, 0
    key = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-key, kind="stable")[:k_used]
    return float(np.count_nonzero(context[order] == target)) / k_used, k_used


def bias_discovery_precision(
    bias_latents: Mapping[int, Sequence[int]],
    labels: np.ndarray,
    context_labels: np.ndarray,
    activation: Callable[[int], np.ndarray],
    k: int = 10,
    classes: Optional[Sequence[int]] = None,
) -> BiasDiscoveryResult:
    """Bias-discovery precision@k over all ordered class pairs (definition in the module docstring).

    Args:
        bias_latents: class id -> its bias latents (from the training-split categorisation). A
            class absent or mapped to an empty list has none.
        labels: (N,) class id of each test image.
        context_labels: (N,) for each test image, the class whose bias its context attribute value
            is (e.g. "place=water" -> waterbird); any value that is not a class id (e.g. -1)
            means "no class's bias" and never counts as a hit.
        activation: latent -> (N,) image-level activation of that latent over the test images;
            called at most once per latent.
        k: length of the top list (paper: 10).
        classes: the class ids to pair up; default: the union of the labels present and the keys
            of ``bias_latents``, ascending.

    Returns:
        :class:`BiasDiscoveryResult` with the mean precision over evaluated pairs, their std,
        the per-pair table and the skipped pairs.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = np.asarray(labels).reshape(-1)
    context_labels = np.asarray(context_labels).reshape(-1)
    if labels.shape != context_labels.shape:
        raise ValueError(f"labels and context_labels must both be (N,), got {labels.shape} and {context_labels.shape}")
    n_total = labels.shape[0]
    if classes is None:
        class_ids = sorted({int(c) for c in np.unique(labels)} | {int(c) for c in bias_latents})
    else:
        class_ids = [int(c) for c in classes]

    cache: dict[int, np.ndarray] = {}

    def act(latent: int) -> np.ndarray:
        if latent not in cache:
            values = np.asarray(activation(latent), dtype=np.float64).reshape(-1)
            if values.shape[0] != n_total:
                raise ValueError(f"activation({latent}) has {values.shape[0]} values for {n_total} test images")
            cache[latent] = values
        return cache[latent]

    pairs: list[PairPrecision] = []
    skipped_no_bias: list[tuple[int, int]] = []
    skipped_no_images: list[tuple[int, int]] = []
    for c in class_ids:
        members = np.flatnonzero(labels == c)
        for c2 in class_ids:
            if c2 == c:
                continue
            if members.shape[0] == 0:
                skipped_no_images.append((c, c2))
                continue
            latents = [int(b) for b in bias_latents.get(c2, [])]
            if not latents:
                skipped_no_bias.append((c, c2))
                continue
            per_latent: dict[int, float] = {}
            k_used = 0
            for b in latents:
                per_latent[b], k_used = top_k_precision(act(b)[members], context_labels[members], c2, k)
            best = max(per_latent, key=lambda b: per_latent[b])  # first maximum in the given order
            pairs.append(
                PairPrecision(
                    class_id=c,
                    bias_class=c2,
                    precision=per_latent[best],
                    best_latent=best,
                    k=k_used,
                    num_images=int(members.shape[0]),
                    per_latent=per_latent,
                )
            )

    values = np.array([p.precision for p in pairs], dtype=np.float64)
    return BiasDiscoveryResult(
        precision=float(values.mean()) if values.size else None,
        std=float(values.std()) if values.size else None,
        k=int(k),
        pairs=pairs,
        skipped_no_bias=skipped_no_bias,
        skipped_no_images=skipped_no_images,
    )
