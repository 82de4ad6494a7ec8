"""Load and validate `cscope.toml`.

A manifest is a set of sections, each a dataclass registered with `register_section`.
Adding a section to the tool is one dataclass plus one `register_section` call: the
loader validates keys and types, reports errors with the line they are on and a
suggestion for misspelt keys, and fills defaults.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, TypeVar

from conceptscope_cli.config.schema import FieldValueError, SchemaTypeError, coerce, field_types, is_required, suggest
from conceptscope_cli.errors import CscopeError, ManifestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

MANIFEST_NAME = "cscope.toml"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SectionSpec:
    name: str
    cls: type
    # A "named" section is a table of tables, e.g. [datasets.imagenet], [datasets.cub].
    named: bool = False


_SECTIONS: dict[str, SectionSpec] = {}


def register_section(name: str, cls: type, *, named: bool = False) -> None:
    """Make `[name]` (or `[name.X]` when `named`) a valid manifest section backed by `cls`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"section {name!r} must be a dataclass")
    _SECTIONS[name] = SectionSpec(name, cls, named)


def registered_sections() -> dict[str, SectionSpec]:
    return dict(_SECTIONS)


def _section_for(cls: type) -> SectionSpec:
    for spec in _SECTIONS.values():
        if spec.cls is cls:
            return spec
    raise KeyError(f"{cls.__name__} is not a registered manifest section")


# --------------------------------------------------------------------------- lines

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _split_dotted(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p.strip("\"'") for p in parts)


def locate_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map every table header and key path of a TOML document to its 1-based line.

    tomllib does not keep positions, so we scan the text: enough for the flat,
    hand-written manifests `cscope` uses (headers, keys, dotted keys). Lines inside
    multi-line strings or arrays are skipped by only reading lines that start a key.
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = False
            continue
        header = _HEADER.match(line)
        if header:
            table = _split_dotted(header.group(1))
            for end in range(1, len(table) + 1):  # [a.b.c] also defines a and a.b here
                lines.setdefault(table[:end], lineno)
            continue
        key = _KEY.match(line)
        if key:
            path = table + _split_dotted(key.group(1))
            for end in range(len(table) + 1, len(path) + 1):  # a dotted key defines its prefixes too
                lines.setdefault(path[:end], lineno)
            rest = line[key.end():]
            if rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1:
                in_multiline = True
    return lines


# --------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class Manifest:
    """A validated `cscope.toml`: one dataclass instance per section."""

    path: Path
    values: dict[str, Any]
    lines: dict[tuple[str, ...], int]
    raw: dict[str, Any]

    @property
    def root(self) -> Path:
        """The project directory (the folder holding `cscope.toml`)."""
        return self.path.parent

    def get(self, cls: type[T]) -> T:
        """The instance of section `cls` (defaults when the section is absent)."""
        spec = _section_for(cls)
        return self.values[spec.name]

    def named(self, cls: type[T]) -> dict[str, T]:
        """All `[section.NAME]` tables of a named section, by NAME."""
        spec = _section_for(cls)
        return self.values[spec.name]

    def override(self, cls: type[T], **changes: Any) -> T:
        """Apply command-line overrides (None means 'not given') with type checks."""
        spec = _section_for(cls)
        current = self.values[spec.name]
        types = field_types(cls)
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if value is None:
                continue
            try:
                clean[key] = coerce(value, types[key])
            except SchemaTypeError as exc:
                raise CscopeError(f"--{key.replace('_', '-')}: {exc}") from None
        try:
            updated = dataclasses.replace(current, **clean)
        except FieldValueError as exc:  # a range check on a flag's value: a usage error (exit 2)
            raise ManifestError(f"--{exc.key.replace('_', '-')}: {exc}") from None
        _attach(updated, getattr(current, _LOCATION, None))
        self.values[spec.name] = updated
        return updated

    def resolve_path(self, value: str | os.PathLike[str]) -> Path:
        """A path from the manifest, relative to the project directory unless absolute."""
        path = Path(os.path.expanduser(str(value)))
        return path if path.is_absolute() else (self.root / path)


def find_manifest(start: Path | None = None) -> Path:
    """Walk up from `start` (default: the working directory) to the nearest `cscope.toml`."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / MANIFEST_NAME
        if candidate.is_file():
            return candidate
    raise CscopeError(
        f"no {MANIFEST_NAME} found in {here} or any parent directory",
        hint="run `cscope init` to create a project here, or pass --project DIR",
    )


def load_manifest(path: Path) -> Manifest:
    """Parse and validate a manifest file; every problem raises `ManifestError`."""
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}", hint="run `cscope init` to create one")
    display = str(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}",
                            path=display, line=data.count(b"\n", 0, exc.start) + 1,
                            hint="save cscope.toml as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        # tomllib says "at end of document" instead of a line when the text stops mid-construct.
        line = int(match.group(1)) if match else max(1, len(text.splitlines()))
        raise ManifestError(f"invalid TOML: {exc}", path=display, line=line) from None
    lines = locate_lines(text)
    values = parse_sections(raw, lines, display)
    return Manifest(path=path.resolve(), values=values, lines=lines, raw=raw)


def parse_sections(raw: dict[str, Any], lines: dict[tuple[str, ...], int], display: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in _SECTIONS:
            guess = suggest(name, _SECTIONS)
            raise ManifestError(
                f"unknown section [{name}]",
                path=display,
                line=lines.get((name,)),
                hint=f"did you mean [{guess}]?" if guess else f"valid sections: {', '.join(sorted(_SECTIONS))}",
            )
        spec = _SECTIONS[name]
        if not isinstance(table, dict):
            raise ManifestError(f"`{name}` must be a table ([{name}])", path=display, line=lines.get((name,)))
        if spec.named:
            instances: dict[str, Any] = {}
            for item, sub in table.items():
                if not isinstance(sub, dict):
                    raise ManifestError(
                        f"`{name}.{item}` must be a table: write [{name}.{item}] with its keys below",
                        path=display,
                        line=lines.get((name, item)),
                    )
                instances[item] = build_section(spec.cls, sub, (name, item), lines, display)
            values[name] = instances
        else:
            values[name] = build_section(spec.cls, table, (name,), lines, display)
    for name, spec in _SECTIONS.items():
        if name not in values:
            values[name] = {} if spec.named else build_section(spec.cls, {}, (name,), lines, display)
    return values


def build_section(
    cls: type[T], table: dict[str, Any], where: tuple[str, ...], lines: dict[tuple[str, ...], int], display: str
) -> T:
    """Validate one table against its dataclass and build the instance."""
    title = "[" + ".".join(where) + "]"
    types = field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in types:
            guess = suggest(key, types)
            raise ManifestError(
                f"unknown key `{key}` in section {title}",
                path=display,
                line=lines.get(where + (key,)),
                hint=f"did you mean `{guess}`?" if guess else f"valid keys: {', '.join(types)}",
            )
        try:
            kwargs[key] = coerce(value, types[key])
        except SchemaTypeError as exc:
            raise ManifestError(
                f"`{key}` in section {title}: {exc}", path=display, line=lines.get(where + (key,))
            ) from None
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if is_required(field) and field.name not in kwargs:
            raise ManifestError(
                f"missing required key `{field.name}` in section {title}",
                path=display,
                line=lines.get(where),
                hint=field.metadata.get("help"),
            )
    try:
        instance = cls(**kwargs)
    except FieldValueError as exc:  # a range check naming its key: point at the key's line
        line = lines.get(where + (exc.key,), lines.get(where))
        raise ManifestError(f"`{exc.key}` in section {title}: {exc}", path=display, line=line) from None
    except ValueError as exc:  # __post_init__ cross-field checks
        raise ManifestError(f"section {title}: {exc}", path=display, line=lines.get(where)) from None
    keys = {path[-1]: line for path, line in lines.items() if len(path) == len(where) + 1 and path[:-1] == where}
    _attach(instance, (display, where, lines.get(where), keys))
    return instance


# Where a section instance came from, so that checks needing the model or the data (made far
# from the loader) can still point at the key's line: see `value_error`.
_LOCATION = "_cscope_location"


def _attach(instance: Any, location: tuple[str, tuple[str, ...], int | None, dict[str, int]] | None) -> None:
    if location is not None:
        object.__setattr__(instance, _LOCATION, location)


def value_error(section: Any, key: str, message: str, *, hint: str | None = None) -> ManifestError:
    """A ManifestError (exit 2) for `key` of a loaded section instance, at that key's line
    (the section's line when the key was left at its default)."""
    location = getattr(section, _LOCATION, None)
    if location is None:
        return ManifestError(f"`{key}`: {message}", hint=hint)
    display, where, section_line, keys = location
    title = "[" + ".".join(where) + "]"
    return ManifestError(f"`{key}` in section {title}: {message}", path=display,
                         line=keys.get(key, section_line), hint=hint)
