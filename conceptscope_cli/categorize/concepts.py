"""The concepts categorize scores: the dictionary's concept groups (METHOD §Concept groups).

A concept is a column of the split's image-level activations: the sum of its member latents.
With `[dict] group_latents = false` (or a dictionary without `concept_groups.json`) every
valid latent is its own concept, which is ConceptScope's per-latent behaviour. Each concept is
written out under its representative latent's id (name, tile), with its members.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptscope_cli.artifacts import ConceptDict
from conceptscope_cli.dictionary import groups as G
from conceptscope_cli.dictionary.group_file import FILE_NAME, ConceptGroups, read_concept_groups


@dataclass
class ConceptSpace:
    """members[c] the latents of concept c, representative[c] the latent that names it; stats: the
    `stats.h5` statistics computed over the concepts' activations (column c = concept c)."""

    members: list[tuple[int, ...]]
    representative: np.ndarray
    stats: dict[str, np.ndarray]
    grouped: bool
    assignment: np.ndarray  # (m,) concept of each latent, -1 outside

    def column_of(self, latent: int) -> int:
        return int(self.assignment[int(latent)])


def concept_groups(out_dir: Path, concept: ConceptDict) -> ConceptGroups:
    """The dictionary's groups, or one group per valid latent when it wrote none."""
    if (Path(out_dir) / FILE_NAME).is_file():
        return read_concept_groups(out_dir)
    valid = sorted(concept.latents)
    return ConceptGroups({"grouping": {"enabled": False}},
                         [G.ConceptGroup(i, (k,), (1.0,), 1.0, 1.0, concept.latents[k].name)
                          for i, k in enumerate(valid)])


def groups_key(groups: ConceptGroups) -> list[list[int]]:
    """What of the grouping changes categorize's results (for its stamp)."""
    return [list(g.members) for g in groups.groups]


def concept_space(latents_h5: Path, groups: ConceptGroups, n_classes: int) -> ConceptSpace:
    """Statistics of every concept's activation over the split: one O(nnz) pass."""
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    with LatentMatrix(latents_h5) as matrix:
        stats = groups.statistics(matrix, n_classes)
        assignment = groups.assignment(matrix.n_latents)
    return ConceptSpace([g.members for g in groups.groups], np.array([g.representative for g in groups.groups],
                                                                     dtype=np.int64),
                        stats, bool(groups.meta.get("grouping", {}).get("enabled")), assignment)

