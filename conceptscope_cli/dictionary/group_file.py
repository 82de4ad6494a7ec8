"""`concept_groups.json`: the one reader/writer of the concept groups (FORMATS.md, "Concept groups"),
and what the dict stage does to make it.

Layout: ``{"meta": {..., "grouping": {...}}, "groups": [{id, representative, name, members,
shares, min_correlation, mean_correlation, decoder_cosine_mean, top_overlap_mean}],
"latent_group": {latent: group id}}``.

For a later stage (categorize)::

    from conceptscope_cli.dictionary.group_file import read_concept_groups
    groups = read_concept_groups(split_outputs_dir)        # ConceptGroups
    groups.groups[g].members / .representative / .name
    assignment = groups.assignment(n_latents)              # (m,) group id, -1 = no group
    columns = groups.columns(matrix, [g1, g2])             # (N, 2) group activations
    stats = groups.statistics(matrix, n_classes)           # stats.h5-like dict over groups (G columns)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptscope_cli.cache.store import write_json_atomic
from conceptscope_cli.dictionary import groups as G
from conceptscope_cli.errors import CscopeError, MissingArtifactError

FILE_NAME = "concept_groups.json"


@dataclass
class ConceptGroups:
    """The groups of one split's dictionary; `groups[g].id == g`."""

    meta: dict[str, Any]
    groups: list[G.ConceptGroup]

    def assignment(self, n_latents: int) -> np.ndarray:
        """(m,) int64 group id of each latent (−1: not a valid latent, in no group)."""
        return G.group_assignment(self.groups, n_latents)

    def group_of(self, latent: int) -> G.ConceptGroup | None:
        for g in self.groups:
            if int(latent) in g.members:
                return g
        return None

    def columns(self, source: G.CSRSource, group_ids: list[int]) -> np.ndarray:
        """(N, len(group_ids)) float32: each group's image-level activation (sum of its members)."""
        return G.group_columns(source, [self.groups[g].members for g in group_ids])

    def statistics(self, source: G.CSRSource, n_classes: int) -> dict[str, np.ndarray]:
        """The per-latent statistics of `stats.h5` (class_mean, class_std, frequency, top lists, ...)
        computed over the groups' activations instead: column g is group g. One O(nnz) pass."""
        from conceptscope_cli.dictionary.latents import LatentStatistics
        from conceptscope_cli.dictionary.sparse import STREAM_BLOCK_NNZ

        assignment = self.assignment(source.n_latents)
        stats = LatentStatistics(len(self.groups), n_classes)
        for start, stop, indptr, indices, values in G.iter_csr_blocks(source, STREAM_BLOCK_NNZ):
            gi, gj, gv = G.group_block(indptr, indices, values, assignment)
            stats.update_sparse(np.arange(start, stop), gi, gj, gv, np.asarray(source.labels[start:stop]))
        return stats.finalize(np.asarray(source.labels))


def group_json(group: G.ConceptGroup) -> dict[str, Any]:
    return {"id": group.id, "representative": group.representative, "name": group.name,
            "members": list(group.members), "shares": [round(s, 6) for s in group.shares],
            "min_correlation": group.min_correlation, "mean_correlation": group.mean_correlation, **group.extra}


def write_concept_groups(out_dir: Path, meta: dict[str, Any], groups: list[G.ConceptGroup]) -> Path:
    path = Path(out_dir) / FILE_NAME
    write_json_atomic(path, {
        "meta": meta,
        "groups": [group_json(g) for g in groups],
        "latent_group": {str(latent): g.id for g in groups for latent in g.members},
    })
    return path


def read_concept_groups(out_dir: Path) -> ConceptGroups:
    """Read `<out_dir>/concept_groups.json`; a missing file is exit 3 with the command that makes it."""
    path = Path(out_dir) / FILE_NAME
    if not path.is_file():
        raise MissingArtifactError(f"no concept groups at {path}", hint="run `cscope dict` for this split")
    data = json.loads(path.read_text())
    groups = [G.ConceptGroup(int(g["id"]), tuple(int(x) for x in g["members"]), tuple(float(s) for s in g["shares"]),
                             float(g["min_correlation"]), float(g["mean_correlation"]), g.get("name"),
                             {k: g[k] for k in ("decoder_cosine_mean", "top_overlap_mean") if k in g})
              for g in data["groups"]]
    if [g.id for g in groups] != list(range(len(groups))):
        raise CscopeError(f"{path}: group ids are not 0..{len(groups) - 1} in order", hint="re-run `cscope dict`")
    return ConceptGroups(data["meta"], groups)


def describe_groups(source: G.CSRSource, valid: np.ndarray, *, enabled: bool, threshold: float,
                    top_positions: np.ndarray, decoder: np.ndarray | None, names: dict[int, str | None]
                    ) -> list[G.ConceptGroup]:
    """The dict stage's grouping: groups of the valid latents with names and per-group diagnostics.

    top_positions (m, K) from `stats.h5`; decoder (m, d) SAE decoder rows or None. A multi-member
    group records the mean pairwise decoder cosine and the mean pairwise overlap of the members'
    top images (|A ∩ B| / K); neither links latents (METHOD §Concept groups says why).
    """
    valid = np.asarray(valid, dtype=np.int64)
    if len(valid) == 0:
        return []
    if enabled:
        edges, sums = G.correlation_edges(source, valid, threshold)
    else:  # no Gram pass: only the per-latent totals behind the (trivial) shares
        sums = G.label_sums(source, valid)
        edges = G.Edges(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    built = G.build_groups(edges, sums, threshold, enabled=enabled)
    out = []
    for g in built:
        extra: dict[str, float] = {}
        if len(g.members) > 1:
            extra["top_overlap_mean"] = G.mean_top_overlap(top_positions, list(g.members))
            if decoder is not None:
                extra["decoder_cosine_mean"] = G.mean_decoder_cosine(decoder, list(g.members))
        out.append(G.ConceptGroup(g.id, g.members, g.shares, g.min_correlation, g.mean_correlation,
                                  names.get(g.representative), extra))
    return out


def write_dictionary_groups(out_dir: Path, meta: dict[str, Any], latents_h5: Path, valid: np.ndarray,
                            top_positions: np.ndarray, decoder: np.ndarray | None, names: dict[int, str | None], *,
                            enabled: bool, threshold: float) -> list[G.ConceptGroup]:
    """`cscope dict`: group the valid latents of `latents_h5` and write `concept_groups.json`."""
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    with LatentMatrix(latents_h5) as matrix:
        groups = describe_groups(matrix, valid, enabled=enabled, threshold=threshold, top_positions=top_positions,
                                 decoder=decoder, names=names)
    grouping = {"enabled": enabled, "threshold": threshold, "similarity": "within-class correlation",
                "bound": f"one-sided Fisher lower bound, z = {G.FISHER_Z}", "linkage": "complete",
                "activation": "sum of members", "representative": "largest total activation"}
    write_concept_groups(out_dir, {**meta, "grouping": grouping, "n_groups": len(groups)}, groups)
    return groups
