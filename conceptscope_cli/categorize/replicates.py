"""Stability across SAE seeds (`[categorize] replicates`, `cscope categorize --replicates N`).

METHOD §Replicates. Replicate r (1..N) is the same project with `[sae] seed` = base seed + r:
its SAE, image-level latents and dictionary are ordinary cache entries (the SAE key includes
the seed) and its categorization is made by the ordinary stage functions (`categorize`), with
outputs under `<outputs>/replicates/sae-seed-<seed>/` (no names, one-image tiles: nothing
reads them). Everything else (images sampled per class, bootstrap seeds) is the main run's,
so the replicates measure what the SAE's seed changes.

A bias claim of the main run, (class y, concept c), is **made by** replicate r when r's bias
list for y holds a concept whose pooled within-class correlation with c, over the same images
(both latents come from one activation entry), is ≥ `replicate_match`. A concept's activation
is the sum of its member latents (one latent when the run is ungrouped). The correlation is
within classes for the reason the grouping is (dictionary/groups.py): a class's target and its
bias co-occur by definition, so a plain correlation would let a replicate's class latent
"reproduce" a bias claim. Fraction = made / N, in [0, 1].
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from conceptscope_cli.artifacts import Categorization
from conceptscope_cli.cache.store import content_key
from conceptscope_cli.dictionary import groups as G
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.project import Project

REPLICATES_DIR = "replicates"


def concept_members(entry: dict[str, Any]) -> tuple[int, ...]:
    """The latents of one categorization entry: its group's members, or its latent alone."""
    members = entry.get("members")
    return tuple(int(x) for x in members) if members else (int(entry["latent"]),)


def replicate_seeds(base_seed: int, n: int) -> list[int]:
    return [base_seed + r for r in range(1, n + 1)]


def replicate_project(project: Project, sae_seed: int) -> Project:
    """The project with `[sae] seed = sae_seed`, its outputs under `replicates/sae-seed-<seed>/`, no
    names and one-image tiles (only activations are compared), and no replicates of its own."""
    from conceptscope_cli.config.sections import CategorizeConfig, DictConfig, ProjectConfig, SAEConfig

    manifest = project.manifest
    values = dict(manifest.values)
    values["sae"] = dataclasses.replace(manifest.get(SAEConfig), seed=sae_seed)
    out = project.outputs_dir / REPLICATES_DIR / f"sae-seed-{sae_seed}"
    values["project"] = dataclasses.replace(manifest.get(ProjectConfig), outputs_dir=str(out))
    values["dict"] = dataclasses.replace(manifest.get(DictConfig), namer="none", reference_images=1)
    values["categorize"] = dataclasses.replace(manifest.get(CategorizeConfig), replicates=0)
    raw = copy.deepcopy(manifest.raw)
    raw.setdefault("sae", {})["seed"] = sae_seed  # effective_config reads an explicit seed from the raw table
    return Project(manifest=dataclasses.replace(manifest, values=values, raw=raw), cache=project.cache)


# ----------------------------------------------------------------------------------- the math


class StackedGroups:
    """Two CSR latent matrices over the same images seen as one matrix whose columns are concepts:
    columns [0, A) are `left` concepts (sums of their members in `left`), [A, A + B) `right` ones.
    Satisfies `groups.CSRSource`, so `gram_statistics` gives their within-class correlations."""

    def __init__(self, left: G.CSRSource, left_concepts: Sequence[tuple[int, ...]], right: G.CSRSource,
                 right_concepts: Sequence[tuple[int, ...]]) -> None:
        if left.n_images != right.n_images or not np.array_equal(left.labels, right.labels):
            raise CscopeError("replicate latents do not cover the same images as the main run's",
                              hint="both must come from one activation entry; run `cscope categorize` again")
        self.left, self.right = left, right
        self.n_left = len(left_concepts)
        self.n_images = left.n_images
        self.n_latents = self.n_left + len(right_concepts)
        self.labels = left.labels
        self._assign = (_assignment(left_concepts, left.n_latents), _assignment(right_concepts, right.n_latents))

    @property
    def nnz(self) -> int:
        return self.left.nnz + self.right.nnz

    def csr_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols, vals = [], [], []
        for offset, source, assignment in ((0, self.left, self._assign[0]), (self.n_left, self.right, self._assign[1])):
            indptr, indices, values = source.csr_block(start, stop)
            gi, gj, gv = G.group_block(np.asarray(indptr), np.asarray(indices), np.asarray(values), assignment)
            rows.append(np.repeat(np.arange(stop - start), np.diff(gi)))
            cols.append(gj.astype(np.int64) + offset)
            vals.append(gv)
        r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        order = np.lexsort((c, r))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=stop - start))]).astype(np.int64)
        return indptr, c[order], v[order]


def _assignment(concepts: Sequence[tuple[int, ...]], n_latents: int) -> np.ndarray:
    """(m,) concept index of each latent, −1 outside; concepts must not share latents."""
    out = np.full(n_latents, -1, dtype=np.int64)
    for i, members in enumerate(concepts):
        idx = np.asarray(members, dtype=np.int64)
        if (out[idx] >= 0).any():
            raise ValueError(f"concept {i} shares latents with another concept: {members}")
        out[idx] = i
    return out


def cross_correlation(left: G.CSRSource, left_concepts: Sequence[tuple[int, ...]], right: G.CSRSource,
                      right_concepts: Sequence[tuple[int, ...]]) -> np.ndarray:
    """(A, B) pooled within-class correlation between the activations of `left_concepts` (in
    `left`) and `right_concepts` (in `right`), over the same images; one O(nnz) pass over each."""
    if not left_concepts or not right_concepts:
        return np.zeros((len(left_concepts), len(right_concepts)))
    stacked = StackedGroups(left, left_concepts, right, right_concepts)
    stats = G.gram_statistics(stacked, np.arange(stacked.n_latents))
    corr, _ = G.within_class_correlation(stats)
    return corr[:stacked.n_left, stacked.n_left:]


@dataclass(frozen=True)
class ClaimMatch:
    """How one replicate answers one claim: made (bool), the best correlation with any bias
    concept of the same class in that replicate (None when it has none) and that concept."""

    made: bool
    correlation: float | None
    concept: tuple[int, ...] | None


def match_claims(claims: Sequence[tuple[int, tuple[int, ...]]], replicate_bias: Sequence[tuple[int, tuple[int, ...]]],
                 correlation: np.ndarray, threshold: float) -> list[ClaimMatch]:
    """Claims (class, concept) of the main run against one replicate's bias concepts (class, concept).

    correlation (len(claims), len(replicate_bias)); only pairs of the same class count.
    """
    out = []
    for i, (y, _) in enumerate(claims):
        same = [j for j, (yr, _) in enumerate(replicate_bias) if yr == y]
        if not same:
            out.append(ClaimMatch(False, None, None))
            continue
        j = max(same, key=lambda j: correlation[i, j])
        value = float(correlation[i, j])
        out.append(ClaimMatch(value >= threshold, value, replicate_bias[j][1]))
    return out


def _unique(concepts: Sequence[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Distinct concepts, and the index of each input among them."""
    seen: dict[tuple[int, ...], int] = {}
    index = [seen.setdefault(tuple(c), len(seen)) for c in concepts]
    return list(seen), index


# ----------------------------------------------------------------------------------- the stage


def bias_claims(categorization: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """(class name, class id, entry) of every bias entry of a categorization, in file order."""
    return [(name, int(info["class"]), entry) for name, info in categorization["classes"].items()
            for entry in info["bias"]]


def add_replicates(project: Project, name: str, split: str, categorization_path: Path, *, device: str | None,
                   reporter: Any) -> tuple[dict[str, Any], bool]:
    """Run (or reuse) `[categorize] replicates` replicates and write each main bias entry's
    `replicate_fraction` / `replicates` fields into the main categorization file.

    Returns (the categorization, whether the file changed). A no-op when up to date; with
    replicates = 0 it only removes fields a previous run with replicates left behind.
    """
    from conceptscope_cli.categorize.stage import categorize
    from conceptscope_cli.config.sections import CategorizeConfig
    from conceptscope_cli.distributed import on_main
    from conceptscope_cli.train.stage import effective_config

    cfg = project.manifest.get(CategorizeConfig)
    if cfg.replicates == 0:
        return on_main(lambda: _drop_fractions(categorization_path))
    if project.manifest.raw.get("dict", {}).get("sae"):
        raise CscopeError("[categorize] replicates needs SAEs trained by cscope, but [dict] sae names a fixed SAE",
                          hint="remove [dict] sae, or set replicates = 0")
    seeds = replicate_seeds(effective_config(project).seed, cfg.replicates)
    runs = []
    for seed in seeds:
        result = categorize(replicate_project(project, seed), name, split, device=device, reporter=reporter)
        runs.append((seed, result))
    return on_main(lambda: _write_fractions(project, categorization_path, runs, cfg.replicate_match))


def _as_list(concept: tuple[int, ...] | None) -> list[int] | None:
    return None if concept is None else list(concept)


def _drop_fractions(categorization_path: Path) -> tuple[dict[str, Any], bool]:
    categorization = Categorization.read(categorization_path).to_json()
    if "replicates" not in categorization["meta"]:
        return categorization, False
    del categorization["meta"]["replicates"]
    for _, _, entry in bias_claims(categorization):
        entry.pop("replicate_fraction", None)
        entry.pop("replicates", None)
    Categorization.from_json(categorization).write(categorization_path)
    return categorization, True


def _write_fractions(project: Project, categorization_path: Path, runs: list[tuple[int, Any]],
                     threshold: float) -> tuple[dict[str, Any], bool]:
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    categorization = Categorization.read(categorization_path).to_json()
    meta = categorization["meta"]
    stamp = content_key({"main": meta["stamp"], "replicates": [[s, r.categorization["meta"]["stamp"]] for s, r in runs],
                         "match": threshold})
    if meta.get("replicates", {}).get("stamp") == stamp:
        return categorization, False
    claims = bias_claims(categorization)
    concepts, index = _unique([concept_members(e) for _, _, e in claims])
    main_latents = project.cache.lookup("latents", meta["latents_entry"])
    if main_latents is None:
        raise CscopeError("the main run's latents are no longer cached", hint="run `cscope categorize` again")
    per_replicate = []
    with LatentMatrix(main_latents.path / "latents.h5") as left:
        for seed, result in runs:
            rep_meta = result.categorization["meta"]
            rep_claims = [(y, concept_members(e)) for _, y, e in bias_claims(result.categorization)]
            rep_concepts, rep_index = _unique([c for _, c in rep_claims])
            rep_entry = project.cache.lookup("latents", rep_meta["latents_entry"])
            if rep_entry is None:
                raise CscopeError(f"replicate sae-seed-{seed}: latents no longer cached", hint="run it again")
            with LatentMatrix(rep_entry.path / "latents.h5") as right:
                corr = cross_correlation(left, concepts, right, rep_concepts)
            full = corr[np.ix_(index, rep_index)] if claims and rep_claims else np.zeros((len(claims), len(rep_claims)))
            matches = match_claims([(y, concept_members(e)) for _, y, e in claims], rep_claims, full, threshold)
            per_replicate.append((seed, matches))
    for i, (_, _, claim) in enumerate(claims):
        made = sum(m[i].made for _, m in per_replicate)
        claim["replicate_fraction"] = made / len(runs) if runs else None
        claim["replicates"] = {"made_by": made, "n": len(runs), "matches": [
            {"sae_seed": seed, "made": m[i].made, "correlation": m[i].correlation,
             "concept": _as_list(m[i].concept)} for seed, m in per_replicate]}
    meta["replicates"] = {
        "n": len(runs), "sae_seeds": [s for s, _ in runs], "match_threshold": threshold, "stamp": stamp,
        "rule": "a replicate makes a claim when its bias list for the class holds a concept whose pooled "
                "within-class correlation with the claim's concept (sum of member activations) is >= the threshold",
        "outputs": [str(r.out_dir.parent) for _, r in runs],
    }
    Categorization.from_json(categorization).write(categorization_path)
    return categorization, True
