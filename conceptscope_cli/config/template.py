"""The `cscope.toml` that `cscope init` writes, rendered from the registered sections.

Every field of every registered section appears, with its help text as a comment: the keys
a project sets are written as values, the others commented out at their default. Because the
text is generated from the section dataclasses, a key added to a section is in the template
the same day (tests/test_init.py checks it against `registered_sections()`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from typing import Any

from conceptscope_cli.config.manifest import registered_sections

HEADER = """\
# cscope project manifest, written by `cscope init`.
# Keys set to a value were chosen for this project; commented keys show their default
# (uncomment to change one). Command-line flags override values for one run
# (e.g. `cscope extract --device cuda:0`). Reference: README.md, "Manifest".
"""

# One line on what each section is for; sections without an entry get none.
SECTION_NOTES = {
    "project": "Project-wide settings.",
    "backbone": "The CLIP vision transformer whose residual stream is analysed.",
    "datasets": "One table per dataset: [datasets.NAME].",
    "extract": "`cscope extract`: cache the backbone's activations.",
    "run": "`cscope run`: the stages it executes, in pipeline order.",
    "sae": '`cscope train`: the sparse autoencoder. "auto" values are derived from the data and the model '
           "(README, \"Defaults derived from the data\").",
    "dict": "`cscope dict`: image-level latents, valid latents, reference tiles, names.",
    "categorize": "`cscope categorize`: per class, target / context / bias concepts.",
    "openai": "The openai namer ([dict] namer = \"openai\"); the key is read from OPENAI_API_KEY or .env.",
    "export": "`cscope export`: the HTML report, tables and SAE files.",
    "ablate": "`cscope ablate`: faithfulness, class and edit ablations.",
}
# Sections in the order a reader meets them in the pipeline; others follow in registration order.
ORDER = ("project", "backbone", "datasets", "extract", "sae", "dict", "categorize", "export", "run", "openai", "ablate")


def toml_value(value: Any) -> str:
    """A TOML literal for a manifest value (str, bool, int, float, list, dict)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 100_000 else str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string for printable text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, width=98)] if text else []


def render_table(title: str, cls: type, values: dict[str, Any], notes: dict[str, str] | None = None) -> list[str]:
    """`[title]` with every field of `cls`: set ones from `values`, the others commented out."""
    notes = notes or {}
    lines = [f"[{title}]"]
    for field in dataclasses.fields(cls):
        lines.extend(_comment(str(field.metadata.get("help", ""))))
        note = f"  # {notes[field.name]}" if field.name in notes else ""
        if field.name in values:
            lines.append(f"{field.name} = {toml_value(values[field.name])}{note}")
            continue
        default = _default(field)
        if default is dataclasses.MISSING:
            lines.append(f"# {field.name} = ...   # required{note}")
        elif default is None:
            lines.append(f"# {field.name} =   # unset by default{note}")
        else:
            lines.append(f"# {field.name} = {toml_value(default)}{note}")
    return lines


def render_manifest(values: dict[str, Any], notes: dict[str, dict[str, str]] | None = None,
                    preamble: str = "") -> str:
    """The whole manifest. `values[section]` holds the keys that are set; for a named section
    (datasets) it maps NAME -> keys. `notes[section]` adds a trailing comment to a key."""
    import conceptscope_cli.config.sections  # noqa: F401 - registers every section

    notes = notes or {}
    specs = registered_sections()
    names = [n for n in ORDER if n in specs] + [n for n in specs if n not in ORDER]
    out = [HEADER.rstrip("\n")]
    if preamble:
        out.extend(_comment(preamble))
    for name in names:
        spec = specs[name]
        out.append("")
        out.extend(_comment(SECTION_NOTES.get(name, "")))
        if spec.named:
            tables = values.get(name) or {}  # the caller names at least one table (a manifest needs a dataset)
            for item, table in tables.items():
                out.extend(render_table(f"{name}.{item}", spec.cls, table, notes.get(f"{name}.{item}")))
                out.append("")
        else:
            out.extend(render_table(name, spec.cls, values.get(name) or {}, notes.get(name)))
    return "\n".join(out).rstrip("\n") + "\n"
