"""The files one stage writes and later stages read (conceptscope_cli/FORMATS.md), one typed class each.

Each class owns its file name, its reader (`read` / `load`) and its writer (`write` / `save`, JSON
through `write_json_atomic`: sorted keys, indent 2, atomic), after the pattern of saev's
`Metadata`. `to_json()` gives exactly the object that is written, so a stamp hashed over it is the
stamp of the file. Nested parts whose schema belongs to one stage (a class's categorization, a
latent's statistics) stay plain JSON objects; FORMATS.md lists their fields.

- `ValidLatents`, `LatentStats`, `ConceptDict`: `cscope dict`, in `<outputs>/<dataset>/<split>/`.
- `AlignmentScores`, `Categorization`: `cscope categorize`, in `<outputs>/<dataset>/`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from conceptscope_cli.cache.store import write_json_atomic
from conceptscope_cli.errors import CscopeError, MissingArtifactError

if TYPE_CHECKING:
    from conceptscope_cli.cache.store import CacheStore


def read_json_object(path: Path, command: str, what: str) -> dict[str, Any]:
    """The JSON object in `path`; missing → exit 3 naming `command`, unreadable → a clear error."""
    if not path.is_file():
        raise MissingArtifactError(f"no {what} at {path}", command=command)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CscopeError(f"{path} is not a readable {what}: {exc}", hint=f"run `{command}` again") from None
    if not isinstance(data, dict):
        raise CscopeError(f"{path} is not a {what} (expected a JSON object)", hint=f"run `{command}` again")
    return data


def _require(data: dict[str, Any], keys: tuple[str, ...], path: Path | str, what: str, command: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise CscopeError(f"{path} is not a {what} (no {'/'.join(missing)})",
                          hint=f"pass a file written by `{command}` (FORMATS.md)")


_A = TypeVar("_A", bound="JsonArtifact")


class JsonArtifact:
    """What every artifact class shares: `read` a file through `from_json`, `write` `to_json()`
    through `write_json_atomic`. Subclasses name the file kind (`WHAT`) and the command that makes it."""

    WHAT: ClassVar[str]
    COMMAND: ClassVar[str]

    @classmethod
    def from_json(cls: type[_A], data: dict[str, Any], where: Path | str) -> _A:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def read(cls: type[_A], path: Path) -> _A:
        return cls.from_json(read_json_object(path, cls.COMMAND, cls.WHAT), path)

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())


_S = TypeVar("_S", bound="SplitArtifact")


class SplitArtifact(JsonArtifact):
    """An artifact with a fixed file name in a split's output folder (`<outputs>/<dataset>/<split>/`)."""

    FILE: ClassVar[str]

    @classmethod
    def path(cls, split_dir: Path) -> Path:
        return Path(split_dir) / cls.FILE

    @classmethod
    def load(cls: type[_S], split_dir: Path) -> _S:
        return cls.read(cls.path(split_dir))

    def save(self, split_dir: Path) -> Path:
        path = self.path(split_dir)
        self.write(path)
        return path


# ------------------------------------------------------------------ cscope dict
@dataclass(frozen=True)
class ConceptEntry:
    """One valid latent of `concept_dict.json`: its name (None when unnamed) and reference tile."""

    name: str | None
    score: float | None
    clarity: float | None
    source: str
    error: str | None
    reference_image: str | None  # relative to the split folder
    reference_rows: list[int] = field(default_factory=list)


@dataclass
class ConceptDict(SplitArtifact):
    """`concept_dict.json`: the valid latents, named. `meta` is the dictionary's meta (FORMATS.md)."""

    FILE: ClassVar[str] = "concept_dict.json"
    COMMAND: ClassVar[str] = "cscope dict"
    WHAT: ClassVar[str] = "concept dictionary"

    meta: dict[str, Any]
    latents: dict[int, ConceptEntry]

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path | str = "concept_dict.json") -> ConceptDict:
        _require(data, ("meta", "latents"), where, "concept dictionary", cls.COMMAND)
        try:
            latents = {int(k): ConceptEntry(**v) for k, v in data["latents"].items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise CscopeError(f"{where} is not a concept dictionary ({exc})", hint="run `cscope dict` again") from None
        return cls(data["meta"], latents)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "latents": {str(k): dataclasses.asdict(v) for k, v in self.latents.items()}}

    # what the later stages ask of it
    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def n_latents(self) -> int:
        return int(self.meta["n_latents"])

    def names(self) -> dict[int, str | None]:
        return {k: v.name for k, v in self.latents.items()}

    def sae_dir(self, cache: CacheStore) -> Path:
        """The SAE the dictionary was made with: the `[dict] sae` folder or the `cscope train` entry."""
        if self.meta.get("sae"):
            return Path(self.meta["sae"])
        entry = cache.lookup("sae", self.meta["sae_entry"])
        if entry is None:
            raise MissingArtifactError("the SAE behind this dictionary is no longer in the cache", command="cscope train")
        return entry.path


@dataclass
class ValidLatents(SplitArtifact):
    """`valid_latents.json`: which latents passed the noisy / strong-image rules, with the thresholds used."""

    FILE: ClassVar[str] = "valid_latents.json"
    COMMAND: ClassVar[str] = "cscope dict"
    WHAT: ClassVar[str] = "valid-latents file"

    meta: dict[str, Any]
    valid_latents: list[int]
    n_noisy: int
    n_strong: int
    thresholds: dict[str, Any] | None = None  # {"rule", "noisy_threshold", "strong_value"[, "scale"]}; absent before 0.1

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path | str = "valid_latents.json") -> ValidLatents:
        _require(data, ("meta", "valid_latents", "n_noisy", "n_strong"), where, "valid-latents file", cls.COMMAND)
        return cls(data["meta"], [int(k) for k in data["valid_latents"]], int(data["n_noisy"]), int(data["n_strong"]),
                   data.get("thresholds"))

    def to_json(self) -> dict[str, Any]:
        out = {"meta": self.meta, "valid_latents": self.valid_latents, "n_noisy": self.n_noisy, "n_strong": self.n_strong}
        return out if self.thresholds is None else {**out, "thresholds": self.thresholds}


@dataclass
class LatentStats(SplitArtifact):
    """`latent_stats.json`: per valid latent (key: its id as a string) the statistics FORMATS.md lists."""

    FILE: ClassVar[str] = "latent_stats.json"
    COMMAND: ClassVar[str] = "cscope dict"
    WHAT: ClassVar[str] = "latent statistics file"

    meta: dict[str, Any]
    taus: list[float]
    latents: dict[str, dict[str, Any]]

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path | str = "latent_stats.json") -> LatentStats:
        _require(data, ("meta", "taus", "latents"), where, "latent statistics file", cls.COMMAND)
        return cls(data["meta"], [float(t) for t in data["taus"]], dict(data["latents"]))

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "taus": self.taus, "latents": self.latents}


# ------------------------------------------------------------------ cscope categorize
@dataclass
class AlignmentScores(JsonArtifact):
    """`<split>_alignment_scores.json`: every candidate's scores per class (`classes[name]["latents"][id]`)."""

    SUFFIX: ClassVar[str] = "_alignment_scores.json"
    COMMAND: ClassVar[str] = "cscope categorize"
    WHAT: ClassVar[str] = "alignment-scores file"

    meta: dict[str, Any]
    classes: dict[str, dict[str, Any]]

    @classmethod
    def path(cls, dataset_dir: Path, split: str) -> Path:
        return Path(dataset_dir) / f"{split}{cls.SUFFIX}"

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path | str = "alignment scores") -> AlignmentScores:
        _require(data, ("meta", "classes"), where, "alignment-scores file", cls.COMMAND)
        return cls(data["meta"], data["classes"])

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "classes": self.classes}


@dataclass
class Categorization(JsonArtifact):
    """`<split>_concept_categorization.json`: per class its target / context / uncertain / bias concepts
    and evidence (`classes[name]`, FORMATS.md), and the classes by strength of evidence (`ranking`)."""

    SUFFIX: ClassVar[str] = "_concept_categorization.json"
    COMMAND: ClassVar[str] = "cscope categorize"
    WHAT: ClassVar[str] = "categorization"

    meta: dict[str, Any]
    ranking: list[str] | None  # None only in a hand-made file (a reader such as `cscope diff` accepts it)
    classes: dict[str, dict[str, Any]]

    @classmethod
    def path(cls, dataset_dir: Path, split: str) -> Path:
        """`<outputs>/<dataset>/<split>_concept_categorization.json` (`dataset_dir` = `<outputs>/<dataset>`)."""
        return Path(dataset_dir) / f"{split}{cls.SUFFIX}"

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path | str = "categorization") -> Categorization:
        _require(data, ("meta", "classes"), where, "categorization", cls.COMMAND)
        return cls(data["meta"], data.get("ranking"), data["classes"])

    def to_json(self) -> dict[str, Any]:
        out = {"meta": self.meta, "classes": self.classes}
        return out if self.ranking is None else {**out, "ranking": self.ranking}

    @classmethod
    def load(cls, dataset_dir: Path, split: str) -> Categorization:
        return cls.read(cls.path(dataset_dir, split))
