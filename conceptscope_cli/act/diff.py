"""`cscope diff A B`: which biases appeared, vanished, grew or shrank between two categorizations
made with the same SAE (two splits, two datasets, two versions of one dataset).

Each side's claims are made as `cscope groups` makes them (a claim on one latent widened to
the latents firing with it, the widening re-checked on that side's own latents,
`act/concepts.py`). Claims are matched by class name and concept: the claim of B sharing the
most member latents with A's (ids are comparable because the SAE is
the same; a different SAE is refused). Each side's effect is Cliff's δ (= 2·AUROC − 1, the
measure of categorize's evidence rule) of the concept's activation, class vs rest, computed
exactly from that side's image-level latents (`stats.cliffs_delta`, Hanley-McNeil standard
error) when they are cached, otherwise the categorization's own δ and its 95% interval (the
standard error read back from it). The change B − A has the interval
delta ± z·sqrt(se_A² + se_B²), Bonferroni-simultaneous over the compared claims. Status:
grew / shrank (a bias on both sides whose change interval excludes 0), appeared / vanished (a
bias on one side only, with a significant change in that direction), unchanged otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import conceptscope_cli
from conceptscope_cli.act import stats as A
from conceptscope_cli.act.claims import (
    BiasClaim,
    categorization_path,
    dictionary_latents,
    load_categorization,
    read_claims,
    sae_identity,
)
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.project import Project

STATUSES = ("appeared", "vanished", "grew", "shrank", "unchanged")
GATE_EXIT_CODE = 4  # `--fail-on` matched: distinct from user (1), manifest (2) and missing-artifact (3) errors


class GateFailedError(CscopeError):
    exit_code = GATE_EXIT_CODE


def resolve_side(project: Project | None, spec: str) -> tuple[str, Path]:
    """A categorization by path, `DATASET/SPLIT` or `SPLIT` (of the default dataset)."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        return spec, path
    if project is None:
        raise CscopeError(f"{spec!r} is not a categorization file", hint="pass *_concept_categorization.json paths")
    dataset, _, split = spec.rpartition("/")
    name, _ = project.dataset(dataset or None)
    return f"{name}/{split}", categorization_path(project.outputs_dir, name, split)


def _latents_entry(project: Project | None, categorization: dict[str, Any]) -> Any:
    key = categorization["meta"].get("latents_entry")
    return project.cache.lookup("latents", key) if project is not None and key else None


def side_claims(project: Project | None, categorization: dict[str, Any], path: Path) -> list[BiasClaim]:
    """A side's claims as `cscope groups` makes them: single-latent claims widened to the latents
    firing with them and the widening re-checked on that side's own latents (`act/concepts.py`);
    the claims as listed when the side's latents are not cached."""
    from conceptscope_cli.act.concepts import claim_concepts
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    claims = read_claims(categorization)
    entry = _latents_entry(project, categorization)
    if entry is None or not claims:
        return claims
    latents, threshold = dictionary_latents(path.parent / str(categorization["meta"].get("split")))
    with LatentMatrix(entry.path / "latents.h5") as matrix:
        return claim_concepts(matrix, claims, latents, threshold)[0]


def _columns(project: Project | None, categorization: dict[str, Any], members: dict[str, tuple[int, ...]]
             ) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    from conceptscope_cli.act.groups import concept_columns
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    entry = _latents_entry(project, categorization)
    if entry is None or not members:
        return None
    with LatentMatrix(entry.path / "latents.h5") as matrix:
        return concept_columns(matrix, members), matrix.labels.copy()


def _side(claim: BiasClaim | None, label: int, key: str, columns: tuple[dict[str, np.ndarray], np.ndarray] | None,
          z: float, their_confidence: float) -> dict[str, Any]:
    """One side's effect: Cliff's δ of the concept's activation, class vs rest, with its interval;
    exact from that side's latents when cached (Hanley-McNeil error), else the categorization's own."""
    if columns is not None and key in columns[0]:
        values, labels = columns[0][key], columns[1]
        keep = labels >= 0
        d, se = A.cliffs_delta(values[keep], labels[keep] == label)
        return {"effect": d, "low": max(-1.0, d - z * se), "high": min(1.0, d + z * se), "se": se,
                "source": "latents"}
    if claim is not None and claim.ci is not None and claim.effect is not None:
        low, high = claim.ci
        return {"effect": claim.effect, "low": low, "high": high, "se": (high - low) / (2 * A.z_of(their_confidence)),
                "source": "categorization"}
    return {"effect": None, "low": None, "high": None, "se": None, "source": "none"}


def _confidence(categorization: dict[str, Any]) -> float:
    """The level of the intervals a categorization carries (categorize's [categorize] confidence)."""
    return float(categorization["meta"].get("evidence", {}).get("confidence", 0.95))


def _match(a: list[BiasClaim], b: list[BiasClaim]) -> list[tuple[BiasClaim | None, BiasClaim | None]]:
    """Pairs (A claim, B claim) of the same class sharing the most member latents; unmatched ones alone."""
    pairs: list[tuple[BiasClaim | None, BiasClaim | None]] = []
    used: set[int] = set()
    for ca in a:
        best, overlap = None, 0
        for j, cb in enumerate(b):
            if j in used or cb.class_name != ca.class_name:
                continue
            shared = len(set(ca.members) & set(cb.members))
            if shared > overlap:
                best, overlap = j, shared
        if best is None:
            pairs.append((ca, None))
        else:
            used.add(best)
            pairs.append((ca, b[best]))
    pairs.extend((None, cb) for j, cb in enumerate(b) if j not in used)
    return pairs


def status_of(in_a: bool, in_b: bool, low: float | None, high: float | None) -> str:
    up = low is not None and low > 0
    down = high is not None and high < 0
    if in_a and in_b:
        return "grew" if up else "shrank" if down else "unchanged"
    if in_b:
        return "appeared" if up else "unchanged"
    return "vanished" if down else "unchanged"


def diff_categorizations(project: Project | None, spec_a: str, spec_b: str, *, confidence: float = 0.95) -> dict[str, Any]:
    label_a, path_a = resolve_side(project, spec_a)
    label_b, path_b = resolve_side(project, spec_b)
    cat_a, cat_b = load_categorization(path_a), load_categorization(path_b)
    sae_a, sae_b = sae_identity(cat_a), sae_identity(cat_b)
    if sae_a != sae_b:
        raise CscopeError(f"the two categorizations were made with different SAEs ({sae_a} vs {sae_b}); "
                          "their concepts are not comparable",
                          hint="categorize both with the same SAE: pin it with [dict] sae = PATH in both projects")
    names_a, names_b = cat_a["meta"].get("class_names", []), cat_b["meta"].get("class_names", [])
    if names_a != names_b:
        raise CscopeError(f"the two categorizations have different classes ({len(names_a)} vs {len(names_b)}: "
                          f"{names_a[:5]} vs {names_b[:5]})", hint="diff categorizations of the same label set")
    pairs = _match(side_claims(project, cat_a, path_a), side_claims(project, cat_b, path_b))
    k = max(len(pairs), 1)
    z = A.z_of(1 - (1 - confidence) / k)
    members = {(ca or cb).key: tuple(sorted(set((ca.members if ca else ()) + (cb.members if cb else ()))))  # type: ignore[union-attr]
               for ca, cb in pairs}
    col_a, col_b = _columns(project, cat_a, members), _columns(project, cat_b, members)
    rows = []
    for ca, cb in pairs:
        claim = ca or cb
        assert claim is not None
        key = claim.key
        side_a = _side(ca, claim.label, key, col_a, z, _confidence(cat_a))
        side_b = _side(cb, claim.label, key, col_b, z, _confidence(cat_b))
        delta = low = high = None
        if side_a["effect"] is not None and side_b["effect"] is not None:
            delta = side_b["effect"] - side_a["effect"]
            if side_a["se"] is not None and side_b["se"] is not None:
                se = float(np.hypot(side_a["se"], side_b["se"]))
                low, high = delta - z * se, delta + z * se
        status = status_of(ca is not None, cb is not None, low, high)
        rows.append({"class": claim.class_name, "concept": claim.concept, "members": list(members[key]),
                     "concept_label": claim.concept_text if not cb or cb.concept == claim.concept
                     else f"{claim.concept_text} ~ {cb.concept_text.rpartition(' ')[2]}",
                     "in_a": ca is not None, "in_b": cb is not None, "a": side_a, "b": side_b,
                     "change": {"delta": delta, "low": low, "high": high}, "status": status})
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return {"meta": {"a": {"label": label_a, "path": str(path_a), "stamp": cat_a["meta"].get("stamp")},
                     "b": {"label": label_b, "path": str(path_b), "stamp": cat_b["meta"].get("stamp")},
                     "sae": sae_a, "confidence": confidence, "simultaneous_level": 1 - (1 - confidence) / k,
                     "cscope_version": conceptscope_cli.__version__},
            "counts": counts, "biases": rows}


def gate(report: dict[str, Any], fail_on: list[str]) -> None:
    """Raise GateFailedError (exit 4) when any row has a status listed in `fail_on`."""
    bad = [s for s in fail_on if s not in STATUSES]
    if bad:
        raise CscopeError(f"--fail-on: unknown status {', '.join(bad)}", hint=f"choose from {', '.join(STATUSES[:4])}")
    hits = [r for r in report["biases"] if r["status"] in fail_on]
    if hits:
        listed = ", ".join(f"{r['class']} {r['concept_label']} ({r['status']})" for r in hits[:5])
        raise GateFailedError(f"{len(hits)} bias change(s) matched --fail-on {','.join(fail_on)}: {listed}",
                         hint=f"exit code {GATE_EXIT_CODE}: the diff gate failed")
