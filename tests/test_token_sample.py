"""Training needs only a token sample: `cscope run` on a fresh project caches K tokens per
image for `train`, makes the dictionary straight from the images, and never writes a
full-token cache entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import FAST_CATEGORIZE, FAST_STAGES, make_tiny_project, run_cli


@pytest.mark.slow
def test_run_on_a_fresh_project_writes_a_token_sample_and_no_full_token_cache(tmp_path: Path,
                                                                               tiny_model_dir: Path) -> None:
    project = make_tiny_project(tmp_path, tiny_model_dir, FAST_STAGES + FAST_CATEGORIZE)
    manifest = project / "cscope.toml"
    manifest.write_text(manifest.read_text().replace("chunk_images = 4\n", "chunk_images = 4\ntokens_per_image = 4\n"))
    result = run_cli(["run"], project, timeout=900)
    assert result.exit_code == 0, result.output
    cache = project / ".cscope" / "cache"
    records = {kind: [json.loads((p / "record.json").read_text()) for p in (cache / kind).iterdir()
                      if (p / "record.json").is_file()] for kind in ("activations", "sae", "latents")}
    # Every activation entry is the seeded sample: 4 patch tokens + CLS of the 17 per image.
    assert records["activations"] and all(r["stats"]["n_tokens"] == 5 and not r["stats"]["all_tokens"]
                                          for r in records["activations"])
    assert {r["inputs"]["tokens_per_image"] for r in records["activations"]} == {4}
    assert len(records["sae"]) == 1
    assert records["latents"] and all(r["stats"]["source"] == "images" for r in records["latents"])
    assert (project / "outputs" / "shapes" / "train" / "concept_dict.json").is_file()
    assert (project / "outputs" / "report" / "shapes" / "train" / "report.html").is_file()
