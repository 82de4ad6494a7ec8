"""The report's "Bias groups and model checks" section: act outputs reach the page as text."""

from __future__ import annotations

import json
from pathlib import Path

from conceptscope_cli.act.report import act_fingerprint, act_section
from conceptscope_cli.config.sections import ExportConfig
from conceptscope_cli.export.report import build_report_data, render_report
from helpers import EVIL, Dom, browse, synthetic_inputs


def _act_outputs(outputs: Path) -> None:
    groups = outputs / "synthetic" / "test" / "groups"
    check = outputs / "synthetic" / "test" / "check"
    groups.mkdir(parents=True)
    check.mkdir(parents=True)
    (groups / "groups.json").write_text(json.dumps({
        "meta": {"split": "test", "claims_split": "train", "n_images": 500, "threshold_rule": "Youden"},
        "claims": [{"class": "cross", "concept": "3", "name": EVIL, "threshold": 0.523, "youden_j": 0.64,
                    "roles": {"aligned": 26, "conflicting": 74, "other_with": 127, "other_without": 273}}]}))
    (check / "probe.json").write_text(json.dumps({
        "meta": {"split": "test", "model": {"kind": "probe", "description": "linear probe"}},
        "accuracy": 0.972, "simultaneous_level": 0.9972, "worst_group": {"group": "cross∧¬#3", "n": 74, "accuracy": 0.892},
        "biases": [{"label": "cross ← a small star #3", "verdict": "relies on it",
                    "gap": {"gap": 0.108, "low": 0.014, "high": 0.23, "accuracy_aligned": 1.0, "n_aligned": 26,
                            "accuracy_conflicting": 0.892, "n_conflicting": 74}}]}))


def test_report_shows_groups_and_checks(tmp_path: Path, chromium: str) -> None:  # noqa: F811
    outputs = tmp_path / "outputs"
    assert act_section(outputs, "synthetic") is None
    before = act_fingerprint(outputs, "synthetic")
    _act_outputs(outputs)
    assert act_fingerprint(outputs, "synthetic") != before  # a new check re-renders the report
    inputs = synthetic_inputs(tmp_path / "data", n_classes=3, n_latents=30)
    inputs.act = act_section(outputs, "synthetic")
    data, store = build_report_data(inputs, ExportConfig())
    page = render_report(data, store, tmp_path / "report", ExportConfig()).path
    assert EVIL not in page.read_text()
    dom = Dom(browse(chromium, page, "", tmp_path))
    text = dom.text("act")
    assert "Groups of test (500 images; claims from train)" in text and EVIL in text  # as text, never markup
    assert "accuracy 0.972, worst group 0.892 (cross∧¬#3, n=74)" in text
    cells = [" ".join(e["text"]).strip() for e in dom.inside("act", "td")]
    assert "0.108" in cells and "0.014" in cells and "relies on it" in cells and "74" in cells
    assert not [e for e in dom.elements if "onerror" in e["attrs"]]
