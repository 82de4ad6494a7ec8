"""`cscope init`: write a manifest and lay out the project.

The plain manifest is rendered from the registered sections (config/template.py): every
section and key, commented, with `[run] stages` covering the whole pipeline. With
`--dataset PATH` the `[datasets.NAME]` table is filled from the folder's layout
(data/layout.py); `--example` writes the embedded example from templates/example.toml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from conceptscope_cli.config.manifest import MANIFEST_NAME
from conceptscope_cli.errors import CscopeError


def read_template(name: str) -> str:
    """A template from templates/ (shipped in the wheel as conceptscope_cli.templates)."""
    try:
        return resources.files("conceptscope_cli.templates").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # Source checkouts and editable installs: templates/ sits beside the package.
        return (Path(__file__).resolve().parents[2] / "templates" / name).read_text(encoding="utf-8")


def write_example_vocabulary(path: Path, info: dict) -> None:
    """Labels in the phrasing the tiny CLIP was trained on ("a photo of {label}.")."""
    from conceptscope_cli.example.tiny_clip import attribute_prompt

    labels = []
    for attribute in ("class_name", "background", "object_color", "object_texture", "co_object"):
        values = info["class_names"] if attribute == "class_name" else info["vocabulary"][attribute]
        for value in values:
            if value != "none":
                prompt = attribute_prompt(attribute, value)  # e.g. "a photo of a small star."
                labels.append(prompt.removeprefix("a photo of ").removesuffix("."))
    path.write_text("# The example world's concepts, phrased as the tiny CLIP saw them in training.\n"
                    + "\n".join(labels) + "\n", encoding="utf-8")


@dataclass
class InitResult:
    manifest: Path
    notes: list[str] = field(default_factory=list)
    dataset: str | None = None  # the [datasets.NAME] written


# Every stage, in pipeline order (pipeline/run.py runs them in this order).
ALL_STAGES = ["extract", "train", "dict", "categorize", "export"]


def dataset_name(folder: Path) -> str:
    """A TOML bare key from a folder name ("My Photos" -> "my_photos")."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", folder.name).strip("_").lower()
    return name or "mydata"


def render_project_manifest(project_name: str, *, dataset: Path | None = None, model: str | None = None,
                            directory: Path | None = None) -> tuple[str, list[str], str]:
    """(manifest text, notes, dataset name) of a new project, over `dataset` when given."""
    from conceptscope_cli.config.template import render_manifest

    notes: list[str] = []
    values: dict[str, Any] = {"project": {"name": project_name}, "run": {"stages": ALL_STAGES}}
    key_notes: dict[str, dict[str, str]] = {}
    if model:
        values["backbone"] = {"model": model}
    if dataset is None:
        name = "mydata"
        values["datasets"] = {name: {"source": "imagefolder", "path": "data/mydata"}}
        key_notes[f"datasets.{name}"] = {"path": "your image folder (class folders and/or metadata.csv)"}
    else:
        from conceptscope_cli.data.layout import detect_layout

        layout = detect_layout(dataset)
        name = dataset_name(layout.path)
        path = layout.path
        if directory is not None and path.is_relative_to(directory.resolve()):
            path = path.relative_to(directory.resolve())
        table: dict[str, Any] = {"source": "imagefolder", "path": str(path), "splits": layout.splits}
        if layout.labels_from == "column":
            table["label_column"], table["labels_from"] = layout.label_column, "column"
        elif layout.labels_from == "folder":
            table["labels_from"] = "folder"
        else:
            table["label_column"] = ""  # unlabelled
        if layout.class_names:
            table["class_names"] = layout.class_names
        table["attribute_columns"] = layout.attribute_columns
        values["datasets"] = {name: table}
        key_notes[f"datasets.{name}"] = {
            "splits": ", ".join(f"{s}: {n} images" for s, n in layout.n_images.items()),
            "labels_from": {"folder": "class folder names", "column": "the metadata column"}.get(
                layout.labels_from or "", "unlabelled"),
        }
        if layout.class_names:
            key_notes[f"datasets.{name}"]["class_names"] = (
                f"from the column {layout.names_column!r}" if layout.names_column else "sorted"
            ) + "; label i is class_names[i]"
        notes.extend(f"{name}: {note}" for note in layout.notes)
    values["run"]["dataset"] = name
    preamble = f"Made for the dataset at {dataset.resolve()}." if dataset is not None else ""
    return render_manifest(values, key_notes, preamble), notes, name


def init_project(directory: Path, *, example: bool = False, force: bool = False, dataset: Path | None = None,
                 model: str | None = None) -> InitResult:
    directory = directory.resolve()
    manifest = directory / MANIFEST_NAME
    if manifest.exists() and not force:
        raise CscopeError(f"{manifest} already exists", hint="pass --force to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    written_dataset: str | None = None
    if example and (dataset is not None or model is not None):
        raise CscopeError("--example makes its own dataset and model", hint="drop --dataset / --model, or --example")
    if example:
        import json

        from conceptscope_cli.example.world import WorldConfig, generate_world, load_world_info

        world_dir = directory / "data" / "world"
        if not (world_dir / "world.json").exists() or force:
            generate_world(world_dir, WorldConfig())
            notes.append(f"generated the example image world in {world_dir}")
        info = load_world_info(world_dir)
        write_example_vocabulary(world_dir / "vocabulary.txt", info)
        context = ", ".join(
            f'"{b["attribute"]}={b["value"]}" = "{b["class"]}"' for b in info["planted_biases"]
        )
        text = (read_template("example.toml").replace("{class_names}", json.dumps(info["class_names"]))
                .replace("{context_classes}", "{ " + context + " }"))
        text = text.replace("{name}", directory.name)
        written_dataset = "world"
    else:
        text, dataset_notes, written_dataset = render_project_manifest(directory.name, dataset=dataset, model=model,
                                                                       directory=directory)
        notes.extend(dataset_notes)
    (directory / "outputs").mkdir(exist_ok=True)
    manifest.write_text(text, encoding="utf-8")
    gitignore = directory / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(".cscope/\n", encoding="utf-8")
    return InitResult(manifest, notes, written_dataset)
