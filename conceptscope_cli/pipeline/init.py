"""`cscope init`: write a manifest from templates/ and lay out the project."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

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


def init_project(directory: Path, *, example: bool = False, force: bool = False) -> InitResult:
    directory = directory.resolve()
    manifest = directory / MANIFEST_NAME
    if manifest.exists() and not force:
        raise CscopeError(f"{manifest} already exists", hint="pass --force to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
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
    else:
        text = read_template("cscope.toml")
    text = text.replace("{name}", directory.name)
    (directory / "outputs").mkdir(exist_ok=True)
    manifest.write_text(text, encoding="utf-8")
    gitignore = directory / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(".cscope/\n", encoding="utf-8")
    return InitResult(manifest, notes)
