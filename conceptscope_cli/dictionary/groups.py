"""Concepts, not latents: group the latents that fire on the same images (METHOD §Concept groups).

An SAE often splits one concept into several latents (the embedded example's circle class has
15 context latents all named "water"). This module groups valid latents by the **pooled
within-class correlation** of their image-level activations a(x):

    r_w(i, j) = Σ_y Σ_{x∈y} (a_i(x) − μ_iy)(a_j(x) − μ_jy) / sqrt(S_ii · S_jj)

with μ_iy the mean of latent i over the images of class y (unlabelled images form one more
group). Removing the class means is the point: a planted bias co-occurs with its class by
definition (most circles are on water), so the plain correlation over the split links the
bias latent to the class's target latent; within classes the two vary independently.
Two latents may join one group only when the one-sided 99% Fisher lower confidence bound of
r_w reaches `threshold` (so a small split needs a clearer correlation), and groups are built
by complete linkage: **every pair of members** passes that test. Everything is scale free:
correlations do not depend on activation units, the bound depends only on the image count.

The Gram matrix X^T X of the CSR latents, restricted to the valid latents, is accumulated
block by block in float64 with a sparse × sparse product: work O(Σ_rows nnz²), memory
O(m_v²) (m_v valid latents) plus one block's working arrays (`sparse.STREAM_BLOCK_NNZ` stored
values) whatever the number of images: nothing of length N or nnz is allocated (label slots are
taken per block), so the pass's peak is flat in N once a block is full (~1,100 images of 116
active latents).

A group's image-level activation is the **sum** of its members' activations: members of a
split concept fire on (partly) different images with comparable scales, so the sum is the
union detector, it is linear (class means of a group are sums of member class means, and a
group's CSR row is one O(nnz) pass), and with one member it is the latent itself.
The representative (name and tile) is the member with the largest total activation, i.e. the
largest share of the group's activation.

Pure functions over arrays; the file format lives in `dictionary/group_file.py`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from jaxtyping import Float, Int

from conceptscope_cli.devices import HeapWatch
from conceptscope_cli.dictionary.sparse import STREAM_BLOCK_NNZ

# One-sided 99% normal quantile of the Fisher lower confidence bound.
FISHER_Z = 2.326
# Default linkage threshold on that bound (`[dict] group_threshold`), see METHOD §Concept groups.
DEFAULT_THRESHOLD = 0.3
# Stored values per block of these passes: the streaming passes' block (~100 bytes of working
# arrays per value, ~13 MB). It was 2^20, which held the whole split below ~9,000 images, so the
# Gram pass's peak grew with the split up to there (README "Scaling out").
_BLOCK_NNZ = STREAM_BLOCK_NNZ


class CSRSource(Protocol):
    """What the grouping reads: `LatentMatrix` (conceptscope_cli/dictionary/sparse.py) satisfies it."""

    n_images: int
    n_latents: int
    labels: np.ndarray

    @property
    def nnz(self) -> int: ...

    def csr_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass
class GramResult:
    """Sufficient statistics of the valid latents' image-level activations.

    gram (m_v, m_v) float64 Σ_x a(x) a(x)^T; sums (L, m_v) float64 per label group (the last
    row holds the unlabelled images); counts (L,) int64; latents (m_v,) the latent ids.
    """

    latents: np.ndarray
    gram: np.ndarray
    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_images(self) -> int:
        return int(self.counts.sum())


def _block_rows(source: CSRSource, nnz_per_block: int) -> int:
    per_row = source.nnz / max(source.n_images, 1)
    return int(max(64, min(1 << 20, nnz_per_block / max(per_row, 1.0))))


def _n_label_slots(source: CSRSource) -> int:
    """Label slots L: classes 0..C-1, then one slot for label -1 (no array of length N made)."""
    return int(np.max(source.labels, initial=-1)) + 2


def _block_slots(source: CSRSource, start: int, stop: int, n_labels: int) -> np.ndarray:
    """(stop - start,) int64 label slot of each row of a block (−1 -> the last slot)."""
    labels = np.asarray(source.labels[start:stop], dtype=np.int64)
    return np.where(labels >= 0, labels, n_labels - 1)


def iter_csr_blocks(source: CSRSource, nnz_per_block: int = _BLOCK_NNZ
                    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """(start, stop, indptr, indices, values) row blocks of about `nnz_per_block` stored values."""
    step = _block_rows(source, nnz_per_block)
    for start in range(0, source.n_images, step):
        stop = min(start + step, source.n_images)
        indptr, indices, values = source.csr_block(start, stop)
        yield start, stop, np.asarray(indptr, dtype=np.int64), np.asarray(indices), np.asarray(values)


def restrict_block(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, column_of: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the entries whose latent has a column (`column_of[latent] >= 0`), renumbered; O(nnz)."""
    cols = column_of[np.asarray(indices, dtype=np.int64)]
    keep = cols >= 0
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))[keep]
    new_indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(indptr) - 1))]).astype(np.int64)
    return new_indptr, cols[keep], np.asarray(values, dtype=np.float64)[keep]


def gram_statistics(source: CSRSource, latents: np.ndarray, *, nnz_per_block: int = _BLOCK_NNZ) -> GramResult:
    """X^T X, per-label sums and counts of the image-level activations of `latents`, in one pass.

    Args:
        source: the CSR latents (N × m), read in row blocks.
        latents: (m_v,) distinct latent ids (the valid latents).

    The product of each block is sparse × sparse (torch CSR), so the work is the sum over rows
    of (row nnz among `latents`)², never N × m_v; the accumulators are (m_v, m_v) and
    (L, m_v) float64.
    """
    latents = np.asarray(latents, dtype=np.int64)
    m_v = len(latents)
    column_of = np.full(source.n_latents, -1, dtype=np.int64)
    column_of[latents] = np.arange(m_v)
    n_labels = _n_label_slots(source)
    gram = torch.zeros(m_v * m_v, dtype=torch.float64)
    sums = torch.zeros(n_labels * m_v, dtype=torch.float64)
    counts = np.zeros(n_labels, dtype=np.int64)
    for start, stop, indptr, indices, values in iter_csr_blocks(source, nnz_per_block):
        slot = _block_slots(source, start, stop, n_labels)
        counts += np.bincount(slot, minlength=n_labels)
        indptr, cols, vals = restrict_block(indptr, indices, values, column_of)
        if len(cols) == 0:
            continue
        rows = np.repeat(np.arange(stop - start), np.diff(indptr))
        sums.index_add_(0, torch.from_numpy(slot[rows] * m_v + cols), torch.from_numpy(vals))
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product below is tested
            warnings.simplefilter("ignore", UserWarning)
            a = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols), torch.from_numpy(vals),
                                        size=(stop - start, m_v), check_invariants=False)
            g = (a.t() @ a).to_sparse_coo().coalesce()
        i, j = g.indices()
        gram.index_add_(0, i * m_v + j, g.values())
    return GramResult(latents, gram.reshape(m_v, m_v).numpy(), sums.reshape(n_labels, m_v).numpy(), counts)


def within_class_correlation(stats: GramResult) -> tuple[Float[np.ndarray, "v v"], int]:
    """Pooled within-class correlation (m_v, m_v) and its degrees of freedom N − L.

    Scatter S = X^T X − Σ_y s_y s_y^T / n_y (s_y the label group's sums); r = S_ij / sqrt(S_ii S_jj).
    A latent constant within every class (S_ii = 0) has correlation 0 with every other, 1 with
    itself. An unlabelled split is one group: r is then the plain correlation over the split.
    """
    n = np.maximum(stats.counts, 1).astype(np.float64)
    scaled = stats.sums / np.sqrt(n)[:, None]
    scatter = stats.gram - scaled.T @ scaled
    scale = np.sqrt(np.clip(np.diag(scatter), 0.0, None))
    ok = scale > 1e-12 * max(1.0, float(scale.max(initial=0.0)))
    inv = np.where(ok, 1.0 / np.where(ok, scale, 1.0), 0.0)
    corr = np.clip(scatter * inv[:, None] * inv[None, :], -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    dof = int(stats.counts.sum()) - int((stats.counts > 0).sum())
    return corr, dof


def fisher_lower_bound(corr: Float[np.ndarray, "*shape"], dof: int, z: float = FISHER_Z) -> Float[np.ndarray, "*shape"]:
    """One-sided lower confidence bound of correlations from `dof` (≈ N − classes) images:
    tanh(atanh(r) − z / sqrt(dof − 2)); −1 when dof ≤ 3 (too few images to trust any correlation)."""
    if dof <= 3:
        return np.full_like(corr, -1.0)
    r = np.clip(corr, -1 + 1e-12, 1 - 1e-12)
    return np.tanh(np.arctanh(r) - z / math.sqrt(dof - 2))


def complete_linkage(similarity: np.ndarray, threshold: float) -> list[list[int]]:
    """Agglomerative clustering with complete linkage, cut at `threshold`.

    Args:
        similarity: (k, k) symmetric; the diagonal is ignored.
        threshold: two clusters merge only while the smallest similarity between their members
            is ≥ threshold; the most similar pair of clusters merges first (ties: lowest indices).

    Returns:
        Clusters as sorted index lists, ordered by their smallest index. Exact (the same result
        as a full dendrogram cut at `threshold`); clusters are built inside connected components
        of the graph {similarity ≥ threshold}, which complete linkage never crosses, with a cached
        best partner per cluster, so a sparse graph costs far less than the dense O(k³).
    """
    s = np.asarray(similarity, dtype=np.float64)
    k = s.shape[0]
    if s.shape != (k, k):
        raise ValueError(f"similarity must be square, got {s.shape}")
    edges = s >= threshold
    np.fill_diagonal(edges, False)
    component = _components(edges)
    clusters: list[list[int]] = []
    for comp in component:
        if len(comp) == 1:
            clusters.append(comp)
            continue
        clusters.extend(_complete_linkage_dense(s[np.ix_(comp, comp)], threshold, comp))
    return sorted((sorted(c) for c in clusters), key=lambda c: c[0])


def _components(edges: np.ndarray) -> list[list[int]]:
    """Connected components of a boolean adjacency matrix (union-find over its edges)."""
    k = edges.shape[0]
    parent = np.arange(k)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    for i, j in zip(*np.nonzero(np.triu(edges, 1))):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots: dict[int, list[int]] = {}
    for x in range(k):
        roots.setdefault(find(x), []).append(x)
    return list(roots.values())


def _complete_linkage_dense(s: np.ndarray, threshold: float, ids: list[int]) -> list[list[int]]:
    k = s.shape[0]
    s = s.copy()
    np.fill_diagonal(s, -np.inf)
    alive = np.ones(k, dtype=bool)
    members = {i: [ids[i]] for i in range(k)}
    best = s.argmax(1)
    best_value = s[np.arange(k), best]
    while True:
        value = np.where(alive, best_value, -np.inf)
        i = int(value.argmax())
        if value[i] < threshold:
            break
        j = int(best[i])
        a, b = min(i, j), max(i, j)
        # Complete linkage (Lance-Williams): the merged cluster's similarity to c is the minimum.
        s[a] = np.minimum(s[a], s[b])
        s[:, a] = s[a]
        s[a, a] = -np.inf
        s[b] = -np.inf
        s[:, b] = -np.inf
        alive[b] = False
        members[a] += members.pop(b)
        # Similarities only fall on a merge: only rows whose best partner was a or b change.
        stale = alive & ((best == a) | (best == b))
        stale[a] = True
        for r in np.flatnonzero(stale):
            best[r] = int(s[r].argmax())
            best_value[r] = s[r, best[r]]
    return list(members.values())


@dataclass(frozen=True)
class ConceptGroup:
    """One concept: latents that fire on the same images.

    members: latent ids, largest share first (members[0] is the representative); shares (same
    order): each member's fraction of the group's total activation over the split;
    min_correlation / mean_correlation: smallest / mean pairwise within-class correlation of
    the members (1.0 for a single latent).
    """

    id: int
    members: tuple[int, ...]
    shares: tuple[float, ...]
    min_correlation: float
    mean_correlation: float
    name: str | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def representative(self) -> int:
        return self.members[0]


@dataclass
class LabelSums:
    """Per-label sums (L, m_v), counts (L,) and sums of squares (m_v,) of the latents' activations
    (last label slot: unlabelled images); `latents` (m_v,) the latent ids."""

    latents: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    sumsq: np.ndarray

    @property
    def scatter_diag(self) -> np.ndarray:
        """Within-class sum of squares S_ii = Σ x² − Σ_y s_y² / n_y, (m_v,)."""
        n = np.maximum(self.counts, 1).astype(np.float64)[:, None]
        return np.clip(self.sumsq - (self.sums ** 2 / n).sum(0), 0.0, None)

    @property
    def dof(self) -> int:
        return int(self.counts.sum()) - int((self.counts > 0).sum())


@dataclass
class Edges:
    """The pairs (i < j, column indices into `LabelSums.latents`) whose correlation bound reaches the
    threshold: `corr` the within-class correlation, `bound` its Fisher lower bound."""

    i: np.ndarray
    j: np.ndarray
    corr: np.ndarray
    bound: np.ndarray


def label_sums(source: CSRSource, latents: np.ndarray, *, nnz_per_block: int = _BLOCK_NNZ) -> LabelSums:
    """One O(nnz) pass: per-label sums, counts and sums of squares of `latents`."""
    latents = np.asarray(latents, dtype=np.int64)
    m_v = len(latents)
    column_of = np.full(source.n_latents, -1, dtype=np.int64)
    column_of[latents] = np.arange(m_v)
    n_labels = _n_label_slots(source)
    sums = torch.zeros(n_labels * m_v, dtype=torch.float64)
    sumsq = np.zeros(m_v, dtype=np.float64)
    counts = np.zeros(n_labels, dtype=np.int64)
    for start, stop, indptr, indices, values in iter_csr_blocks(source, nnz_per_block):
        slot = _block_slots(source, start, stop, n_labels)
        counts += np.bincount(slot, minlength=n_labels)
        indptr, cols, vals = restrict_block(indptr, indices, values, column_of)
        rows = np.repeat(np.arange(stop - start), np.diff(indptr))
        sums.index_add_(0, torch.from_numpy(slot[rows] * m_v + cols), torch.from_numpy(vals))
        sumsq += np.bincount(cols, weights=vals * vals, minlength=m_v)
    return LabelSums(latents, sums.reshape(n_labels, m_v).numpy(), counts, sumsq)


def correlation_edges(source: CSRSource, latents: np.ndarray, threshold: float, *, memory_bytes: int = 1 << 29,
                      nnz_per_block: int = _BLOCK_NNZ) -> tuple[Edges, LabelSums]:
    """Pairs of `latents` whose pooled within-class correlation has a Fisher lower bound ≥ threshold.

    The Gram matrix is built in row tiles X[:, I]^T X of at most `memory_bytes` (float64), one pass
    over the CSR per tile: memory is bounded by the budget, not by m_v² or N; the total product
    work is Σ_rows nnz² whatever the tiling. Only the edges are kept.
    """
    latents = np.asarray(latents, dtype=np.int64)
    m_v = len(latents)
    sums = label_sums(source, latents, nnz_per_block=nnz_per_block)
    empty = np.zeros(0, dtype=np.int64)
    if m_v < 2 or sums.dof <= 3:
        return Edges(empty, empty, np.zeros(0), np.zeros(0)), sums
    column_of = np.full(source.n_latents, -1, dtype=np.int64)
    column_of[latents] = np.arange(m_v)
    n = np.maximum(sums.counts, 1).astype(np.float64)
    scaled = sums.sums / np.sqrt(n)[:, None]  # (L, m_v): scatter = G − scaled^T scaled
    scale = np.sqrt(sums.scatter_diag)
    ok = scale > 1e-12 * max(1.0, float(scale.max(initial=0.0)))
    inv = np.where(ok, 1.0 / np.where(ok, scale, 1.0), 0.0)
    tile = int(max(1, min(m_v, memory_bytes // (8 * m_v))))
    out_i, out_j, out_c = [], [], []
    heap = HeapWatch()  # the blocks' products leave their buffers' holes behind: trimmed if they pile up
    for t0 in range(0, m_v, tile):
        t1 = min(t0 + tile, m_v)
        g = torch.zeros((t1 - t0) * m_v, dtype=torch.float64)
        for start, stop, indptr, indices, values in iter_csr_blocks(source, nnz_per_block):
            indptr, cols, vals = restrict_block(indptr, indices, values, column_of)
            if len(cols) == 0:
                continue
            left = (cols >= t0) & (cols < t1)
            if not left.any():
                continue
            rows = np.repeat(np.arange(stop - start), np.diff(indptr))
            # X[:, I]^T as CSR (tile latents x block rows), transposed here: a stable sort keeps the
            # rows ascending within each latent (3x faster than torch's transposed product, measured).
            lc, lr, lv = cols[left] - t0, rows[left], vals[left]
            order = np.argsort(lc, kind="stable")
            t_indptr = np.concatenate([[0], np.cumsum(np.bincount(lc, minlength=t1 - t0))]).astype(np.int64)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is tested
                warnings.simplefilter("ignore", UserWarning)
                a = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols), torch.from_numpy(vals),
                                            size=(stop - start, m_v), check_invariants=False)
                a_left_t = torch.sparse_csr_tensor(torch.from_numpy(t_indptr), torch.from_numpy(lr[order]),
                                                   torch.from_numpy(lv[order]), size=(t1 - t0, stop - start),
                                                   check_invariants=False)
                prod = (a_left_t @ a).to_sparse_coo().coalesce()
            pi, pj = prod.indices()
            g.index_add_(0, pi * m_v + pj, prod.values())
            del a, a_left_t, prod, pi, pj
            heap.check()
        scatter = g.reshape(t1 - t0, m_v).numpy() - scaled[:, t0:t1].T @ scaled
        corr = np.clip(scatter * inv[t0:t1, None] * inv[None, :], -1.0, 1.0)
        bound = fisher_lower_bound(corr, sums.dof)
        ii, jj = np.nonzero(bound >= threshold)
        ii = ii + t0
        keep = jj > ii
        out_i.append(ii[keep])
        out_j.append(jj[keep])
        out_c.append(corr[ii[keep] - t0, jj[keep]])
    i, j, c = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_c)
    return Edges(i, j, c, fisher_lower_bound(c, sums.dof)), sums


def sparse_complete_linkage(n: int, edges: Edges, threshold: float) -> list[list[int]]:
    """`complete_linkage` on a graph given by its edges (weights = `edges.bound`; a missing pair is
    below the threshold, which is all complete linkage needs to know about it)."""
    adjacency: dict[int, list[int]] = {}
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    for a, b in zip(edges.i.tolist(), edges.j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    for x in range(n):
        adjacency.setdefault(find(x), []).append(x)
    root = np.array([find(x) for x in range(n)], dtype=np.int64)
    clusters: list[list[int]] = []
    for members in adjacency.values():
        if len(members) == 1:
            clusters.append(members)
            continue
        local = {m: k for k, m in enumerate(members)}
        dense = np.full((len(members), len(members)), -np.inf)
        sel = root[edges.i] == root[members[0]]
        li = np.array([local[int(v)] for v in edges.i[sel]], dtype=np.int64)
        lj = np.array([local[int(v)] for v in edges.j[sel]], dtype=np.int64)
        dense[li, lj] = edges.bound[sel]
        dense[lj, li] = edges.bound[sel]
        clusters.extend(_complete_linkage_dense(dense, threshold, members))
    return sorted((sorted(c) for c in clusters), key=lambda c: c[0])


def build_groups(edges: Edges, sums: LabelSums, threshold: float = DEFAULT_THRESHOLD, *, enabled: bool = True
                 ) -> list[ConceptGroup]:
    """Concept groups of the latents of `sums` (all of them: every latent is in one group).

    enabled=False: every latent is its own group (`[dict] group_latents = false`).
    Groups are ordered by their representative's latent id; ids are 0..G−1 in that order.
    """
    m_v = len(sums.latents)
    clusters = sparse_complete_linkage(m_v, edges, threshold) if enabled else [[i] for i in range(m_v)]
    corr_of = {(int(a), int(b)): float(c) for a, b, c in zip(edges.i, edges.j, edges.corr)}
    total = sums.sums.sum(0)  # (m_v,) total activation of each latent over the split
    made = []
    for cols in clusters:
        order = sorted(cols, key=lambda c: (-total[c], sums.latents[c]))
        mass = float(total[order].sum())
        shares = tuple(float(total[c] / mass) if mass > 0 else 1.0 / len(order) for c in order)
        # Complete linkage: every member pair is an edge, so its correlation is known.
        pair = [corr_of[(min(a, b), max(a, b))] for k, a in enumerate(order) for b in order[k + 1:]]
        made.append((int(sums.latents[order[0]]), tuple(int(sums.latents[c]) for c in order), shares,
                     min(pair) if pair else 1.0, float(np.mean(pair)) if pair else 1.0))
    made.sort(key=lambda g: g[0])
    return [ConceptGroup(gid, members, shares, lo, mean) for gid, (_, members, shares, lo, mean) in enumerate(made)]


def group_assignment(groups: list[ConceptGroup], n_latents: int) -> Int[np.ndarray, " m"]:
    """(m,) int64: the group id of each latent, −1 for latents in no group (not valid)."""
    out = np.full(n_latents, -1, dtype=np.int64)
    for g in groups:
        out[list(g.members)] = g.id
    return out


def group_block(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, assignment: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CSR block of latents (b × m) -> the same rows over groups (b × G): each group's value is
    the sum of its members' values; latents with assignment −1 are dropped. O(nnz of the block);
    the output is CSR with ascending group ids per row and only positive values."""
    indptr = np.asarray(indptr, dtype=np.int64)
    b = len(indptr) - 1
    gid = assignment[np.asarray(indices, dtype=np.int64)]
    keep = gid >= 0
    rows = np.repeat(np.arange(b), np.diff(indptr))[keep]
    gid = gid[keep]
    vals = np.asarray(values, dtype=np.float64)[keep]
    n_groups = int(assignment.max(initial=-1)) + 1
    key = rows * max(n_groups, 1) + gid
    uniq, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=vals, minlength=len(uniq))
    out_rows = uniq // max(n_groups, 1)
    positive = summed > 0
    out_rows, uniq, summed = out_rows[positive], uniq[positive], summed[positive]
    out_indptr = np.concatenate([[0], np.cumsum(np.bincount(out_rows, minlength=b))]).astype(np.int64)
    return out_indptr, (uniq % max(n_groups, 1)).astype(np.int32), summed.astype(np.float32)


def group_columns(source: CSRSource, members: list[tuple[int, ...]] | list[list[int]]) -> Float[np.ndarray, "N G"]:
    """Image-level activation of each given group over the split: (N, len(members)) float32,
    column g = Σ of the members' activations. One O(nnz) pass, whatever the number of groups;
    memory N × len(members) (ask for the groups you test, not all of them)."""
    n_latents = source.n_latents
    which = np.full(n_latents, -1, dtype=np.int64)
    owners: dict[int, list[int]] = {}
    for g, mem in enumerate(members):
        for latent in mem:
            owners.setdefault(int(latent), []).append(g)
    out = np.zeros((source.n_images, len(members)), dtype=np.float32)
    simple = all(len(o) == 1 for o in owners.values())
    if simple:  # each latent in at most one requested group: one scatter-add per block
        for latent, o in owners.items():
            which[latent] = o[0]
        for start, stop, indptr, indices, values in iter_csr_blocks(source):
            col = which[np.asarray(indices, dtype=np.int64)]
            keep = col >= 0
            rows = np.repeat(np.arange(stop - start), np.diff(indptr))[keep] + start
            np.add.at(out, (rows, col[keep]), np.asarray(values, dtype=np.float32)[keep])
        return out
    for g, mem in enumerate(members):  # overlapping requests (e.g. groups of two runs): one column each
        out[:, g] = group_columns(source, [tuple(mem)])[:, 0]
    return out


def mean_top_overlap(top_positions: Int[np.ndarray, "m K"], members: list[int]) -> float:
    """Mean over member pairs of |top(i) ∩ top(j)| / K (top_positions (m, K), −1 = unused slot)."""
    k = max(top_positions.shape[1], 1)
    sets = [{int(p) for p in top_positions[latent] if p >= 0} for latent in members]
    pairs = [len(a & b) / k for n, a in enumerate(sets) for b in sets[n + 1:]]
    return float(np.mean(pairs)) if pairs else 1.0


def mean_decoder_cosine(decoder: Float[np.ndarray, "m d"], members: list[int]) -> float:
    """Mean over member pairs of the cosine of their decoder rows (decoder (m, d))."""
    rows = np.asarray(decoder[members], dtype=np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    cos = rows @ rows.T
    pairs = cos[np.triu_indices(len(members), 1)]
    return float(pairs.mean()) if pairs.size else 1.0
