"""Command-line options declared once, with help taken from the manifest sections.

A flag that overrides a manifest key gets its help text from that key's dataclass field
(`metadata={"help": ...}`) plus the key and its default, so `cscope CMD --help`, the
template and the README cannot drift apart. Help is Rich markup in typer: the manifest
key `[project] device` is escaped, or Rich would take `[project]` for a style tag.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from conceptscope_cli.config.sections import DatasetConfig, ProjectConfig, RunConfig


def key_help(cls: type, section: str, key: str, *, extra: str = "", default: bool = True) -> str:
    """`<field help> ([section] key, default X)`, escaped for typer's Rich help."""
    field = next((f for f in dataclasses.fields(cls) if f.name == key), None)
    if field is None:
        raise KeyError(f"{cls.__name__} has no field {key!r}")
    text = field.metadata.get("help", "")
    text = text[:-1] if text.endswith(".") and not text.endswith("...") else text
    shown = f"[{section}] {key}"
    if default and field.default is not dataclasses.MISSING and field.default is not None:
        shown += f", default {field.default}"
    return escape(f"{text}{extra} ({shown}).")


def manifest_option(cls: type, section: str, key: str, *flags: str, extra: str = "", default: bool = True) -> Any:  # noqa: ANN401
    """A typer option that overrides `[section] key` (None when not given)."""
    return typer.Option(*(flags or (f"--{key.replace('_', '-')}",)),
                        help=key_help(cls, section, key, extra=extra, default=default), show_default=False)


# The options most commands share: one spelling, one help text.
Dataset = Annotated[Optional[str], typer.Option(
    "--dataset", "-d", show_default=False,
    help=escape("NAME of a [datasets.NAME] table. ") + key_help(RunConfig, "run", "dataset"))]
Split = Annotated[Optional[str], typer.Option(
    "--split", "-s", show_default=False,
    help=escape("One of the dataset's splits. ") + key_help(DatasetConfig, "datasets.NAME", "splits"))]
Device = Annotated[Optional[str], manifest_option(ProjectConfig, "project", "device", "--device")]
NumWorkers = Annotated[Optional[int], manifest_option(ProjectConfig, "project", "num_workers")]
Out = Annotated[Optional[Path], typer.Option("--out", help=escape("Output folder (default: under [project] outputs_dir)."),
                                             show_default=False)]
Images = Annotated[list[str], typer.Option("--image", "-i", help="Image files, folders or glob patterns (repeatable).")]
Prompts = Annotated[list[str], typer.Option("--prompt", "-p", help="Text prompts (repeatable).")]
Force = Annotated[bool, typer.Option("--force", help="Write even when the disk plan says it will not fit.")]
