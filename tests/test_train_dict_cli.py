"""`cscope train` and `cscope dict` through the CLI on the tiny ViT and generated images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conceptscope_cli.project import Project
from helpers import FAST_STAGES as SAE_AND_DICT  # kept under its old name
from helpers import run_cli


def _project(tiny_project: Path) -> Path:
    with open(tiny_project / "cscope.toml", "a") as manifest:
        manifest.write(SAE_AND_DICT)
    return tiny_project


@pytest.mark.slow  # CLI end to end
def test_train_then_dict_writes_documented_outputs(tiny_project: Path) -> None:
    project_dir = _project(tiny_project)
    trained = run_cli(["train"], project_dir)
    assert trained.exit_code == 0, trained.output
    assert "trained SAE (relu, 128 latents)" in trained.stdout and "held-out evaluation" in trained.stdout
    again = run_cli(["train"], project_dir)
    assert again.exit_code == 0 and "up to date" in again.stdout

    built = run_cli(["dict", "--split", "train"], project_dir)
    assert built.exit_code == 0, built.output
    out = project_dir / "outputs" / "shapes" / "train"
    valid = json.loads((out / "valid_latents.json").read_text())
    concept = json.loads((out / "concept_dict.json").read_text())
    assert valid["valid_latents"] and set(concept["latents"]) == {str(k) for k in valid["valid_latents"]}
    first = concept["latents"][str(valid["valid_latents"][0])]
    assert first["source"] == "clip" and isinstance(first["name"], str) and first["name"]
    tile = Image.open(out / first["reference_image"])
    # up to 5 crops of 32 px with 2-px gaps, as many as the latent has active images
    assert tile.size[1] == 32 and tile.size[0] in {32 * n + 2 * (n - 1) for n in range(1, 6)}
    assert 5 not in first["reference_rows"]  # the corrupt image never appears

    entries = {e.kind for e in Project.open(project_dir).cache.entries()}
    assert entries - {"listing"} == {"activations", "sae", "latents"}  # a listing: the image folder opened (FORMATS.md)
    rerun = run_cli(["dict", "--split", "train"], project_dir)
    assert rerun.exit_code == 0 and "up to date" in rerun.stdout


@pytest.mark.slow  # CLI end to end
def test_dict_namer_none_and_missing_openai_key(tiny_project: Path) -> None:
    project_dir = _project(tiny_project)
    result = run_cli(["dict", "--split", "test", "--namer", "none"], project_dir)
    assert result.exit_code == 0, result.output
    concept = json.loads((project_dir / "outputs" / "shapes" / "test" / "concept_dict.json").read_text())
    assert all(v["name"] is None and v["source"] == "none" for v in concept["latents"].values())
    no_key = run_cli(["dict", "--split", "test", "--namer", "openai"], project_dir, env={"OPENAI_API_KEY": ""})
    assert no_key.exit_code != 0 and "OPENAI_API_KEY" in no_key.stderr and "Traceback" not in no_key.output
