"""Resolve a `[backbone]` spec to what open_clip will load, with a fingerprint of the weights.

Accepted model strings:
- an open_clip name (`ViT-B-16`) with a pretrained tag (`openai`) or a local checkpoint file;
- `hf-hub:ORG/REPO` (open_clip's Hub layout);
- `local-dir:PATH`, or a bare path to a folder holding `open_clip_config.json`;
- a Hugging Face transformers-style alias (`openai/clip-vit-large-patch14`), mapped to the
  equivalent open_clip model and tag so that reference checkpoints apply;
- `example:tiny-clip`, the embedded example model (resolved by
  `conceptscope_cli.example.tiny_clip.resolve_example_model`, which the project calls).

A local path never triggers network access: open_clip's `local-dir:` schema and
file-path pretrained weights read from disk only. No torch here: the project resolves its
model (for cache keys) in commands that never load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from conceptscope_cli.errors import CscopeError

# Transformers-style names used by ConceptScope / PatchSAE and their open_clip equivalents.
ALIASES: dict[str, tuple[str, str]] = {
    "openai/clip-vit-base-patch32": ("ViT-B-32", "openai"),
    "openai/clip-vit-base-patch16": ("ViT-B-16", "openai"),
    "openai/clip-vit-large-patch14": ("ViT-L-14", "openai"),
    "openai/clip-vit-large-patch14-336": ("ViT-L-14-336", "openai"),
}
EXAMPLE_PREFIX = "example:"


@dataclass(frozen=True)
class ResolvedModel:
    """What open_clip is asked for, plus a fingerprint of the weights it will load."""

    model_name: str  # passed to open_clip.create_model_and_transforms
    pretrained: str | None
    fingerprint: str  # identifies the weights: a content hash for files, the tag/hub id otherwise
    description: str  # what the user wrote, for records


def _file_sha256(path: Path, memo_dir: Path | None) -> str:
    """Content hash of a weights file, memoised by (path, size, mtime) like DVC does."""
    stat = path.stat()
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = memo_dir / "file-hashes.json" if memo_dir else None
    memo: dict[str, str] = {}
    if memo_file and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except json.JSONDecodeError:
            memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = "sha256:" + digest.hexdigest()
    if memo_file:
        memo[memo_key] = value
        tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}")
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(memo, indent=1))
            os.replace(tmp, memo_file)
        except OSError:  # the memo only saves time: a read-only or full cache still serves the run
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return value


def local_dir_fingerprint(folder: Path, memo_dir: Path | None) -> str:
    parts = []
    for name in sorted(os.listdir(folder)):
        file = folder / name
        if file.is_file() and (name.endswith((".safetensors", ".bin", ".pt", ".pth")) or name == "open_clip_config.json"):
            parts.append(f"{name}={_file_sha256(file, memo_dir)}")
    if not parts:
        raise CscopeError(f"no open_clip weights or config found in {folder}")
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def resolve_model(
    model: str,
    pretrained: str | None,
    *,
    project_root: Path,
    cache_root: Path,
) -> ResolvedModel:
    """Turn the manifest's model/pretrained strings into what open_clip needs."""
    memo_dir = cache_root
    if model.startswith(EXAMPLE_PREFIX):
        raise ValueError(f"{model!r}: example models are resolved by example.tiny_clip.resolve_example_model")
    if model.startswith("hf-hub:"):
        return ResolvedModel(model, None, model + (f"@{pretrained}" if pretrained else ""), model)
    tag: str | None
    if model in ALIASES:
        name, tag = ALIASES[model]
        if pretrained not in (None, "openai"):  # e.g. a local copy of the same weights
            tag = pretrained
    elif model.startswith(("local-dir:", ".", "/", "~")) or os.sep in model:
        raw = model[len("local-dir:"):] if model.startswith("local-dir:") else model
        folder = Path(os.path.expanduser(raw))
        folder = folder if folder.is_absolute() else (project_root / folder)
        if not (folder / "open_clip_config.json").is_file():
            raise CscopeError(
                f"{folder} is not an open_clip model folder (no open_clip_config.json)",
                hint="a local model folder holds open_clip_config.json and open_clip_model.safetensors",
            )
        folder = folder.resolve()
        return ResolvedModel(f"local-dir:{folder}", None, local_dir_fingerprint(folder, memo_dir), model)
    else:
        name, tag = model, pretrained
    if tag and (os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        weights = Path(os.path.expanduser(tag))
        weights = weights if weights.is_absolute() else project_root / weights
        if not weights.is_file():
            raise CscopeError(f"pretrained weights file not found: {weights}")
        return ResolvedModel(name, str(weights.resolve()), _file_sha256(weights, memo_dir), model)
    return ResolvedModel(name, tag, f"open_clip:{name}:{tag}", model)
