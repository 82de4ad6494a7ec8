"""Manifest validation: every user error names the key, the section and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptscope_cli.config.manifest import load_manifest, locate_lines
from conceptscope_cli.config.sections import BackboneConfig, DatasetConfig, ExtractConfig
from conceptscope_cli.errors import ManifestError
from helpers import run_cli, run_main, write_manifest

GOOD = """
[project]
seed = 3

[backbone]
model = "ViT-B-16"
layer = -2

[datasets.birds]
source = "imagefolder"
path = "data/birds"
splits = ["train", "test"]
"""


def test_valid_manifest_fills_defaults(tmp_path: Path) -> None:
    manifest = load_manifest(write_manifest(tmp_path, GOOD))
    assert manifest.get(BackboneConfig).tokens == "all"
    assert manifest.get(ExtractConfig).batch_size == 64
    birds = manifest.named(DatasetConfig)["birds"]
    assert birds.splits == ["train", "test"] and birds.label_column == "label"


def test_templates_are_valid_manifests(tmp_path: Path) -> None:
    from conceptscope_cli.pipeline.init import render_project_manifest

    path = tmp_path / "cscope.toml"
    path.write_text(render_project_manifest("proj")[0])
    load_manifest(path)


def test_unknown_key_names_key_section_line_and_suggestion(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, GOOD.replace("layer = -2", "layre = -2"))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "unknown key `layre`" in message and "[backbone]" in message
    assert f"{path}:6:" in message
    assert info.value.hint == "did you mean `layer`?"


def test_wrong_type_names_expected_type(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, GOOD.replace("seed = 3", 'seed = "three"'))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert f"{path}:2:" in str(info.value)
    assert "`seed` in section [project]: expected an integer, got a string" in str(info.value)


def test_literal_value_lists_choices(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, GOOD.replace('layer = -2', 'tokens = "everything"'))
    with pytest.raises(ManifestError, match=r'expected one of "all", "cls", "patches"'):
        load_manifest(path)


def test_missing_required_key_in_named_section(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, GOOD.replace('path = "data/birds"\n', ""))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert "missing required key `path` in section [datasets.birds]" in str(info.value)
    assert f"{path}:8:" in str(info.value)


def test_unknown_section_suggests(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, GOOD + "\n[backbon]\nlayer = 1\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert "unknown section [backbon]" in str(info.value) and info.value.hint == "did you mean [backbone]?"


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, GOOD.replace("seed = 3", "seed = = 3"))
    with pytest.raises(ManifestError, match=r":2: invalid TOML"):
        load_manifest(path)


def test_locate_lines_handles_dotted_and_quoted_keys() -> None:
    lines = locate_lines('a = 1\n[x.y]\n"b" = 2\nc.d = 3\ns = """\nz = 9\n"""\n')
    assert lines[("a",)] == 1 and lines[("x", "y")] == 2
    assert lines[("x", "y", "b")] == 3 and lines[("x", "y", "c", "d")] == 4
    assert ("x", "y", "z") not in lines  # inside a multi-line string


def test_cli_manifest_error_exit_code_and_no_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    write_manifest(tmp_path, GOOD.replace("layer = -2", "layre = -2"))
    result = run_main(["extract"], tmp_path, capsys, monkeypatch)
    assert result.exit_code == 2
    assert "unknown key `layre` in section [backbone]" in result.stderr and "did you mean `layer`?" in result.stderr
    assert "cscope.toml:6:" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow  # CLI end to end
def test_cli_missing_dataset_folder(tmp_path: Path) -> None:
    write_manifest(tmp_path, GOOD)
    result = run_cli(["extract", "--dataset", "birds"], tmp_path)
    assert result.exit_code == 2  # a manifest value, reported at its line
    assert "folder not found" in result.stderr and "data/birds" in result.stderr
    line = next(i for i, text in enumerate(GOOD.strip().splitlines(), 1) if "data/birds" in text)
    assert f"cscope.toml:{line}: `path` in section [datasets.birds]" in result.stderr
    assert "Traceback" not in result.output


def test_cli_without_project(tmp_path: Path, capsys, monkeypatch) -> None:
    result = run_main(["extract"], tmp_path, capsys, monkeypatch)
    assert result.exit_code == 1 and "no cscope.toml found" in result.stderr and "cscope init" in result.stderr


def test_flag_override_is_type_checked(tmp_path: Path) -> None:
    manifest = load_manifest(write_manifest(tmp_path, GOOD))
    manifest.override(ExtractConfig, batch_size=8, limit=None)
    assert manifest.get(ExtractConfig).batch_size == 8 and manifest.get(ExtractConfig).limit is None
