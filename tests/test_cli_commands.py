"""The commands users type, through the real entry point: attribute, export, the three ablate
commands and `train --import`. Each test checks what the command wrote against what it printed
and against the stage's own definition, and one bad input per command."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import run_cli, run_main


def _valid_latents(project: Path) -> list[int]:
    concept = json.loads((project / "outputs" / "shapes" / "train" / "concept_dict.json").read_text())
    return sorted(int(k) for k in concept["latents"])


def _image(project: Path, i: int = 1) -> Path:
    return project.parent / "images" / "test" / f"{i:05d}.png"


# --------------------------------------------------------------------------- attribute
@pytest.mark.slow  # CLI end to end on the categorized tiny project
def test_attribute_command_prints_and_writes_the_same_ranking(categorized_tiny_project: Path, tmp_path: Path) -> None:
    project, out = categorized_tiny_project, tmp_path / "attr"
    result = run_cli(["attribute", "-i", str(_image(project)), "-p", "a red image", "-p", "a blue image",
                      "--top", "3", "--out", str(out)], project)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "attribution.json").read_text())
    (image,) = data["images"]
    assert Image.open(out / image["figure"]).size[0] > 0
    for prompt in image["prompts"]:
        ranked = sorted(prompt["attribution"].items(), key=lambda kv: -kv[1])
        top = [e["latent"] for e in prompt["top"]]
        # the top list is the largest attributions among the active latents, largest first
        assert top == [int(k) for k, v in ranked[:3] if v > 0][: len(top)] and top
        # and the table the user sees starts with it
        row = re.search(rf"│ \+ +│ +{top[0]} +│", result.stdout)
        assert row, result.stdout
    bad = run_cli(["attribute", "-i", str(_image(project)), "-p", "x", "--objective", "logit"], project)
    assert bad.exit_code == 2 and "unknown objective 'logit'" in bad.output  # a bad flag value: a usage error


# --------------------------------------------------------------------------- export
@pytest.mark.slow  # CLI end to end on the categorized tiny project
def test_export_command_writes_tables_of_the_categorization(categorized_tiny_project: Path, tmp_path: Path) -> None:
    project, out = categorized_tiny_project, tmp_path / "report"
    result = run_cli(["export", "--format", "csv,json", "--out", str(out)], project)
    assert result.exit_code == 0, result.output
    listed = re.findall(r"^(csv|json)\s+(\S+)", result.stdout, re.M)
    assert {kind for kind, _ in listed} == {"csv", "json"} and all(Path(p).is_file() for _, p in listed)
    categorization = json.loads((project / "outputs" / "shapes" / "train_concept_categorization.json").read_text())
    # One row per listed concept; a context concept that is a bias is listed once, as "bias" (FORMATS.md).
    bias = {(name, e["latent"]) for name, info in categorization["classes"].items() for e in info["bias"]}
    expected = {(name, "bias" if kind == "context" and (name, e["latent"]) in bias else kind, e["latent"])
                for name, info in categorization["classes"].items()
                for kind in ("target", "context", "uncertain") for e in info.get(kind, [])}
    assert {(name, latent) for name, kind, latent in expected if kind == "bias"} == bias
    csv_path = next(Path(p) for kind, p in listed if kind == "csv")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {(r["class_name"], r["type"], int(r["latent"])) for r in rows} == expected
    bad = run_cli(["export", "--format", "pdf"], project)
    assert bad.exit_code != 0 and "pdf" in bad.output


# --------------------------------------------------------------------------- ablate
@pytest.mark.slow  # CLI end to end on the categorized tiny project
def test_ablate_faithfulness_command(categorized_tiny_project: Path) -> None:
    project = categorized_tiny_project
    result = run_cli(["ablate", "faithfulness", "--max-images", "3", "--batch-size", "3"], project)
    assert result.exit_code == 0, result.output
    json_path = Path(re.search(r"wrote (\S+\.json)", result.stdout)[1])
    data = json.loads(json_path.read_text())
    assert data["meta"]["n_images"] == 3
    starts = set()
    for ranking, curves in data["rankings"].items():
        deletion, insertion = curves["deletion"], curves["insertion"]
        shown = re.search(rf"^│ {ranking} +│ +([-\d.]+) ± [\d.]+ +│ +([-\d.]+) ±", result.stdout, re.M)
        assert shown, (ranking, result.stdout)
        assert float(shown[1]) == pytest.approx(deletion["area"], abs=6e-5)
        assert float(shown[2]) == pytest.approx(insertion["area"], abs=6e-5)
        starts.add(round(deletion["mean"][0], 6))
    assert len(starts) == 1  # deleting nothing is the unedited model, whatever the ranking
    # attribution ranks the latents that matter first: deleting them lowers y more than random ones
    assert data["rankings"]["attribution"]["deletion"]["area"] < data["rankings"]["random"]["deletion"]["area"]
    bad = run_cli(["ablate", "faithfulness", "--max-images", "0"], project)
    assert bad.exit_code == 2 and "--max-images" in bad.output  # a flag's range error is a usage error


@pytest.mark.slow  # CLI end to end on the categorized tiny project
def test_ablate_classes_command(categorized_tiny_project: Path) -> None:
    project = categorized_tiny_project
    result = run_cli(["ablate", "classes", "--max-images", "6"], project)
    assert result.exit_code == 0, result.output
    data = json.loads(Path(re.search(r"wrote (\S+\.json)", result.stdout)[1]).read_text())
    assert set(data["classes"]) == {"red", "green", "blue"}
    for name, info in data["classes"].items():
        row = re.search(rf"^│ {name}\s+│\s+([\d.]+)\s+│\s+([\d.]+)", result.stdout, re.M)
        assert row, result.stdout
        assert float(row[1]) == pytest.approx(info["accuracy"]["unspliced"], abs=5e-4)
        assert float(row[2]) == pytest.approx(info["accuracy"]["spliced"], abs=5e-4)
        assert info["accuracy"]["spliced"] == info["accuracy"]["unspliced"]  # the error term is kept
    bad = run_cli(["ablate", "classes", "--split", "nope"], project)
    assert bad.exit_code != 0 and "nope" in bad.output


@pytest.mark.slow  # CLI end to end on the categorized tiny project
def test_ablate_edit_command(categorized_tiny_project: Path, tmp_path: Path) -> None:
    project, out = categorized_tiny_project, tmp_path / "edit"
    latent = _valid_latents(project)[0]
    result = run_cli(["ablate", "edit", "-i", str(_image(project)), "-l", str(latent), "-p", "a red image",
                      "-p", "a green image", "--value", "50", "--out", str(out)], project)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "edit.json").read_text())
    (image,) = data["images"]
    assert (out / image["figure"]).is_file()
    changes = [p["similarity_change"] for p in image["prompts"]]
    assert max(abs(c) for c in changes) > 1e-4  # a latent set to 50 moves the embedding
    for p in image["prompts"]:
        assert p["similarity_change"] == pytest.approx(p["similarity_after"] - p["similarity_before"], abs=1e-6)
        assert f"{p['similarity_change']:+.4f}" in result.stdout
    bad = run_cli(["ablate", "edit", "-i", str(_image(project)), "-l", "999999", "-p", "x"], project)
    assert bad.exit_code != 0 and "999999" in bad.output


# --------------------------------------------------------------------------- train --import
def test_train_import_converts_a_patchsae_checkpoint(tiny_project: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`cscope train --import file.pt`: the converted SAE encodes exactly like the source weights
    (the command in-process, run_main: the conversion and its refusals are the subject)."""
    from conceptscope_cli.sae.checkpoint import load_sae
    from conceptscope_cli.sae.model import SparseAutoencoder

    source = SparseAutoencoder(8, 32, "relu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        source.b_dec.normal_()
        source.b_enc.normal_(std=0.1)
    state = {name: getattr(source, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    checkpoint = tmp_path / "patchsae.pt"
    torch.save({"cfg": {"d_in": 8, "expansion_factor": 4, "block_layer": -2}, "state_dict": state}, checkpoint)
    out = tmp_path / "converted"
    result = run_main(["train", "--import", str(checkpoint), "--out", str(out)], tiny_project, capsys, monkeypatch)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout.replace("\n", "")
    imported, _ = load_sae(out)
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(imported.encode(z), source.encode(z))
    torch.testing.assert_close(imported.decode(imported.encode(z)), source.decode(source.encode(z)))
    missing = run_main(["train", "--import", str(tmp_path / "nothing.pt")], tiny_project, capsys, monkeypatch)
    assert missing.exit_code == 1 and "nothing to import" in missing.output
    (tmp_path / "not-a-zip.pt").write_bytes(b"\x80\x04 legacy pickle")
    unsafe = run_main(["train", "--import", str(tmp_path / "not-a-zip.pt")], tiny_project, capsys, monkeypatch)
    assert unsafe.exit_code == 1 and "refused" in unsafe.output
