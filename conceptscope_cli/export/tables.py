"""Class × concept tables (CSV and JSON) from the categorization.

One row per (class, candidate latent): every score the categorize stage wrote. The JSON
file is a list of records and the CSV has a header row, so both load with pandas as
`pd.read_json(path)` and `pd.read_csv(path)`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

#: Columns, in order. `type` is target, context, uncertain, bias or entangled (a bias concept is a
#: context concept reported by the run's bias rule, listed once, as bias; an entangled one was
#: over-represented on whole images but not without its object, the context-only check). The
#: context_only_* columns are that check's effect and CI (empty without it). The evidence columns
#: (effect = Cliff's delta class vs rest, its CI, AUROC, p, BH q, presence in class and rest,
#: images behind each, delta against the typical other class) are FORMATS.md's categorization
#: entry fields; `members` the concept group's latents, `replicate_fraction` the share of SAE-seed
#: replicates making a bias claim.
COLUMNS = (
    "class", "class_name", "n_images", "latent", "name", "type",
    "alignment_score", "normalized_alignment_score", "sufficiency", "necessity",
    "concept_strength", "class_frequency", "frequency",
    "effect", "effect_low", "effect_high", "auroc", "p_value", "q_value",
    "present_class", "present_rest", "n_class", "n_rest", "effect_typical",
    "members", "replicate_fraction", "context_only_effect", "context_only_effect_low", "context_only_effect_high",
)
_SCORES = COLUMNS[6:-5]


def class_entries(categorization: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(class name, class result) in label order."""
    yield from sorted(categorization["classes"].items(), key=lambda item: item[1]["class"])


def concept_rows(categorization: dict[str, Any], names: dict[str, str | None] | None = None) -> list[dict[str, Any]]:
    """Rows of the table. `names` ({latent id: name}, e.g. from concept_dict.json) wins over the
    name stored in the categorization, so a renamed concept shows its current name."""
    rows = []
    for class_name, info in class_entries(categorization):
        bias = {e["latent"] for e in info.get("bias", [])}
        entangled = {e["latent"] for e in info.get("entangled", [])}
        replicated = {e["latent"]: e.get("replicate_fraction") for e in info.get("bias", [])}
        checked = {e["latent"]: e["context_only"] for kind in ("bias", "entangled") for e in info.get(kind, [])
                   if "context_only" in e}
        for kind in ("target", "context", "uncertain"):
            for entry in info.get(kind, []):
                latent = int(entry["latent"])
                name = entry.get("name")
                if names is not None and str(latent) in names:
                    name = names[str(latent)]
                row = {"class": int(info["class"]), "class_name": class_name, "n_images": info.get("n_images"),
                       "latent": latent, "name": name,
                       "type": ("bias" if latent in bias else "entangled" if latent in entangled else kind)
                       if kind == "context" else kind}
                row.update({key: entry.get(key) for key in _SCORES})
                # The concept group's latents (representative first, ";"-separated) and, for a bias
                # claim of a run with replicates, the fraction of SAE seeds that make it.
                row["members"] = ";".join(str(int(m)) for m in entry.get("members") or [latent])
                row["replicate_fraction"] = replicated.get(latent) if latent in bias else None
                check = checked.get(latent, {}) if kind == "context" else {}
                for key in ("effect", "effect_low", "effect_high"):
                    row[f"context_only_{key}"] = check.get(key)
                rows.append(row)
    return rows


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection):
# class and concept names come from data and from a VLM, so they are never trusted.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formula(value: Any) -> Any:
    """A text cell that a spreadsheet would evaluate, prefixed with `'` (OWASP's advice); numbers unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """RFC 4180 CSV with a header; None is written as an empty field (NaN in pandas). Text cells
    starting with = + - @ tab or CR get a leading `'` so no spreadsheet runs them as formulas."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        # CRLF rows (RFC 4180): the writer then quotes any cell holding a CR or LF, so a name cannot break a row.
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), lineterminator="\r\n")
        writer.writeheader()
        for row in rows:
            # repr keeps every float digit, so the CSV reads back to the exact JSON values
            writer.writerow({k: repr(v) if isinstance(v, float) else neutralise_formula(v) for k, v in row.items()})
    os.replace(tmp, path)
    return path


def write_json(rows: list[dict[str, Any]], path: Path) -> Path:
    """A JSON list of row objects (pandas' "records" orient)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
