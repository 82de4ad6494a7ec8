"""The typed files between stages (conceptscope_cli/artifacts.py): each class reads exactly what its
stage writes, and writes it back byte for byte, so no field can be dropped on the way."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conceptscope_cli.artifacts import (
    AlignmentScores,
    Categorization,
    ConceptDict,
    ConceptEntry,
    LatentStats,
    ValidLatents,
)
from conceptscope_cli.errors import CscopeError, MissingArtifactError
from conceptscope_cli.project import Project


def _files(project: Path) -> dict[str, tuple[type, Path]]:
    outputs = project / "outputs" / "shapes"
    return {
        "valid": (ValidLatents, ValidLatents.path(outputs / "train")),
        "stats": (LatentStats, LatentStats.path(outputs / "train")),
        "concept": (ConceptDict, ConceptDict.path(outputs / "train")),
        "scores": (AlignmentScores, AlignmentScores.path(outputs, "train")),
        "categorization": (Categorization, Categorization.path(outputs, "train")),
    }


@pytest.mark.slow  # runs the tiny project through categorize (module fixture)
def test_each_reader_reads_what_its_stage_wrote_and_writes_it_back_unchanged(categorized_tiny_project: Path,
                                                                              tmp_path: Path) -> None:
    for label, (cls, path) in _files(categorized_tiny_project).items():
        written = path.read_bytes()
        raw = json.loads(written)
        loaded = cls.read(path)
        # Every top-level key the stage wrote is a field of the class, and every field is written.
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(raw) == fields, (label, set(raw) ^ fields)
        assert loaded.to_json() == raw, label
        again = tmp_path / label / path.name
        again.parent.mkdir()
        loaded.write(again) if hasattr(loaded, "write") else loaded.save(again.parent)
        assert again.read_bytes() == written, f"{label}: rewriting through the class changed the file"
    concept = ConceptDict.load(categorized_tiny_project / "outputs" / "shapes" / "train")
    entry_fields = {f.name for f in dataclasses.fields(ConceptEntry)}
    raw_latents = json.loads(ConceptDict.path(categorized_tiny_project / "outputs" / "shapes" / "train").read_text())["latents"]
    assert raw_latents and all(set(v) == entry_fields for v in raw_latents.values())
    assert concept.names() == {int(k): v["name"] for k, v in raw_latents.items()}
    assert (concept.sae_dir(Project.open(categorized_tiny_project).cache) / "cfg.json").is_file()


def test_concept_dict_round_trip_and_refusals(tmp_path: Path) -> None:
    entry = ConceptEntry("stripes", 0.5, 0.25, "clip", None, "reference/latent_00003.png", [4, 1])
    concept = ConceptDict({"n_latents": 8, "class_names": ["a", "b"], "sae": str(tmp_path)}, {3: entry, 12: entry})
    path = concept.save(tmp_path)
    assert path == tmp_path / "concept_dict.json"
    raw = json.loads(path.read_text())
    assert raw["latents"]["3"] == {"name": "stripes", "score": 0.5, "clarity": 0.25, "source": "clip", "error": None,
                                   "reference_image": "reference/latent_00003.png", "reference_rows": [4, 1]}
    back = ConceptDict.load(tmp_path)
    assert back == concept and back.class_names == ["a", "b"] and back.n_latents == 8
    assert back.sae_dir(None) == tmp_path  # type: ignore[arg-type]  # a [dict] sae folder needs no cache
    # A field the class does not know (or one missing) is refused, not silently dropped.
    raw["latents"]["3"]["colour"] = "red"
    path.write_text(json.dumps(raw))
    with pytest.raises(CscopeError, match="not a concept dictionary"):
        ConceptDict.load(tmp_path)
    with pytest.raises(MissingArtifactError) as missing:
        ConceptDict.load(tmp_path / "nowhere")
    assert "cscope dict" in (missing.value.hint or "")


def test_categorization_and_valid_latents_keep_optional_fields_absent(tmp_path: Path) -> None:
    """A hand-made categorization without `ranking` (accepted by `cscope diff`) and a valid-latents
    file written before `thresholds` existed come back as they were, not with invented fields."""
    Categorization({"split": "train"}, None, {"a": {"bias": []}}).write(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == {"meta": {"split": "train"}, "classes": {"a": {"bias": []}}}
    assert Categorization.read(tmp_path / "c.json").ranking is None
    ValidLatents({}, [1, 2], 0, 2).save(tmp_path)
    assert set(json.loads(ValidLatents.path(tmp_path).read_text())) == {"meta", "valid_latents", "n_noisy", "n_strong"}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CscopeError, match="no meta/classes"):
        Categorization.read(tmp_path / "bad.json")
