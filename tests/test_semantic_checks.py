"""Issue 20: manifest values that only the model or the data can check still point at their
line (exit 2); nonsense devices and non-finite edit values are clear errors, not exit 70."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_cli, run_main


def _append(project: Path, text: str) -> int:
    """Append `text` to the manifest; returns the line number of its last line."""
    manifest = project / "cscope.toml"
    manifest.write_text(manifest.read_text() + text)
    return len(manifest.read_text().splitlines())


def _line_of(project: Path, needle: str) -> int:
    return next(i for i, text in enumerate((project / "cscope.toml").read_text().splitlines(), 1) if needle in text)


def test_layer_beyond_the_model_names_its_line(tiny_project: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tiny_project / "cscope.toml"
    manifest.write_text(manifest.read_text().replace("layer = -2", "layer = 7"))
    result = run_main(["extract", "--split", "test"], tiny_project, capsys, monkeypatch)
    assert result.exit_code == 2, result.output
    line = _line_of(tiny_project, "layer = 7")
    assert f"cscope.toml:{line}: `layer` in section [backbone]: layer 7 does not exist: the model has 3 blocks" \
        in result.stderr


@pytest.mark.parametrize(("extra", "needle", "message"), [
    ('\n[run]\nstages = ["extract", "trian"]\n', "stages =", "`stages` in section [run]: unknown stage(s): trian"),
    ('\n[run]\ndataset = "nope"\nstages = ["extract"]\n', "dataset =", "`dataset` in section [run]: unknown dataset 'nope'"),
])
def test_run_section_values_name_their_line(tiny_project: Path, extra: str, needle: str, message: str) -> None:
    _append(tiny_project, extra)
    result = run_cli(["run"], tiny_project)
    assert result.exit_code == 2, result.output
    assert f"cscope.toml:{_line_of(tiny_project, needle)}: {message}" in result.stderr


def test_missing_label_column_names_its_line(tiny_project: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tiny_project / "cscope.toml"
    manifest.write_text(manifest.read_text().replace('attribute_columns = ["colour"]',
                                                     'attribute_columns = ["colour"]\nlabel_column = "klass"'))
    result = run_main(["extract", "--split", "test"], tiny_project, capsys, monkeypatch)
    assert result.exit_code == 2, result.output
    line = _line_of(tiny_project, 'label_column = "klass"')
    assert f"cscope.toml:{line}: `label_column` in section [datasets.shapes]: dataset 'shapes' has no label column" \
        in result.stderr


@pytest.mark.parametrize("device", ["meta", "xla", "cuda:x"])
def test_nonsense_devices_are_clear_errors(tiny_project: Path, device: str, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main(["extract", "--split", "test", "--device", device], tiny_project, capsys, monkeypatch)
    assert result.exit_code in (1, 2), result.output
    assert f"{device!r}" in result.stderr and "internal error" not in result.output
    manifest = tiny_project / "cscope.toml"
    manifest.write_text(manifest.read_text().replace('device = "cpu"', f'device = "{device}"'))
    from_manifest = run_main(["extract", "--split", "test"], tiny_project, capsys, monkeypatch)
    assert from_manifest.exit_code == 2 and "`device` in section [project]" in from_manifest.stderr


def test_edit_values_must_be_finite() -> None:
    import numpy as np

    from conceptscope_cli.ablate.edit import edit_values
    from conceptscope_cli.errors import CscopeError

    maxima = np.array([1.0, 2.0])
    assert edit_values([1], 0.5, None, maxima) == [1.0]
    for scale, value in ((float("nan"), None), (float("inf"), None), (None, float("nan"))):
        with pytest.raises(CscopeError, match="must be a finite number") as caught:
            edit_values([1], scale, value, maxima)
        assert caught.value.exit_code == 2


def test_k_above_the_dictionary_size_names_its_line(tiny_project: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """expansion 4 × width 32 = 128 latents: k = 1000 used to crash inside training (exit 70)."""
    line = _append(tiny_project, '\n[sae]\narchitecture = "topk"\nexpansion = 4\nk = 1000\n')
    result = run_main(["train", "--split", "test"], tiny_project, capsys, monkeypatch)
    assert result.exit_code == 2, result.output
    assert (f"cscope.toml:{line}: `k` in section [sae]: 1000 active latents per token, but the SAE has 128 latents"
            in result.stderr)
