"""The report's "Bias groups and model checks" section: what `cscope groups` and
`cscope check-model` wrote for a dataset, reduced to the figures the page shows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def _files(outputs_dir: Path, dataset: str) -> list[Path]:
    root = outputs_dir / dataset
    return sorted(root.glob("*/groups/groups.json")) + sorted(root.glob("*/check/*.json"))


def act_fingerprint(outputs_dir: Path, dataset: str) -> str:
    """Hash of the section's inputs (so an export re-renders when a groups/check file changes)."""
    digest = hashlib.sha256()
    for path in _files(outputs_dir, dataset):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


def act_section(outputs_dir: Path, dataset: str) -> dict[str, Any] | None:
    """{"groups": [...], "checks": [...]} from the dataset's act outputs; None when there are none."""
    groups, checks = [], []
    for path in _files(outputs_dir, dataset):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a half-written file of a concurrent run: the next export shows it
        meta = data.get("meta", {})
        if path.name == "groups.json":
            groups.append({"split": meta.get("split"), "claims_split": meta.get("claims_split"),
                           "n_images": meta.get("n_images"), "rule": meta.get("threshold_rule"),
                           "claims": [{"claim": f"{c['class']} \u2190 {c.get('name') or 'concept'} #{c['concept']}",
                                       "threshold": c.get("threshold"), "j": c.get("youden_j"), **c.get("roles", {})}
                                      for c in data.get("claims", [])]})
        elif "biases" in data:
            model = meta.get("model", {})
            checks.append({"split": meta.get("split"), "model": model.get("kind"),
                           "description": model.get("description"), "accuracy": data.get("accuracy"),
                           "worst_group": data.get("worst_group"), "level": data.get("simultaneous_level"),
                           "biases": [{"claim": b["label"], "verdict": b["verdict"], **b["gap"]}
                                      for b in data["biases"]]})
    return {"groups": groups, "checks": checks} if groups or checks else None
