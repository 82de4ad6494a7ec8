"""Issue 20: any manifest either loads or is refused with exit 2 naming the key and its line.

Hypothesis generates manifests from the registered sections themselves: valid values, wrong
types, out-of-range and non-finite numbers, templates with stray fields, missing required and
unknown keys, then breaks some of them as text (truncation, junk, non-UTF-8 bytes). Loading
is called in-process (fast); a handful of cases go through the real command."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conceptscope_cli.config.sections  # noqa: F401 - registers the sections
from conceptscope_cli.config.manifest import load_manifest, registered_sections
from conceptscope_cli.errors import ManifestError
from helpers import run_cli

SECTIONS = registered_sections()

NUMBERS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
)
TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["", "{}", "{name}", "a {} b {}", "{0}", "all", "auto", "cpu", "meta", "extract", "relu"]),
)
SCALARS = st.one_of(NUMBERS, TEXT, st.booleans())
VALUES = st.one_of(
    SCALARS,
    st.lists(st.one_of(TEXT, st.integers(-5, 5)), max_size=3),
    st.dictionaries(st.text("abc=", min_size=1, max_size=4), TEXT, max_size=2),
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, once non-BMP characters stay literal (no surrogate
        # escapes) and DEL, which TOML wants escaped, is.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


@st.composite
def manifests(draw: st.DrawFn) -> bytes:
    lines: list[str] = []
    for name in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True, max_size=5)):
        spec = SECTIONS[name]
        fields = {f.name: f for f in dataclasses.fields(spec.cls)}
        header = f"[{name}.{draw(st.sampled_from(['d', 'shapes']))}]" if spec.named else f"[{name}]"
        lines.append(header)
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=6))
        if spec.named and draw(st.booleans()):  # required keys present, usually
            chosen = sorted(set(chosen) | {"source", "path"})
        for key in chosen:
            default = fields[key].default
            if draw(st.integers(0, 3)) == 0 and default not in (dataclasses.MISSING, None):
                value = default  # a valid value of the right type
            elif isinstance(default, (int, float)) and not isinstance(default, bool) and draw(st.booleans()):
                value = draw(st.one_of(st.integers(-3, 3), st.sampled_from([math.nan, math.inf, -0.5, 1e300])))
            elif key == "source":
                value = draw(st.sampled_from(["hf", "imagefolder", "disk", "nope", 3]))
            else:
                value = draw(VALUES)
            lines.append(f"{key} = {toml_value(value)}")
        if draw(st.integers(0, 9)) == 0:
            lines.append(f"{draw(st.sampled_from(['layre', 'batchsize', 'zzz']))} = 1")  # unknown key
    if draw(st.integers(0, 14)) == 0:
        lines.append("[nosuchsection]")
    data = ("\n".join(lines) + "\n").encode()
    damage = draw(st.integers(0, 11))
    if damage == 0 and data:  # broken TOML: cut anywhere
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == 1:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"= =", b"[", b'"', b"\n[[x]\n", b"a.b.c"])) + data[at:]
    elif damage == 2:  # not UTF-8
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\x80abc"])) + data[at:]
    return data


_WORKDIR = tempfile.TemporaryDirectory(prefix="cscope-fuzz-")


@settings(max_examples=600, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests())
def test_any_manifest_loads_or_names_key_and_line(data: bytes) -> None:
    path = Path(_WORKDIR.name) / "cscope.toml"
    path.write_bytes(data)
    try:
        load_manifest(path)
    except ManifestError as error:  # anything else (a bug) fails the test with its traceback
        assert error.exit_code == 2
        assert error.line is not None, error.message
        assert error.message.startswith(f"{path}:{error.line}: ")
        quoted = error.message.split("`")[1::2]
        if "in section" in error.message:  # a key's error names that key on its line
            key = quoted[0]
            text = data.decode("utf-8")
            assert key in text.splitlines()[error.line - 1] or "missing required key" in error.message, error.message


def test_fuzz_keeps_generating_out_of_range_cases() -> None:
    """The generator really reaches the range checks (not only type errors)."""
    seen: set[str] = set()

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None)  # the same cases every run: no flaky suite
    @given(manifests())
    def collect(data: bytes) -> None:
        path = Path(_WORKDIR.name) / "collect.toml"
        path.write_bytes(data)
        try:
            load_manifest(path)
            seen.add("loaded")
        except ManifestError as error:
            for marker in ("invalid TOML", "not UTF-8", "unknown key", "expected"):
                if marker in error.message:
                    seen.add(marker)
            if re.search(r"in section \[[^]]+\]: must .*, got ", error.message):
                seen.add("out of range")

    collect()
    assert {"loaded", "out of range", "invalid TOML", "not UTF-8", "unknown key", "expected"} <= seen, seen


@pytest.mark.parametrize(("body", "line", "needle"), [
    ('[extract]\nbatch_size = 0\n', 2, "`batch_size` in section [extract]: must be >= 1, got 0"),
    ('[project]\nname = "x"\nnum_workers = -1\n', 3, "`num_workers` in section [project]: must be >= 0"),
    ('[categorize]\nprompt_templates = ["a {name}"]\n', 2, "`prompt_templates` in section [categorize]"),
    ('[sae]\nd_sae = 512\nk = 1000\narchitecture = "topk"\n', 3, "`k` in section [sae]: must be <= d_sae"),
    ('[dict]\ntarget = 1\n', 2, "unknown key `target` in section [dict]"),
])
def test_bad_values_through_the_real_command(tmp_path: Path, body: str, line: int, needle: str) -> None:
    (tmp_path / "cscope.toml").write_text(body)
    result = run_cli(["cache", "ls"], tmp_path)
    assert result.exit_code == 2, result.output
    assert f"cscope.toml:{line}: {needle}" in result.stderr and "internal error" not in result.output


def test_non_utf8_manifest_through_the_real_command(tmp_path: Path) -> None:
    (tmp_path / "cscope.toml").write_bytes(b'[project]\nname = "caf\xe9"\n')
    result = run_cli(["cache", "ls"], tmp_path)
    assert result.exit_code == 2 and "cscope.toml:2: not UTF-8 text: byte 0xe9" in result.stderr, result.output
