"""The disk plan: `extract` and `dict` from images print what they will write and the free
space, refuse (exit 1, naming the ways out) when it does not fit, and go on with --force.
Free space is simulated by patching the one function that reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conceptscope_cli.cache import disk
from helpers import FAST_STAGES, make_tiny_project, run_main


def entries(project: Path, kind: str) -> list[Path]:
    folder = project / ".cscope" / "cache" / kind
    return [p for p in folder.iterdir() if (p / "record.json").is_file()] if folder.is_dir() else []


def _tight_disk(monkeypatch: pytest.MonkeyPatch, free: int = 10_000) -> None:
    monkeypatch.setattr(disk, "free_bytes", lambda path: free)


def test_extract_refuses_without_room_and_force_writes(tiny_project: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    _tight_disk(monkeypatch)
    refused = run_main(["extract"], tiny_project, capsys, monkeypatch)
    assert refused.exit_code == 1, refused.output
    for way_out in ("tokens_per_image", 'source = "images"', "cache_dir", "--force"):
        assert way_out in refused.output, way_out
    assert "not enough disk for extract" in refused.output and "10.0 KB free" in refused.output
    assert entries(tiny_project, "activations") == []

    forced = run_main(["extract", "--force"], tiny_project, capsys, monkeypatch)
    assert forced.exit_code == 0, forced.output
    assert "continuing because of --force" in forced.output
    (entry,) = entries(tiny_project, "activations")
    stats = json.loads((entry / "record.json").read_text())["stats"]
    # The plan's figure is the entry's real size (23 images in 3 shards of 8), to 20%.
    expected = disk.activation_bytes(23, stats["n_tokens"], stats["d_model"], "float16", n_shards=3)
    assert disk.human_bytes(expected) in forced.output
    written = sum(p.stat().st_size for p in (entry / "shards").glob("*.h5"))
    assert 0.8 * written <= expected <= 1.2 * written, (expected, written)


def test_plan_passes_when_it_fits(tiny_project: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    _tight_disk(monkeypatch, free=10**12)
    result = run_main(["extract", "--limit", "8"], tiny_project, capsys, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "disk plan: extract" in result.output and "continuing because of --force" not in result.output


@pytest.mark.slow
def test_dict_from_images_refuses_without_room_and_force_writes(tmp_path: Path, tiny_model_dir: Path, capsys,  # noqa: ANN001
                                                                monkeypatch) -> None:
    project = make_tiny_project(tmp_path, tiny_model_dir, FAST_STAGES.replace("[dict]\n", '[dict]\nsource = "images"\n'))
    assert run_main(["train"], project, capsys, monkeypatch).exit_code == 0
    _tight_disk(monkeypatch, free=1000)
    refused = run_main(["dict"], project, capsys, monkeypatch)
    assert refused.exit_code == 1, refused.output
    assert "not enough disk for dict" in refused.output and "active latents" in refused.output
    assert entries(project, "latents") == []
    forced = run_main(["dict", "--force"], project, capsys, monkeypatch)
    assert forced.exit_code == 0, forced.output
    (entry,) = entries(project, "latents")
    written = sum(p.stat().st_size for p in entry.iterdir() if p.suffix == ".h5")
    output = " ".join(forced.output.split())  # the console wraps long lines
    found = re.search(r"dict shapes/train from images .*? writes about ([0-9.]+) (KB|MB)", output)
    assert found, output
    planned = float(found.group(1)) * (1000 if found.group(2) == "KB" else 10**6)
    # The plan is the peak (3 parts beside the merged matrix, each at least one 256 KB HDF5 chunk
    # here), so at least what stays and at most parts + 1 times it.
    assert written <= planned <= 4 * written, (planned, written)


def test_human_bytes_is_decimal_with_one_decimal_above_bytes() -> None:
    """The one size formatter (cache ls, extract's summary and the disk plan all print through it)."""
    assert [disk.human_bytes(n) for n in (0, 999, 1000, 1_500_000, 45e9, 3e15)] == [
        "0 B", "999 B", "1.0 KB", "1.5 MB", "45.0 GB", "3000.0 TB"]
