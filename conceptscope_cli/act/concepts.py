"""The concept behind a bias claim: the claim's latent and the valid latents that fire with it.

An SAE splits one visual concept over several latents, and each carries its own class-dependent
offset (measured on the embedded example, seed 0: latent #271 "sand" ranks sand images first
within every class, per-class AUROC ≥ 0.965, but its sand-free rings sit at a median of 0.32
against 0.09 elsewhere, so no single cut on it agrees with sand on more than 0.77 of some class's
images). A claim therefore stands for its **neighbourhood**: its latents (one, or a concept group's) and
every valid latent whose pooled within-class correlation with one of them has a one-sided Fisher
lower bound ≥ the dictionary's `[dict] group_threshold` (the similarity and bound of METHOD
§Concept groups, linked to the claim's latents only: a member must co-fire with them, not with
every other member). Its activation is the sum of the members' (as for a concept group). A
neighbourhood is kept only when it is itself over-represented in the claim's class on the
categorized split (Cliff's δ lower 95% bound > 0); otherwise the claim stays as listed.

Letter key: N images, K anchors (claim latents), m_v valid latents, L label slots.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch

from conceptscope_cli.act import stats as A
from conceptscope_cli.act.claims import BiasClaim
from conceptscope_cli.dictionary import groups as G


def neighbour_bounds(source: G.CSRSource, anchors: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """Fisher lower bounds (K, m_v) of the pooled within-class correlation between every anchor
    latent and every latent of `latents`, in one pass over the CSR (a sparse product per row block,
    memory O(K · m_v)); the dictionary's own estimator (`dictionary.groups`)."""
    anchors = np.asarray(anchors, dtype=np.int64)
    latents = np.asarray(latents, dtype=np.int64)
    both = np.unique(np.r_[anchors, latents])
    sums = G.label_sums(source, both)
    column_of = np.full(source.n_latents, -1, dtype=np.int64)
    column_of[both] = np.arange(len(both))
    a_col, l_col = column_of[anchors], column_of[latents]
    anchor_of = np.full(len(both), -1, dtype=np.int64)
    anchor_of[a_col] = np.arange(len(anchors))
    gram = torch.zeros(len(anchors) * len(both), dtype=torch.float64)  # Σ_x a_k(x) a_j(x), (K, m_both) flat
    for start, stop, indptr, indices, values in G.iter_csr_blocks(source):
        indptr, cols, vals = G.restrict_block(indptr, indices, values, column_of)
        rows = np.repeat(np.arange(stop - start), np.diff(indptr))
        hit = anchor_of[cols] >= 0
        if not hit.any():
            continue
        # The anchors' part of the block transposed (K × b, CSR; a stable sort keeps rows ascending)
        # times the block (b × m_both): a sparse × sparse product, work Σ_rows nnz_anchors · nnz.
        ac, ar, av = anchor_of[cols[hit]], rows[hit], vals[hit]
        order = np.argsort(ac, kind="stable")
        t_indptr = np.concatenate([[0], np.cumsum(np.bincount(ac, minlength=len(anchors)))]).astype(np.int64)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is tested
            warnings.simplefilter("ignore", UserWarning)
            block = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols), torch.from_numpy(vals),
                                            size=(stop - start, len(both)), check_invariants=False)
            left = torch.sparse_csr_tensor(torch.from_numpy(t_indptr), torch.from_numpy(ar[order]),
                                           torch.from_numpy(av[order]), size=(len(anchors), stop - start),
                                           check_invariants=False)
            prod = (left @ block).to_sparse_coo().coalesce()
        pi, pj = prod.indices()
        gram.index_add_(0, pi * len(both) + pj, prod.values())
    gram_np = gram.reshape(len(anchors), len(both)).numpy()
    n = np.maximum(sums.counts, 1).astype(np.float64)
    scaled = sums.sums / np.sqrt(n)[:, None]  # (L, m_both)
    scatter = gram_np - scaled[:, a_col].T @ scaled  # (K, m_both)
    scale = np.sqrt(sums.scatter_diag)
    ok = scale > 1e-12 * max(1.0, float(scale.max(initial=0.0)))
    inv = np.where(ok, 1.0 / np.where(ok, scale, 1.0), 0.0)
    corr = np.clip(scatter * inv[a_col][:, None] * inv[None, :], -1.0, 1.0)[:, l_col]
    return G.fisher_lower_bound(corr, sums.dof)


def neighbourhoods(source: G.CSRSource, claims: list[BiasClaim], latents: np.ndarray, threshold: float
                   ) -> list[BiasClaim]:
    """Every claim widened to its neighbourhood: its latents and every latent of `latents` whose
    bound with one of them reaches `threshold` (concept `n<concept>`, the listed latents kept in
    `listed`); a claim nothing joins unchanged; a class's claims with the same members kept once."""
    anchors = sorted({k for c in claims for k in c.members})
    latents = np.asarray(latents, dtype=np.int64)
    bounds = neighbour_bounds(source, np.array(anchors, dtype=np.int64), latents) if anchors and len(latents) else None
    row = {k: i for i, k in enumerate(anchors)}
    out: list[BiasClaim] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for claim in claims:
        if bounds is not None:
            joined = (bounds[[row[k] for k in claim.members]] >= threshold).any(0)
            members = tuple(sorted({*claim.members, *latents[joined].tolist()}))
            if len(members) > len(claim.members):
                claim = replace(claim, concept=f"n{claim.concept}", members=members, listed=claim.members)
        if (claim.label, claim.members) in seen:
            continue
        seen.add((claim.label, claim.members))
        out.append(claim)
    return out


def confirmed_groups(lifted: list[BiasClaim], latent_claims: list[BiasClaim], values: dict[str, np.ndarray],
                     labels: np.ndarray, z: float = 1.959964) -> list[BiasClaim]:
    """Keep a widened claim only when that concept itself is over-represented in the class on the
    categorized split (Cliff's δ lower 95% bound > 0); otherwise the listed claims that were widened
    into it stay as listed (a latent can be a class ∧ context conjunction whose neighbours, the
    context alone, are not a bias of the class)."""
    out: list[BiasClaim] = []
    native = {c.key for c in latent_claims}  # claims the categorization made itself are not second-guessed
    for claim in lifted:
        if claim.key in native:
            out.append(claim)
            continue
        d, se = A.cliffs_delta(values[claim.key], labels == claim.label)
        if d - z * se > 0:
            out.append(claim)
            continue
        out.extend(c for c in latent_claims if c.label == claim.label and set(c.members) <= set(claim.members)
                   and c.key not in {o.key for o in out})
    return out


def claim_concepts(matrix: G.CSRSource, latent_claims: list[BiasClaim], latents: np.ndarray | None,
                   threshold: float) -> tuple[list[BiasClaim], dict[str, np.ndarray]]:
    """The claims to group by (neighbourhoods confirmed on `matrix`, the categorized split's
    latents) and the image-level activation (N,) of every claim considered, by key.
    `latents` None (a dictionary without its valid latents): the claims as listed."""
    from conceptscope_cli.act.groups import concept_columns

    lifted = latent_claims if latents is None else neighbourhoods(matrix, latent_claims, latents, threshold)
    values = concept_columns(matrix, {c.key: c.members for c in lifted + latent_claims})
    labels = np.asarray(matrix.labels)
    return confirmed_groups(lifted, latent_claims, values, labels), values
