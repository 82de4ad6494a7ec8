"""Bias claims read from a categorization: the one adapter every act command goes through.

A claim is (class y, concept c): c is a bias of y. Today's `<split>_concept_categorization.json`
(conceptscope_cli/FORMATS.md) lists per class `bias` entries with one `latent` each and an
`effect_size`; the concept of such an entry is that latent alone. Entries that name a concept
made of several latents (`concept` / `members`) and carry an effect with its interval
(`effect`, `ci` = [low, high] or `ci_low`/`ci_high`, `q`) are read too: the concept id is then
the group's, its members are the group's latents. Everything else in act reads claims only
through :func:`read_claims`; `act/concepts.py` widens a single-latent claim to the latents
that fire with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptscope_cli.artifacts import Categorization
from conceptscope_cli.errors import CscopeError, MissingArtifactError


@dataclass(frozen=True)
class BiasClaim:
    class_name: str
    label: int  # index in the categorization's class_names
    concept: str  # "66" for a single latent; the group id for a concept group
    members: tuple[int, ...]  # SAE latents making up the concept (ascending)
    name: str | None
    effect: float | None  # standardised class-vs-rest effect, when the categorization has it
    ci: tuple[float, float] | None  # its interval, when the categorization has one
    q: float | None  # multiple-testing adjusted p-value, when available
    listed: tuple[int, ...] = ()  # a widened claim (concept `n…`, act/concepts.py): the latents the categorization listed

    @property
    def key(self) -> str:
        """Stable id used as a column prefix: `circle/66`."""
        return f"{self.class_name}/{self.concept}"

    @property
    def concept_text(self) -> str:
        """`water #66`, `sand #g27`; a claim widened to the latents firing with it (`act/concepts.py`,
        concept `n66` / `ng27`) shows how many joined: `water #66+8`."""
        if self.concept.startswith("n") and self.listed:
            return f"{self.name or 'concept'} #{self.concept[1:]}+{len(self.members) - len(self.listed)}"
        return f"{self.name or 'concept'} #{self.concept}"

    @property
    def label_text(self) -> str:
        return f"{self.class_name} ← {self.concept_text}"

    def to_json(self) -> dict[str, Any]:
        return {"class": self.class_name, "label": self.label, "concept": self.concept, "members": list(self.members),
                "name": self.name, "effect": self.effect, "ci": list(self.ci) if self.ci else None, "q": self.q,
                **({"listed": list(self.listed)} if self.listed else {})}


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _interval(entry: dict[str, Any]) -> tuple[float, float] | None:
    for key in ("ci", "effect_ci", "ci95"):
        value = entry.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 2 and None not in value:
            return float(value[0]), float(value[1])
        if isinstance(value, dict) and value.get("low") is not None and value.get("high") is not None:
            return float(value["low"]), float(value["high"])
    for low, high in (("effect_low", "effect_high"), ("ci_low", "ci_high")):
        if entry.get(low) is not None and entry.get(high) is not None:
            return float(entry[low]), float(entry[high])
    return None


def _claim(class_name: str, label: int, entry: dict[str, Any]) -> BiasClaim:
    members = entry.get("members") or entry.get("latents")
    if members:
        latents = tuple(sorted(int(m["latent"]) if isinstance(m, dict) else int(m) for m in members))
    else:
        latents = (int(entry["latent"]),)
    concept = entry.get("concept")
    if concept is None and entry.get("group") is not None and len(latents) > 1:
        concept = f"g{entry['group']}"  # the dictionary's concept group (FORMATS.md, "Concept groups")
    concept_id = str(concept) if concept is not None else (str(latents[0]) if len(latents) == 1
                                                            else "+".join(map(str, latents)))
    effect = entry.get("effect", entry.get("effect_size"))
    return BiasClaim(class_name, label, concept_id, latents, entry.get("name"), _float(effect), _interval(entry),
                     _float(entry.get("q", entry.get("q_value"))))


def read_claims(categorization: dict[str, Any]) -> list[BiasClaim]:
    """Every bias claim of a categorization, class by class in class order, strongest first."""
    class_names = list(categorization.get("meta", {}).get("class_names") or categorization["classes"])
    claims: list[BiasClaim] = []
    for class_name, info in categorization["classes"].items():
        label = int(info.get("class", class_names.index(class_name)))
        claims.extend(_claim(class_name, label, entry) for entry in info.get("bias", []))
    return claims


def dictionary_latents(split_dir: Path) -> tuple[np.ndarray | None, float]:
    """(the valid latents, the `[dict] group_threshold`) of a split's dictionary, read from its
    concept groups (every valid latent is in one group); (None, default) for a dictionary
    without them (older ones): claims then stay the latents listed."""
    from conceptscope_cli.dictionary.group_file import FILE_NAME, read_concept_groups
    from conceptscope_cli.dictionary.groups import DEFAULT_THRESHOLD

    if not (split_dir / FILE_NAME).is_file():
        return None, DEFAULT_THRESHOLD
    groups = read_concept_groups(split_dir)
    threshold = groups.meta.get("grouping", {}).get("threshold", groups.meta.get("settings", {}).get("group_threshold"))
    latents = np.array(sorted(k for g in groups.groups for k in g.members), dtype=np.int64)
    return latents, float(DEFAULT_THRESHOLD if threshold is None else threshold)


def sae_identity(categorization: dict[str, Any]) -> str:
    """The SAE a categorization was made with: its cache key, or the imported folder's path."""
    meta = categorization.get("meta", {})
    if meta.get("sae_entry"):
        return f"cache:{meta['sae_entry']}"
    if meta.get("sae"):
        return f"folder:{meta['sae']}"
    raise CscopeError("the categorization does not say which SAE made it (meta.sae_entry / meta.sae)")


def categorization_path(outputs_dir: Path, dataset: str, split: str) -> Path:
    return Categorization.path(outputs_dir / dataset, split)


def load_categorization(path: Path) -> dict[str, Any]:
    """Read a categorization file (`artifacts.Categorization`); missing → exit 3 naming `cscope categorize`."""
    if not path.is_file():
        raise MissingArtifactError(f"no categorization at {path}", hint="run `cscope categorize` (with --split) first")
    return Categorization.read(path).to_json()
