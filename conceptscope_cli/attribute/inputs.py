"""Image arguments of `cscope attribute`: files, directories and glob patterns."""

from __future__ import annotations

import glob
from pathlib import Path

from PIL import Image

from conceptscope_cli.errors import CscopeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_image_args(specs: list[str], *, base: Path | None = None) -> list[Path]:
    """Files in argument order; a directory gives its images (recursively, sorted), a glob
    pattern its matches. Relative paths are taken from `base` (default: working directory).
    Duplicates are dropped. Raises CscopeError naming any argument that gives no image."""
    base = base or Path.cwd()
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        path = path if path.is_absolute() else base / path
        if path.is_dir():
            files = _images_in(path)
            if not files:
                raise CscopeError(f"no images in directory {spec}", hint=f"image suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}")
        elif path.is_file():
            files = [path]
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise CscopeError(f"pattern {spec!r} matched no image file")
        else:
            raise CscopeError(f"image not found: {spec}")
        found.extend(files)
    if not found:
        raise CscopeError("no images given", hint="pass image files, folders or glob patterns")
    unique: dict[Path, None] = {}
    for file in found:
        unique.setdefault(file.resolve(), None)
    return list(unique)


def open_image(path: Path) -> Image.Image:
    """Decode an image as RGB; an unreadable file is a CscopeError that names it."""
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CscopeError(f"cannot read image {path}: {exc}") from None


def figure_names(files: list[Path], out: Path) -> list[Path]:
    """<stem>.png, with -2, -3, ... when several images share a stem."""
    used: dict[str, int] = {}
    paths = []
    for file in files:
        count = used.get(file.stem, 0) + 1
        used[file.stem] = count
        paths.append(out / (f"{file.stem}.png" if count == 1 else f"{file.stem}-{count}.png"))
    return paths
