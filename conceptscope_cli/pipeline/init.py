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
        from conceptscope_cli.example.world import WorldConfig, generate_world

        import json

        from conceptscope_cli.example.world import load_world_info

        world_dir = directory / "data" / "world"
        if not (world_dir / "world.json").exists() or force:
            generate_world(world_dir, WorldConfig())
            notes.append(f"generated the example image world in {world_dir}")
        class_names = load_world_info(world_dir)["class_names"]
        text = read_template("example.toml").replace("{class_names}", json.dumps(class_names))
    else:
        text = read_template("cscope.toml")
    text = text.replace("{name}", directory.name)
    (directory / "outputs").mkdir(exist_ok=True)
    manifest.write_text(text, encoding="utf-8")
    gitignore = directory / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(".cscope/\n", encoding="utf-8")
    return InitResult(manifest, notes)
