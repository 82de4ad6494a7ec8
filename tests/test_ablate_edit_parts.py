"""The pure parts of `cscope ablate edit` (ablate/edit.py) on hand-made batch parts: no model, no files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conceptscope_cli.ablate.common import batch_ranges
from conceptscope_cli.ablate.edit import check_request, edit_json, edit_notes, edit_values, image_edits
from conceptscope_cli.errors import CscopeError

PROMPTS = ["a cat", "a dog", "a bird"]


def _parts() -> tuple[list[dict], list[tuple[int, int]]]:
    """Three images in batches of two: image 0 moves from "a cat" to "a dog", image 1 stays "a bird",
    image 2 (second batch) moves from "a dog" to "a cat"."""
    ranges = batch_ranges(3, 2)
    first = {"similarity_before": [[0.30, 0.20, 0.10], [0.10, 0.15, 0.25]],
             "similarity_after": [[0.18, 0.31, 0.12], [0.12, 0.14, 0.22]],
             "probability_before": [[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]],
             "probability_after": [[0.2, 0.7, 0.1], [0.3, 0.2, 0.5]]}
    second = {"similarity_before": [[0.05, 0.40, 0.20]], "similarity_after": [[0.45, 0.41, 0.0]],
              "probability_before": [[0.1, 0.8, 0.1]], "probability_after": [[0.5, 0.5, 0.0]]}
    return [first, second], ranges


def test_image_edits_pair_each_image_with_its_batch_row_and_predict_by_largest_cosine() -> None:
    parts, ranges = _parts()
    assert ranges == [(0, 2), (2, 3)]
    files = [Path(f"img{i}.png") for i in range(3)]
    figures = [Path(f"/out/img{i}.png") for i in range(3)]
    results = image_edits(parts, ranges, files, figures, PROMPTS)
    assert [r.image for r in results] == files and [r.figure for r in results] == figures
    assert [(r.prediction_before, r.prediction_after) for r in results] == [
        ("a cat", "a dog"), ("a bird", "a bird"), ("a dog", "a cat")]
    third = results[2].prompts
    assert [p.prompt for p in third] == PROMPTS
    assert [round(p.similarity_change, 6) for p in third] == [0.4, 0.01, -0.2]
    assert (third[0].probability_before, third[0].probability_after) == (0.1, 0.5)


def test_edit_json_records_every_score_and_the_change() -> None:
    parts, ranges = _parts()
    results = image_edits(parts, ranges, [Path("a.png"), Path("b.png"), Path("c.png")],
                          [Path("/o/a.png"), Path("/o/b.png"), Path("/o/c.png")], PROMPTS)
    data = edit_json({"latents": [3]}, "s1", ["n"], results)
    assert data["meta"] == {"latents": [3], "stamp": "s1", "notes": ["n"]}
    first = data["images"][0]
    assert (first["image"], first["figure"], first["prediction_before"], first["prediction_after"]) == (
        "a.png", "a.png", "a cat", "a dog")
    dog = first["prompts"][1]
    assert dog["similarity_change"] == pytest.approx(0.31 - 0.20)
    assert (dog["probability_before"], dog["probability_after"]) == (0.3, 0.7)


def test_values_notes_and_refusals() -> None:
    maxima = np.array([0.0, 2.0, 0.5])
    assert edit_values([1, 2], 3.0, None, maxima) == [6.0, 1.5]
    assert edit_values([1, 2], None, 0.25, None) == [0.25, 0.25]
    assert edit_values([1], None, None, None) == [0.0]
    assert edit_notes([0, 1], maxima) and edit_notes([1, 2], maxima) == [] and edit_notes([0], None) == []
    assert check_request(["a cat", "  ", ""], [1], 4) == ["a cat"]
    for prompts, latents, batch, message in ((["  "], [1], 4, "no prompt"), (["a"], [], 4, "no latent"),
                                             (["a"], [1], 0, "batch_size")):
        with pytest.raises(CscopeError, match=message):
            check_request(prompts, latents, batch)
