"""What `cscope init --dataset PATH` finds in a local image folder (no image is decoded).

Splits follow the rules of the `datasets` imagefolder loader (folders named train / test /
validation / ... become splits, everything else is one "train" split), so the split names
written into the manifest are the ones `cscope` will open. Labels come from

1. a label column of the metadata file (metadata.csv / .jsonl / .parquet), when one is named
   like a label (`LABEL_COLUMNS`); string labels become a ClassLabel in sorted order, integer
   labels are named by a column that holds one name per label when there is one (`class_name`);
2. otherwise class folders (every image one folder below its split), sorted by name, the
   order `datasets` gives them;
3. otherwise none (unlabelled data: `cscope categorize` then needs labels added).

Every other metadata column except the file name is an attribute column, unless it holds
lists (such as object boxes) or names a second image per row (`mask_file_name`: a segmentation
mask, whose files are not rows): those are named in a note instead.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conceptscope_cli.errors import CscopeError

LABEL_COLUMNS = ("label", "labels", "class", "class_name", "category", "target")
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


@dataclass
class FolderLayout:
    """An image folder as the manifest describes it."""

    path: Path
    splits: list[str]
    n_images: dict[str, int]
    labels_from: str | None  # "column" | "folder" | None (unlabelled)
    label_column: str | None
    class_names: list[str] | None
    attribute_columns: list[str]
    metadata_files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    names_column: str | None = None  # the metadata column class_names came from (integer labels)


def split_files(folder: Path) -> dict[str, list[str]]:
    """{split: files} by the `datasets` imagefolder rules (its own pattern resolution)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    patterns = get_data_patterns(str(folder))
    files = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    return {str(name): [str(f) for f in paths] for name, paths in files.items()}


def _image_extensions() -> set[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {e.lower() for e in ImageFolder.EXTENSIONS}


def read_metadata(path: Path) -> list[dict[str, Any]]:
    """Rows of a metadata.csv / .jsonl / .parquet file."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _is_integer_text(values: set[Any]) -> bool:
    return all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values)


def detect_layout(folder: Path) -> FolderLayout:
    """Splits, labels and attribute columns of an imagefolder dataset at `folder`."""
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise CscopeError(f"--dataset: not a folder: {folder}", hint="give the folder that holds your images")
    extensions = _image_extensions()
    by_split = split_files(folder)
    images = {s: [f for f in files if os.path.splitext(f)[1].lower() in extensions] for s, files in by_split.items()}
    metadata = {s: [Path(f) for f in files if os.path.basename(f) in METADATA_FILES] for s, files in by_split.items()}
    images = {s: v for s, v in images.items() if v}
    if not images:
        raise CscopeError(f"--dataset: no images found under {folder}",
                          hint=f"image extensions read: .png, .jpg, .jpeg, .webp, ... ({len(extensions)} in all)")
    # Splits in the conventional order, then any others.
    order = ["train", "validation", "test"]
    splits = sorted(images, key=lambda s: (order.index(s) if s in order else len(order), s))
    notes: list[str] = []

    rows: dict[str, list[dict[str, Any]]] = {s: [r for p in metadata.get(s, []) for r in read_metadata(p)] for s in splits}
    columns: list[str] = []
    for split in splits:
        for row in rows[split]:
            columns.extend(c for c in row if c not in columns)
    columns = [c for c in columns if c != "file_name"]

    folder_names = _class_folders(images, metadata)
    label_column = next((c for c in columns if c.lower() in LABEL_COLUMNS), None)
    labels_from: str | None
    class_names: list[str] | None
    names_column: str | None = None
    if label_column is not None:
        labels_from = "column"
        values = {r[label_column] for s in splits for r in rows[s] if r.get(label_column) not in (None, "")}
        if _is_integer_text(values):
            names_column, class_names = _class_names_column(label_column, columns, [r for s in splits for r in rows[s]])
            if names_column is None:
                notes.append(f"labels: integer column {label_column!r} of the metadata; set class_names to name them "
                             "(categorize needs them)")
            else:
                notes.append(f"labels: integer column {label_column!r} of the metadata, named by the column "
                             f"{names_column!r} ({len(class_names or [])} classes, in label order)")
                columns = [c for c in columns if c != names_column]  # the label again: no attribute
        else:
            class_names = sorted(str(v) for v in values)
            notes.append(f"labels: column {label_column!r} of the metadata, {len(class_names)} classes (sorted)")
        if folder_names:
            notes.append('class folders were found too: set labels_from = "folder" to use them instead')
    elif folder_names:
        labels_from, class_names = "folder", folder_names
        notes.append(f"labels: {len(folder_names)} class folders (sorted by name)")
    else:
        labels_from, class_names = None, None
        notes.append("no labels found (no label column, no class folders): `cscope categorize` needs labels")
    lists = [c for c in columns if any(isinstance(r.get(c), list) for s in splits for r in rows[s])]
    for column in lists:
        notes.append(f"column {column!r} holds lists, so it is no attribute column; if it holds each image's class "
                     f'object boxes [x0, y0, x1, y1], set object_box_column = "{column}"')
    # `<name>_file_name` columns name a second image per row, which `datasets` loads as the column
    # <name> (a segmentation mask, say): those files are not rows of their own.
    second_images = [c for c in columns if c.endswith("_file_name") and c != "_file_name"]
    for column in second_images:
        name = column[: -len("_file_name")]
        notes.append(f"column {column!r} names a second image per row (loaded as the column {name!r}); if it is each "
                     f'image\'s segmentation mask of its class object, set object_mask_column = "{name}"')
        for split in splits:
            referenced = {os.path.realpath(path.parent / str(row[column])) for path in metadata.get(split, [])
                          for row in read_metadata(path) if row.get(column)}
            images[split] = [f for f in images[split] if os.path.realpath(f) not in referenced]
    attributes = [c for c in columns if c != label_column and c not in lists and c not in second_images]
    if attributes:
        notes.append(f"attribute columns: {', '.join(attributes)}")
    for split in splits:
        if metadata.get(split) and not rows[split]:
            notes.append(f"{split}: the metadata file is empty")
    return FolderLayout(folder, splits, {s: len(images[s]) for s in splits}, labels_from,
                        label_column if labels_from == "column" else None, class_names, attributes,
                        [p for s in splits for p in metadata.get(s, [])], notes, names_column)


# Words in the name of a column that may name the classes of an integer label column.
_NAME_WORDS = ("name", "class", "category", "label", "species", "breed")


def _class_names_column(label_column: str, columns: list[str],
                        rows: list[dict[str, Any]]) -> tuple[str | None, list[str] | None]:
    """A metadata column that names the integer labels: called like a name, one non-empty text per
    label and one label per text, over labels 0..C-1 exactly (so class_names[i] names label i).
    (None, None) when no column is one."""
    labelled = [r for r in rows if r.get(label_column) not in (None, "")]
    labels = {int(r[label_column]) for r in labelled}
    if not labelled or labels != set(range(len(labels))):
        return None, None
    for column in columns:
        if column == label_column or not any(w in column.lower() for w in _NAME_WORDS):
            continue
        by_label: dict[int, str] = {}
        by_name: dict[str, int] = {}
        for row in labelled:
            label, name = int(row[label_column]), row.get(column)
            if not isinstance(name, str) or not name.strip() or by_label.setdefault(label, name) != name \
                    or by_name.setdefault(name, label) != label:
                break
        else:
            if not _is_integer_text(set(by_name)):
                return column, [by_label[i] for i in range(len(labels))]
    return None, None


def _class_folders(images: dict[str, list[str]], metadata: dict[str, list[Path]]) -> list[str] | None:
    """Sorted class-folder names when every image sits one folder below its split's root."""
    names: set[str] = set()
    for split, files in images.items():
        parents = {os.path.dirname(f) for f in files}
        roots = {str(p.parent) for p in metadata.get(split, [])}
        root = os.path.commonpath(list(parents | roots)) if len(parents | roots) > 1 else None
        if root is None or any(os.path.dirname(p) != root for p in parents):
            return None  # images flat in the split folder, or at several depths
        names |= {os.path.basename(p) for p in parents}
    return sorted(names) if len(names) > 1 else None
