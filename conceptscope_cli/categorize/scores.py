"""Alignment scores and the target / context / bias split of ConceptScope (METHOD §4).

For a class y, its candidate latents c and a seeded sample of its images x:

* ``sim(x) = max_k cos(CLIP_img(x), CLIP_txt(name_k))`` over the class's K name embeddings;
* sufficiency ``S(c) = mean_x sim(x ⊙ m^0.5) / sim(x)``;
* necessity ``N(c) = mean_x sim(x) / sim(x ⊙ (1 − m^0.001))``;
* alignment ``A(c) = (S + N) / 2``, normalised over the class's candidates to ``A′``;
* target if ``A′ ≥ target_threshold`` else context; a context latent is a bias when its concept
  strength ``f̃`` is ``≥ mean(f̃_context) + σ · std(f̃_context)``.

All standard deviations are population ones (``ddof = 0``), as ``numpy.std`` in the reference.
Every function here is pure: no I/O, no model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, Shaped

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]
# Shapes (CONTRIBUTING.md's key): N images, e embedding width, m latents, C classes; in the alignment
# scores the candidates of one class are "K" (written C in the docstrings) and its sampled images "S".

# Similarities with |sim| below this are "zero": a ratio with one in the denominator is dropped.
# CLIP cosines of real images sit around 0.1-0.4, so 1e-4 only catches true degeneracies.
SIM_EPS = 1e-4
# Standard deviations below this are zero: nothing to normalise by, nothing stands out.
STD_EPS = 1e-12
# Slack for ">=" comparisons so that a value equal to its threshold up to rounding (e.g. the
# +1.0 z-score of the larger of two candidates) lands on the documented side.
_TIE_TOL = 1e-9

# Ratio value reported when every term of a latent was dropped: "masking changes nothing".
NEUTRAL_RATIO = 1.0
# Default of `target_threshold`: the paper does not state one; the public reference code uses
# 0.0, and so does the manifest default ([categorize] target_threshold), which users can change.
DEFAULT_TARGET_THRESHOLD = 0.0
DEFAULT_BIAS_SIGMA = 1.0


def _to_numpy(x: Any, dtype: type = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_sparse:
            x = x.to_dense()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Similarities and alignment
# --------------------------------------------------------------------------------------------


def class_similarity(image_emb: Float[ArrayLike, "N e"], text_emb: Float[ArrayLike, "*K e"]) -> Float[np.ndarray, " N"]:
    """Class similarity of each image: max over the class's name embeddings of the cosine.

    Args:
        image_emb: (N, e) image embeddings, normalised or not.
        text_emb: (K, e) embeddings of the class's K names / prompts, normalised or not; a single
            (e,) vector is read as K = 1.

    Returns:
        (N,) float64 ``max_k cos(image_n, text_k)``. A zero-norm embedding has cosine 0 with
        everything (its norm is clamped, so no NaN).
    """
    img = _to_numpy(image_emb)
    txt = _to_numpy(text_emb)
    if txt.ndim == 1:
        txt = txt[None]
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"need image (N, e) and text (K, e) embeddings, got {img.shape} and {txt.shape}")
    if txt.shape[0] == 0:
        raise ValueError("a class needs at least one name embedding")
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
    if img.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    return (img @ txt.T).max(axis=1)


def _masked_mean_std(
    values: np.ndarray, valid: np.ndarray, fallback: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise mean, population std and count of ``values`` (C, S) over ``valid`` entries."""
    count = valid.sum(axis=1)
    safe = np.where(valid, values, 0.0)
    denom = np.maximum(count, 1)
    mean = safe.sum(axis=1) / denom
    var = (np.where(valid, values - mean[:, None], 0.0) ** 2).sum(axis=1) / denom
    mean = np.where(count > 0, mean, fallback)
    std = np.where(count > 0, np.sqrt(var), 0.0)
    return mean, std, count.astype(np.int64)


def alignment_scores(
    sim_orig: Float[ArrayLike, " S"], sim_suff: Float[ArrayLike, "K S"], sim_nec: Float[ArrayLike, "K S"], *,
    eps: float = SIM_EPS,
) -> dict[str, Float[np.ndarray, " K"]]:
    """Sufficiency, necessity and alignment of C latents over S sampled images of one class.

    Args:
        sim_orig: (S,) ``sim(x)`` of the unmasked images.
        sim_suff: (C, S) ``sim(x ⊙ m_c^0.5)``, one row per latent.
        sim_nec: (C, S) ``sim(x ⊙ (1 − m_c^0.001))``.
        eps: similarities with ``|sim| < eps`` count as zero.

    Returns:
        A dict of (C,) arrays:

        * ``sufficiency`` = mean over images of ``sim_suff / sim_orig``;
        * ``necessity`` = mean over images of ``sim_orig / sim_nec``;
        * ``alignment`` = ``(sufficiency + necessity) / 2``;
        * ``sufficiency_std``, ``necessity_std``: population std of the per-image ratios;
        * ``alignment_std``: population std over images of the per-image ``(s_x + n_x) / 2``,
          over the images where both ratios are defined (the reference instead averages the two
          stds);
        * ``sufficiency_count``, ``necessity_count`` (int64): images that entered each mean.

    Degenerate cases (never inf/NaN in the output):

    * a ratio whose denominator is zero (``|.| < eps``) or whose terms are not finite is DROPPED
      from that latent's mean for that ratio only, and the count says how many remained. A zero
      ``sim(x)`` drops image x from every latent's sufficiency; a zero ``sim(x ⊙ (1 − m))`` drops
      (latent, image) from that latent's necessity.
    * when every term of a ratio is dropped (or S = 0) the ratio is ``NEUTRAL_RATIO`` = 1.0
      ("masking changes nothing") with std 0 and count 0; callers should flag count 0.

    Ratios assume positive similarities, as CLIP cosines of an image with its class name are;
    negative ones are used as they are.
    """
    orig = _to_numpy(sim_orig)
    suff = _to_numpy(sim_suff)
    nec = _to_numpy(sim_nec)
    if orig.ndim != 1:
        raise ValueError(f"sim_orig must be (S,), got shape {orig.shape}")
    if suff.ndim == 1 and nec.ndim == 1:
        suff, nec = suff[None], nec[None]
    if suff.shape != nec.shape or suff.ndim != 2 or suff.shape[1] != orig.shape[0]:
        raise ValueError(
            f"sim_suff and sim_nec must be (C, S) with S = {orig.shape[0]}, got {suff.shape} and {nec.shape}"
        )

    with np.errstate(divide="ignore", invalid="ignore"):
        s_terms = suff / orig[None]
        n_terms = orig[None] / nec
    s_valid = (np.abs(orig)[None] >= eps) & np.isfinite(s_terms)
    n_valid = (np.abs(nec) >= eps) & np.isfinite(n_terms)

    s_mean, s_std, s_count = _masked_mean_std(s_terms, s_valid, NEUTRAL_RATIO)
    n_mean, n_std, n_count = _masked_mean_std(n_terms, n_valid, NEUTRAL_RATIO)
    both = s_valid & n_valid
    per_image = (np.where(s_valid, s_terms, 0.0) + np.where(n_valid, n_terms, 0.0)) / 2
    _, a_std, _ = _masked_mean_std(per_image, both, NEUTRAL_RATIO)
    return {
        "sufficiency": s_mean,
        "necessity": n_mean,
        "alignment": (s_mean + n_mean) / 2,
        "sufficiency_std": s_std,
        "necessity_std": n_std,
        "alignment_std": a_std,
        "sufficiency_count": s_count,
        "necessity_count": n_count,
    }


ALIGNMENT_ESTIMATORS = ("robust", "reference")


def robust_alignment(sim_orig: Float[ArrayLike, " S"], sim_suff: Float[ArrayLike, "K S"],
                     sim_nec: Float[ArrayLike, "K S"]) -> dict[str, Float[np.ndarray, " K"]]:
    """Alignment as ratios of sample means (METHOD §Categorization, "stable alignment").

    ``S = mean_x sim(x ⊙ m^0.5) / mean_x sim(x)`` (the share of the class similarity kept by the
    concept's region alone), ``N = 1 − mean_x sim(x ⊙ (1 − m)) / mean_x sim(x)`` (the share lost
    when it is removed), ``A = (S + N) / 2``. The only denominator is the sample's mean class
    similarity, which no single masked image can bring near zero, so a masked similarity of 0.001
    moves A by ~0.001 / (2 · mean sim) instead of the reference's 1 / 0.001.

    Args:
        sim_orig: (S,); sim_suff, sim_nec: (C, S) as in :func:`alignment_scores`.

    Returns:
        (C,) ``sufficiency``, ``necessity``, ``alignment``; all NEUTRAL-free: when the mean class
        similarity is not positive (no image resembles its class name) every score is 0.5.
    """
    orig = _to_numpy(sim_orig)
    suff, nec = np.atleast_2d(_to_numpy(sim_suff)), np.atleast_2d(_to_numpy(sim_nec))
    if orig.ndim != 1 or suff.shape != nec.shape or suff.shape[1] != orig.shape[0]:
        raise ValueError(f"need sim_orig (S,) and (C, S) masked similarities, got {orig.shape}, {suff.shape}, {nec.shape}")
    base = float(orig.mean()) if orig.size else 0.0
    if base <= SIM_EPS:
        half = np.full(suff.shape[0], 0.5)
        return {"sufficiency": half, "necessity": half.copy(), "alignment": half.copy()}
    s = suff.mean(axis=1) / base
    n = 1.0 - nec.mean(axis=1) / base
    return {"sufficiency": s, "necessity": n, "alignment": (s + n) / 2}


def alignment_bootstrap(sim_orig: Float[ArrayLike, " S"], sim_suff: Float[ArrayLike, "K S"],
                        sim_nec: Float[ArrayLike, "K S"], *, estimator: str, seed: int, n_boot: int,
                        confidence: float = 0.95) -> dict[str, Float[np.ndarray, " K"]]:
    """Percentile CIs of A and A′ of every candidate by resampling the class's sampled images.

    One replicate draws S images with replacement (the same draw for every candidate, because A′
    normalises over the candidates) and recomputes A with ``estimator`` and A′ = normalise(A).

    Returns:
        (C,) ``alignment_low``/``alignment_high`` and ``normalised_low``/``normalised_high``.
    """
    orig = _to_numpy(sim_orig)
    suff, nec = np.atleast_2d(_to_numpy(sim_suff)), np.atleast_2d(_to_numpy(sim_nec))
    n_c, n_s = suff.shape
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if n_s == 0:
        zero = np.zeros(n_c)
        return {"alignment_low": zero, "alignment_high": zero.copy(), "normalised_low": zero.copy(),
                "normalised_high": zero.copy()}
    rng = np.random.default_rng([int(seed), 0xA11])
    a = np.zeros((n_boot, n_c))
    z = np.zeros((n_boot, n_c))
    for r in range(n_boot):
        pick = rng.integers(0, n_s, n_s)
        score = alignment(orig[pick], suff[:, pick], nec[:, pick], estimator)
        a[r] = score
        z[r] = normalise(np.where(np.isfinite(score), score, 0.0))
    lo, hi = (1.0 - confidence) / 2.0, 1.0 - (1.0 - confidence) / 2.0
    return {"alignment_low": np.quantile(a, lo, axis=0), "alignment_high": np.quantile(a, hi, axis=0),
            "normalised_low": np.quantile(z, lo, axis=0), "normalised_high": np.quantile(z, hi, axis=0)}


def alignment(sim_orig: Float[ArrayLike, " S"], sim_suff: Float[ArrayLike, "K S"], sim_nec: Float[ArrayLike, "K S"],
              estimator: str) -> Float[np.ndarray, " K"]:
    """(C,) alignment A by ``estimator``: "robust" (:func:`robust_alignment`) or "reference"
    (:func:`alignment_scores`, ConceptScope's mean of per-image ratios)."""
    if estimator == "robust":
        return robust_alignment(sim_orig, sim_suff, sim_nec)["alignment"]
    if estimator == "reference":
        return alignment_scores(sim_orig, sim_suff, sim_nec)["alignment"]
    raise ValueError(f"unknown alignment estimator {estimator!r}; expected one of {ALIGNMENT_ESTIMATORS}")


def normalise(values: Float[ArrayLike, " K"]) -> Float[np.ndarray, " K"]:
    """Z-score ``(v − mean) / std`` over one class's candidates (population std).

    Args:
        values: (C,) finite values (alignment scores).

    Returns:
        (C,) float64. With fewer than two candidates, or a std below ``STD_EPS`` (all equal),
        there is no spread to measure against and the result is all zeros.
    """
    v = _to_numpy(values)
    if v.ndim != 1:
        raise ValueError(f"values must be (C,), got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("values to normalise must be finite")
    if v.shape[0] < 2:
        return np.zeros_like(v)
    std = v.std()
    if std < STD_EPS:
        return np.zeros_like(v)
    return (v - v.mean()) / std


# --------------------------------------------------------------------------------------------
# Categorisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassCategories:
    """Target / context / bias split of one class's candidate latents.

    ``target``, ``context`` and ``bias`` hold latent indices in the order the candidates were
    given (``select_candidates`` ranks them by strength); ``bias ⊂ context``.
    ``normalised_alignment`` is (C,), aligned with ``latents``. ``bias_threshold`` is the strength
    threshold ``mean(f̃_context) + σ · std(f̃_context)`` actually applied, or None when no bias
    can be called (fewer than two context latents, or all context strengths equal).
    """

    latents: list[int]
    target: list[int]
    context: list[int]
    bias: list[int]
    normalised_alignment: np.ndarray
    target_threshold: float
    bias_sigma: float
    bias_threshold: Optional[float]
    notes: list[str] = field(default_factory=list)
    # Candidates whose target / context decision flips inside the CI of A′ (robust estimator only).
    uncertain: list[int] = field(default_factory=list)


def categorize_class(
    latents: ArrayLike,
    alignment: ArrayLike,
    strength: ArrayLike,
    target_threshold: float = DEFAULT_TARGET_THRESHOLD,
    bias_sigma: float = DEFAULT_BIAS_SIGMA,
) -> ClassCategories:
    """Split one class's candidate latents into target, context and bias concepts.

    Args:
        latents: (C,) distinct latent indices (the candidates).
        alignment: (C,) alignment scores A (see :func:`alignment_scores`).
        strength: (C,) concept strengths f̃ (mean activation over the class's images).
        target_threshold: a candidate with normalised alignment ``A′ ≥ target_threshold`` is a
            target. Default 0.0, as in the reference code and the manifest default
            (``[categorize] target_threshold``).
        bias_sigma: σ of the bias rule (reference 1.0).

    Returns:
        :class:`ClassCategories`. Rules and degenerate cases:

        * ``A′ = normalise(A)``; with fewer than two candidates or equal alignments ``A′`` is all
          zeros, so every candidate is a target iff ``target_threshold ≤ 0`` (so with the default
          0.0; every one is context with a positive threshold such as the example's 1.0).
        * bias: a context latent with ``f̃ ≥ mean(f̃_ctx) + σ · std(f̃_ctx)`` (population std).
        * no context latent ⇒ empty bias list (the reference crashes here);
        * exactly one context latent ⇒ no bias: a std over one value is meaningless, so nothing
          can stand out from the other context concepts;
        * all context strengths equal (std < ``STD_EPS``) ⇒ no bias for the same reason.
        * Comparisons are ``≥`` up to a 1e-9 rounding slack.
    """
    lat = _to_numpy(latents, np.int64).reshape(-1)
    a = _to_numpy(alignment).reshape(-1)
    f = _to_numpy(strength).reshape(-1)
    if not (lat.shape == a.shape == f.shape):
        raise ValueError(f"latents, alignment and strength must all be (C,), got {lat.shape}, {a.shape}, {f.shape}")
    if np.unique(lat).shape[0] != lat.shape[0]:
        raise ValueError("candidate latents must be distinct")
    if not np.all(np.isfinite(f)):
        raise ValueError("strengths must be finite")

    notes: list[str] = []
    z = normalise(a)
    if lat.shape[0] < 2:
        notes.append("fewer than two candidates: normalised alignment is 0")
    elif not np.any(z):
        notes.append("all alignments equal: normalised alignment is 0")
    is_target = z >= target_threshold - _TIE_TOL
    target = [int(x) for x in lat[is_target]]
    context_idx = np.flatnonzero(~is_target)
    context = [int(x) for x in lat[context_idx]]

    bias: list[int] = []
    bias_threshold: Optional[float] = None
    f_ctx = f[context_idx]
    if f_ctx.shape[0] == 0:
        notes.append("no context latents: no bias")
    elif f_ctx.shape[0] < 2:
        notes.append("one context latent: no bias can be called")
    elif f_ctx.std() < STD_EPS:
        notes.append("all context strengths equal: no bias can be called")
    else:
        bias_threshold = float(f_ctx.mean() + bias_sigma * f_ctx.std())
        slack = _TIE_TOL * max(1.0, abs(bias_threshold))
        bias = [int(lat[i]) for i in context_idx if f[i] >= bias_threshold - slack]

    return ClassCategories(
        latents=[int(x) for x in lat],
        target=target,
        context=context,
        bias=bias,
        normalised_alignment=z,
        target_threshold=float(target_threshold),
        bias_sigma=float(bias_sigma),
        bias_threshold=bias_threshold,
        notes=notes,
    )


def mark_uncertain(cats: ClassCategories, normalised_low: Float[ArrayLike, " K"],
                   normalised_high: Float[ArrayLike, " K"]) -> ClassCategories:
    """Move every candidate whose CI of A′ contains ``target_threshold`` out of target / context
    (and bias) into ``uncertain``: its decision flips inside its CI.

    Args:
        normalised_low, normalised_high: (C,) CI of A′, aligned with ``cats.latents``.
    """
    lo, hi = _to_numpy(normalised_low).reshape(-1), _to_numpy(normalised_high).reshape(-1)
    t = cats.target_threshold - _TIE_TOL
    flips = {int(lat) for lat, a, b in zip(cats.latents, lo, hi) if a < t <= b}
    if not flips:
        return cats
    return dataclasses.replace(
        cats, target=[x for x in cats.target if x not in flips], context=[x for x in cats.context if x not in flips],
        bias=[x for x in cats.bias if x not in flips], uncertain=[x for x in cats.latents if x in flips])


def dropped_term_notes(latents: ArrayLike, scores: dict[str, np.ndarray], n_sampled: int) -> list[str]:
    """One note per latent whose reference ratios dropped terms (zero or non-finite similarities)."""
    notes = []
    for i, latent in enumerate(_to_numpy(latents, np.int64).reshape(-1)):
        for ratio in ("sufficiency", "necessity"):
            kept = int(scores[f"{ratio}_count"][i])
            if kept < n_sampled:
                notes.append(f"latent {int(latent)}: {n_sampled - kept} of {n_sampled} {ratio} terms dropped "
                             f"(similarity below {SIM_EPS:g} or not finite)")
    return notes


# --------------------------------------------------------------------------------------------
# Strength, candidates, sampling
# --------------------------------------------------------------------------------------------


# Per-latent field of the alignment-scores JSON holding each `[categorize] strength` flavour.
STRENGTH_FIELDS: dict[str, str] = {"mean": "concept_strength", "relative": "relative_strength",
                                   "effect": "effect_size"}


def relative_strength(class_mean: Float[ArrayLike, "C m"], split_mean: Float[ArrayLike, " m"]) -> Float[np.ndarray, "C m"]:
    """Lift of each latent in each class: class mean / split mean ((C, m) / (m,) -> (C, m)).

    A latent that never fires on the split has lift 0.
    """
    cm, sm = _to_numpy(class_mean), _to_numpy(split_mean)
    return np.where(sm > STD_EPS, cm / np.maximum(sm, STD_EPS), 0.0)


def effect_size(class_mean: Float[ArrayLike, "C m"], class_std: Float[ArrayLike, "C m"],
                class_count: Shaped[ArrayLike, " C"]) -> Float[np.ndarray, "C m"]:
    """Standardised difference of each latent's image-level activation, class vs rest of split.

    ``d(c, y) = (mean_y − mean_rest) / sqrt((var_y + var_rest) / 2)`` (Cohen's d with population
    variances), where "rest" is every image of the split not in class y; its mean and variance
    follow exactly from the per-class means, population stds and counts.

    Why it exists: the class mean f̃ favours latents that cover a large area (backgrounds), and
    the lift f̃ / mean favours rare latents, whose few activations can fall into one class by
    chance (in the example, latents firing on 1% of images reached lift 4 and outranked the
    planted star). d asks how far the class's activations stand out from the rest *relative to
    their spread*, so a small object that reliably co-occurs with a class ranks high and a rare,
    noisy latent does not.

    Args:
        class_mean, class_std: (C, m) per-class mean and population std of a(x).
        class_count: (C,) images per class.

    Returns:
        (C, m) float64. 0 where the pooled std is 0 (nothing varies) or the class or its rest is empty.
    """
    mean, std = _to_numpy(class_mean), _to_numpy(class_std)
    n = _to_numpy(class_count)[:, None]
    if mean.shape != std.shape or mean.ndim != 2 or n.shape[0] != mean.shape[0]:
        raise ValueError(f"need (C, m) means and stds and (C,) counts, got {mean.shape}, {std.shape}, {n.shape[:1]}")
    total_n = n.sum()
    total_sum = (n * mean).sum(axis=0)
    total_sq = (n * (std ** 2 + mean ** 2)).sum(axis=0)
    rest_n = total_n - n
    safe_rest = np.maximum(rest_n, 1.0)
    rest_mean = (total_sum - n * mean) / safe_rest
    rest_var = np.maximum((total_sq - n * (std ** 2 + mean ** 2)) / safe_rest - rest_mean ** 2, 0.0)
    pooled = np.sqrt((std ** 2 + rest_var) / 2.0)
    ok = (pooled > STD_EPS) & (rest_n > 0) & (n > 0)
    return np.where(ok, (mean - rest_mean) / np.where(ok, pooled, 1.0), 0.0)


def select_candidates(strength: Float[ArrayLike, " m"], valid_mask: Optional[Bool[ArrayLike, " m"]],
                      k: Optional[int]) -> Int[np.ndarray, " K"]:
    """Candidate latents of a class: valid latents ranked by strength, strongest first.

    Args:
        strength: (m,) concept strengths f̃ of the class.
        valid_mask: (m,) bool, the dictionary's valid latents (None: all latents are valid).
        k: keep the ``k`` strongest (reference: 20); None keeps all.

    Returns:
        (≤ k,) int64 latent indices. Only latents with a finite ``f̃ > 0`` qualify, for any k:
        a latent that never fires on the class has no mask to score. Ties are broken by the
        smaller latent index. Fewer than k qualifying latents ⇒ all of them.
    """
    f = _to_numpy(strength).reshape(-1)
    if valid_mask is None:
        valid = np.ones(f.shape[0], dtype=bool)
    else:
        valid = _to_numpy(valid_mask, bool).reshape(-1)
        if valid.shape != f.shape:
            raise ValueError(f"valid_mask must be (m,) = {f.shape}, got {valid.shape}")
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0 or None, got {k}")
    ok = np.flatnonzero(valid & np.isfinite(f) & (f > 0))
    ranked = ok[np.argsort(-f[ok], kind="stable")]  # ok is ascending, so stable = index tie-break
    return (ranked if k is None else ranked[:k]).astype(np.int64)


def sample_images(class_positions: Int[ArrayLike, " n"], num_samples: int, seed: int, class_id: int) -> Int[np.ndarray, " S"]:
    """Seeded sample of a class's images for the alignment scores.

    Args:
        class_positions: (n,) distinct positions (rows) of the class's images in the split.
        num_samples: how many to draw (``[categorize] num_samples``); always this number, never
            a silent fallback (the reference drops to 20 when activations were not cached).
        seed: project seed (>= 0).
        class_id: class index (>= 0); with the seed it keys ``numpy.random.default_rng([seed,
            class_id])``, so each class gets its own stream, independent of class order.

    Returns:
        Sorted int64 positions: ``min(num_samples, n)`` of them; all images when the class has
        ``n ≤ num_samples``. The same inputs give the same sample on every run and machine.
    """
    # Sorted first so that the sample depends on the set of positions, not on their order.
    pos = np.sort(_to_numpy(class_positions, np.int64).reshape(-1))
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if seed < 0 or class_id < 0:
        raise ValueError(f"seed and class_id must be >= 0, got {seed} and {class_id}")
    if np.unique(pos).shape[0] != pos.shape[0]:
        raise ValueError("class positions must be distinct")
    if pos.shape[0] <= num_samples:
        return pos
    rng = np.random.default_rng([int(seed), int(class_id)])
    pick = rng.choice(pos.shape[0], size=num_samples, replace=False)
    return np.sort(pos[pick])
