"""The pure parts of `cscope export` (export/stage.py) on hand-made inputs: the stamp record and its
reader (what makes an unchanged export a no-op), the settings override, the stamp's inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conceptscope_cli.artifacts import ConceptDict, ConceptEntry
from conceptscope_cli.config.schema import FieldValueError
from conceptscope_cli.config.sections import ExportConfig
from conceptscope_cli.export.stage import (
    STAMP_FILE,
    ExportedFile,
    ExportResult,
    current_export,
    export_settings,
    export_stamp,
    stamp_record,
)


def _written(target: Path) -> ExportResult:
    (target / "sae" / "saelens").mkdir(parents=True)
    (target / "concepts.csv").write_text("a,b\n")
    (target / "report.html").write_text("<html></html>")
    return ExportResult(target, [ExportedFile("csv", target / "concepts.csv", 4),
                                 ExportedFile("saelens", target / "sae" / "saelens", 0),
                                 ExportedFile("html", target / "report.html", 13)], report_form="single")


def test_the_stamp_record_is_read_back_as_the_same_export_even_after_a_move(tmp_path: Path) -> None:
    result = _written(tmp_path / "a")
    record = stamp_record("s1", result)
    assert record["files"][1] == {"kind": "saelens", "path": "sae/saelens", "size_bytes": 0}  # relative paths
    (tmp_path / "a" / STAMP_FILE).write_text(json.dumps(record))
    (tmp_path / "a").rename(tmp_path / "b")  # a moved project is still up to date
    again = current_export(tmp_path / "b", "s1")
    assert again is not None and again.up_to_date and again.report_form == "single"
    assert [(f.kind, f.path, f.size_bytes) for f in again.files] == [
        (f.kind, tmp_path / "b" / f.path.relative_to(tmp_path / "a"), f.size_bytes) for f in result.files]
    assert current_export(tmp_path / "b", "s2") is None  # other inputs
    (tmp_path / "b" / "report.html").unlink()
    assert current_export(tmp_path / "b", "s1") is None  # a file is gone


def test_settings_override_the_formats_and_refuse_an_unknown_one(tmp_path: Path) -> None:
    base = ExportConfig(formats=["html"])
    assert export_settings(None, base, ["csv", "json"]).formats == ["csv", "json"]  # type: ignore[arg-type]
    assert export_settings(None, base, None) is base  # type: ignore[arg-type]
    with pytest.raises(FieldValueError, match="unknown export format"):  # names the key and its line (CLI)
        export_settings(None, base, ["pdf"])  # type: ignore[arg-type]


def test_the_stamp_follows_names_and_settings_but_not_tiles() -> None:
    def concept(name: str, tile: str) -> ConceptDict:
        return ConceptDict({}, {7: ConceptEntry(name, None, None, "clip", None, tile)})

    cfg = ExportConfig()
    base = export_stamp("c1", concept("stripes", "reference/a.png"), cfg, None)
    assert export_stamp("c1", concept("stripes", "reference/b.png"), cfg, None) == base
    assert export_stamp("c1", concept("spots", "reference/a.png"), cfg, None) != base
    assert export_stamp("c2", concept("stripes", "reference/a.png"), cfg, None) != base
    assert export_stamp("c1", concept("stripes", "reference/a.png"), ExportConfig(formats=["csv"]), None) != base
