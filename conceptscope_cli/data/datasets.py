"""Open dataset splits with Hugging Face `datasets` and decode images robustly.

Row order is the dataset's own order, and a row's position in the split is its
stable `row_index`, which every later stage uses to refer to an image. Images are
decoded by us (the image column is cast to `Image(decode=False)`) inside DataLoader
workers, so that an unreadable file becomes a counted, listed skip instead of a crash,
and never shifts the indices of the rows after it.

Labels (`[datasets.NAME] labels_from`) are integers 0..C-1 in `class_names` order, read from
the label column (a ClassLabel, integers, or strings) or from the name of each image's parent
folder (an imagefolder with class folders: `datasets` drops those labels as soon as a
metadata file exists, so we derive them from the image path). Without explicit
`class_names`, strings and folder names are numbered in sorted (code-point) order over all
configured splits, the order `datasets` itself gives class folders, so train and test agree.

A local image folder (not streamed) is opened by `folder_listing`: the rows `datasets`' imagefolder
loader would give, from a streaming walk into an Arrow file in the project's cache, instead of its
O(N) globbing; a layout it does not reproduce exactly is opened by `datasets` with a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from conceptscope_cli.cache.store import CacheStore
from conceptscope_cli.config.manifest import value_error
from conceptscope_cli.config.sections import DatasetConfig
from conceptscope_cli.errors import CscopeError


@dataclass
class SplitHandle:
    """One split of one dataset, opened lazily (images are not decoded)."""

    name: str
    split: str
    config: DatasetConfig
    rows: Any  # datasets.Dataset or datasets.IterableDataset, image column not decoded
    fingerprint: str
    class_names: list[str] | None
    labels: "LabelSpec | None" = None  # how a raw row's label becomes 0..C-1 (None: unlabelled)

    def label_of(self, row: dict[str, Any]) -> int:
        """The integer label of a raw row (-1 when the split is unlabelled)."""
        return -1 if self.labels is None else self.labels.of(row)

    @property
    def streaming(self) -> bool:
        return self.config.streaming

    @property
    def num_rows(self) -> int | None:
        return None if self.streaming else len(self.rows)

    def iter_raw(self, start: int, stop: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
        """Raw rows [start, stop) with their row index, in dataset order."""
        if self.streaming:
            iterator = iter(self.rows.skip(start)) if start else iter(self.rows)
            limit = None if stop is None else stop - start
            for offset, row in enumerate(itertools.islice(iterator, limit)):
                yield start + offset, row
        else:
            stop = len(self.rows) if stop is None else min(stop, len(self.rows))
            # Column-sliced access reads Arrow batches instead of one row at a time.
            batch = self.rows[start:stop]
            keys = list(batch.keys())
            for offset in range(stop - start):
                yield start + offset, {k: batch[k][offset] for k in keys}


# Image-folder splits opened by this process, by everything the handle depends on (the folder's
# own fingerprint included, so an edited folder is opened afresh). `datasets`' own loader resolves
# every file on each open (32,000 files: ~150 s, RSS +138 MB, README "Scaling out"), so an image
# folder is opened through `folder_listing` (two streaming walks, rows memory-mapped from the
# cache), and the handle is kept: `cscope categorize` opens its split 5 times (dict's checks, the
# training sample's plan, the reader).
_OPENED: dict[tuple[str, ...], SplitHandle] = {}
# Set while `cscope run --dry-run` plans: it writes nothing into the cache, not even a listing.
_NO_CACHE_WRITES: contextvars.ContextVar[bool] = contextvars.ContextVar("no_cache_writes", default=False)


@contextlib.contextmanager
def no_cache_writes() -> Iterator[None]:
    """Within: a split's listing is read from the cache when there, else kept in a temporary file."""
    token = _NO_CACHE_WRITES.set(True)
    try:
        yield
    finally:
        _NO_CACHE_WRITES.reset(token)
_MAX_OPENED = 4


def open_split(name: str, config: DatasetConfig, split: str, project_root: Path,
               cache: CacheStore | None = None, *, write_cache: bool = True) -> SplitHandle:
    """Open one split of a `[datasets.NAME]` entry without decoding any image (an image folder
    whose files are unchanged: the handle this process opened already). An image folder's rows are
    listed into `cache` (the project's; a temporary file without one, or with `write_cache` False
    when the cache has no listing yet), see `folder_listing`."""
    import datasets

    datasets.disable_progress_bars()  # our own progress display is the one users watch
    write_cache = write_cache and not _NO_CACHE_WRITES.get()
    if split not in config.splits:
        raise CscopeError(
            f"split {split!r} is not listed for dataset {name!r}",
            hint=f"configured splits: {', '.join(config.splits)} (edit [datasets.{name}] splits)",
        )
    key: tuple[str, ...] | None = None
    folder_key: str | None = None
    if config.source == "imagefolder" and not config.streaming:
        # `datasets`' own fingerprint of a local folder includes its absolute path, so a moved
        # project would re-extract everything; this one depends on the files only.
        folder_key = folder_fingerprint(_local_folder(config.path, project_root, name, config))
        fingerprint = folder_key + f":{split}"
        key = (name, repr(config), split, str(project_root), fingerprint, str(cache.root if cache else None),
               str(write_cache))
        if key in _OPENED:
            return _OPENED[key]
    try:
        rows = _load_rows(config, split, project_root, name, cache, folder_key, write_cache)
    except CscopeError:
        raise
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as exc:
        raise CscopeError(f"could not open split {split!r} of dataset {name!r}: {exc}") from exc

    features = rows.features or {}
    if config.image_column not in features:
        raise value_error(
            config, "image_column", f"dataset {name!r} has no image column {config.image_column!r}",
            hint=f"columns: {', '.join(features)}; set image_column in [datasets.{name}]",
        )
    rows = rows.cast_column(config.image_column, datasets.Image(decode=False))
    labels = resolve_labels(name, config, split, rows, dict(features), project_root, cache)
    class_names = labels.class_names if labels is not None else config.class_names
    if config.source == "imagefolder":
        if key is None:  # streaming: the same fingerprint, computed here
            fingerprint = folder_fingerprint(_local_folder(config.path, project_root, name, config)) + f":{split}"
    else:
        fingerprint = getattr(rows, "_fingerprint", None) or _streaming_fingerprint(config, split)
    handle = SplitHandle(name, split, config, rows, str(fingerprint), class_names, labels)
    if key is not None:
        while len(_OPENED) >= _MAX_OPENED:
            _OPENED.pop(next(iter(_OPENED)))
        _OPENED[key] = handle
    return handle


@dataclass(frozen=True)
class LabelSpec:
    """Where labels come from and how a raw value becomes 0..C-1."""

    source: str  # "column" | "folder"
    column: str | None  # label column (source "column") or image column (source "folder")
    class_names: list[str] | None
    # value -> index for string and folder labels; None for integer / ClassLabel columns
    index: dict[str, int] | None = None

    def describe(self) -> dict[str, Any]:
        """What the activation cache key records about the labels."""
        return {"from": self.source, "column": self.column, "class_names": self.class_names}

    def of(self, row: dict[str, Any]) -> int:
        value = row.get(self.column) if self.column else None
        if self.source == "folder":
            value = _parent_folder(value)
        if value is None:
            return -1
        if self.index is None:
            label = int(value)
            if self.class_names is not None and not -1 <= label < len(self.class_names):
                raise CscopeError(f"label {label} has no class name (class_names has {len(self.class_names)})",
                                  hint="give one name per label 0, 1, ... in the dataset's class_names")
            return label
        try:
            return self.index[str(value)]
        except KeyError:
            raise CscopeError(
                f"label {value!r} is not one of the class_names {self.class_names}",
                hint="add it to class_names in the dataset's section (or remove class_names to use every label found)",
            ) from None


def _parent_folder(value: Any) -> str | None:
    """The class-folder name of an undecoded image value (its parent directory)."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, Path)) else None
    return Path(path).parent.name if path else None


def resolve_labels(name: str, config: DatasetConfig, split: str, rows: Any, features: dict[str, Any],
                   project_root: Path, cache: CacheStore | None = None) -> LabelSpec | None:
    """The label source of one split (`labels_from`), with class names in a stable order."""
    column = config.label_column or None
    source = config.labels_from
    if source == "auto":
        if column and column in features:
            source = "column"
        elif column and config.source == "imagefolder" and _has_class_folders(rows, config.image_column, config.streaming):
            source = "folder"
        elif column:
            raise value_error(
                config, "label_column",
                f"dataset {name!r} has no label column {column!r} and its images are not in class folders",
                hint=f"columns: {', '.join(features)}; set label_column in [datasets.{name}] to one of them, "
                     "or label_column = \"\" for unlabelled data",
            )
        else:
            return None
    where = f"[datasets.{name}]"
    if source == "folder":
        if config.source != "imagefolder":
            raise value_error(config, "labels_from", '"folder" needs source = "imagefolder"',
                              hint='use labels_from = "column" with a label column')
        names = config.class_names or _sorted_values(name, config, project_root, split, rows, folder=True, cache=cache)
        return LabelSpec("folder", config.image_column, list(names), {n: i for i, n in enumerate(names)})
    if not column or column not in features:
        hint = f"columns: {', '.join(features)}; set label_column in {where}"
        if config.source == "imagefolder" and _has_class_folders(rows, config.image_column, config.streaming):
            hint += ' or labels_from = "folder" (the images are in class folders)'
        raise value_error(config, "label_column", f"dataset {name!r} has no label column {column!r}", hint=hint)
    feature = features[column]
    feature_names = list(getattr(feature, "names", None) or [])
    if feature_names or getattr(feature, "dtype", "") not in ("string", "large_string"):
        if config.class_names is not None:
            check_class_names(name, config.class_names, feature_names,
                              None if config.streaming else _column_max(rows, column), config)
        return LabelSpec("column", column, config.class_names or feature_names or None)
    names = config.class_names or _sorted_values(name, config, project_root, split, rows, folder=False, cache=cache)
    return LabelSpec("column", column, list(names), {n: i for i, n in enumerate(names)})


def _class_names_error(section: DatasetConfig | None, message: str, *, hint: str | None = None) -> CscopeError:
    """At the line of `class_names` when the section came from a manifest."""
    if section is None:
        return CscopeError(message, hint=hint)
    return value_error(section, "class_names", message, hint=hint)


def check_class_names(name: str, class_names: list[str], feature_names: list[str], values: Any,
                      section: DatasetConfig | None = None) -> None:
    """`class_names` must fit the integer labels they name, or every later count is wrong.

    With a ClassLabel feature (class folders, or a Hub dataset) there must be exactly one name
    per class, and a name that is also a feature name must sit at that name's index (otherwise
    it would be given another class's images). Without one, every label must be < the number
    of names (`values`: the label column, None when streaming; `LabelSpec.of` checks rows)."""
    where = f"[datasets.{name}] class_names"
    if len(set(class_names)) != len(class_names):
        raise _class_names_error(section, f"{where} lists a name twice: {class_names}")
    if feature_names:
        if len(class_names) != len(feature_names):
            raise _class_names_error(section,
                f"{where} has {len(class_names)} names but the labels have {len(feature_names)} classes "
                f"({', '.join(feature_names)})",
                hint="give one name per class in label order, or remove class_names to use the dataset's own")
        moved = [(n, i, feature_names.index(n)) for i, n in enumerate(class_names)
                 if n in feature_names and feature_names.index(n) != i]
        if moved:
            n, i, j = moved[0]
            raise _class_names_error(section,
                f"{where} puts {n!r} at position {i}, but the dataset's class {n!r} is label {j}: "
                "its images would carry another class's name",
                hint=f"the dataset's classes in label order: {feature_names}")
        return
    if values is not None and len(values):
        top = max(int(v) for v in values if v is not None) if any(v is not None for v in values) else -1
        if top >= len(class_names):
            raise _class_names_error(section,
                f"{where} has {len(class_names)} names but the labels go up to {top}",
                hint="give one name per label 0, 1, ... (or remove class_names)")


def _column_max(rows: Any, column: str) -> list[Any]:
    """[the column's largest value] ([] for no rows): what check_class_names needs, from Arrow
    instead of a Python list of the whole column."""
    import pyarrow.compute as pc

    if not len(rows):
        return []
    return [pc.max(rows.data.column(column)).as_py()]


def _has_class_folders(rows: Any, image_column: str, streaming: bool) -> bool:
    """Whether images sit in more than one parent folder (class folders), judged on the first rows."""
    sample = list(itertools.islice(iter(rows), 2000)) if streaming else rows[:2000][image_column]
    if streaming:
        sample = [r[image_column] for r in sample]
    parents = {_parent_folder(v) for v in sample}
    return len(parents - {None}) > 1


def _sorted_values(name: str, config: DatasetConfig, project_root: Path, split: str, rows: Any, *,
                   folder: bool, cache: CacheStore | None = None) -> list[str]:
    """Every label value of every configured split, sorted: the stable default class order.

    Read one Arrow record batch at a time (folder names) or with Arrow's `unique`, so only the
    distinct values are held, not a split's column of Python strings."""
    import datasets

    if config.streaming:
        raise CscopeError(f"dataset {name!r} streams, so its string or folder labels cannot be listed up front",
                          hint=f"set class_names in [datasets.{name}]")
    values: set[str] = set()
    for other in config.splits:
        other_rows = rows if other == split else _load_rows(config, other, project_root, name, cache).cast_column(
            config.image_column, datasets.Image(decode=False))
        if folder:
            for batch in other_rows.data.to_batches():
                paths = batch.column(config.image_column).field("path").to_pylist()
                values |= {p for p in (_parent_folder(v) for v in paths) if p is not None}
        else:
            values |= {str(v) for v in other_rows.unique(config.label_column) if v is not None}
    return sorted(values)


# (folder, split) -> why the folder listing left it to datasets' loader (folder_listing.UnsupportedLayoutError)
LISTING_FALLBACKS: dict[tuple[str, str], str] = {}


def _no_split_folder(name: str, split: str, folder: Path) -> CscopeError:
    return CscopeError(f"dataset {name!r}: no folder {split!r} in {folder}",
                       hint="with file names that are not UTF-8, splits must be folders (train/, test/)")


def _load_rows(config: DatasetConfig, split: str, project_root: Path, name: str, cache: CacheStore | None = None,
               fingerprint: str | None = None, write_cache: bool = True) -> Any:
    """The split's rows; an image folder (not streamed) through `folder_listing` (one streaming walk,
    rows in an Arrow file in `cache`, or a temporary one), exactly `datasets`' imagefolder rows."""
    import datasets

    if config.source == "hf":
        from conceptscope_cli.hub import offline_hint, prepare_hub

        access = prepare_hub()  # offline: the local cache only, failing at once instead of after retries
        try:
            loaded = datasets.load_dataset(config.path, config.config, split=split, revision=config.revision,
                                           streaming=config.streaming)
        except Exception as exc:  # the Hub libraries raise many types; each means "not available here"
            if access.online and not _is_hub_failure(exc):
                raise
            where = "is not in the local Hugging Face cache" if not access.online else "could not be fetched from the Hub"
            raise CscopeError(f"dataset {name!r} ({config.path}) {where}: {type(exc).__name__}: {exc}",
                              hint=offline_hint("dataset", config.path, access)) from exc
        if getattr(getattr(loaded, "info", None), "builder_name", None) == "imagefolder":  # a folder on the Hub
            return _image_columns_in_place(name, loaded)
        return loaded
    folder = _local_folder(config.path, project_root, name, config)
    if config.source == "imagefolder":
        bad = undecodable_files(folder)
        if not config.streaming:
            from conceptscope_cli.data import folder_listing

            try:
                key = fingerprint or (folder_fingerprint(folder) if cache is not None else "")
                return folder_listing.open_rows(folder, split, key, cache, listed=bool(bad), write=write_cache)
            except folder_listing.UnsupportedLayoutError as exc:
                # A layout the listing does not reproduce exactly: datasets' own (O(N)) loader, said once.
                if (str(folder), split) not in LISTING_FALLBACKS:
                    warnings.warn(f"{folder} ({split}): opened with datasets' imagefolder loader, which is O(N) in "
                                  f"time and memory, because the folder listing does not reproduce {exc}",
                                  stacklevel=2)
                LISTING_FALLBACKS[(str(folder), split)] = str(exc)
            except FileNotFoundError:
                if bad:
                    raise _no_split_folder(name, split, folder) from None
                raise
        if not bad:
            return _image_columns_in_place(name, datasets.load_dataset(
                "imagefolder", data_dir=str(folder), split=split, streaming=config.streaming))
        # `datasets` cannot store a file name that is not UTF-8 and fails the whole split; the
        # other files are handed over explicitly (split = first folder under the data folder).
        from conceptscope_cli.data.folder_listing import _walk_bytes

        files: list[str] = []
        for relative, _ in _walk_bytes(os.fsencode(folder)):
            if relative.split(b"/", 1)[0] == split.encode("utf-8"):
                try:
                    files.append(str(folder / relative.decode("utf-8")))
                except UnicodeDecodeError:
                    continue
        if not files:
            raise _no_split_folder(name, split, folder)
        return _image_columns_in_place(name, datasets.load_dataset(
            "imagefolder", data_files={split: sorted(files)}, split=split, streaming=config.streaming))
    loaded = datasets.load_from_disk(str(folder))
    rows = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return rows.to_iterable_dataset() if config.streaming else rows


def _image_columns_in_place(name: str, rows: Any) -> Any:
    """Rows from `datasets`' imagefolder loader, refused when its metadata put a `<name>_file_name`
    column before `file_name`: `datasets` 5.x then reads that column's value from `file_name` (the
    image's path) and leaves `image` None in every row (see `folder_listing._metadata_rows`)."""
    import datasets

    images = [k for k, v in (rows.features or {}).items() if isinstance(v, datasets.Image)]
    if "image" in images and images[0] != "image":
        raise CscopeError(
            f"dataset {name!r}: the metadata column {images[0] + '_file_name'!r} comes before file_name, and "
            f"datasets' imagefolder loader then gives {images[0]!r} the image's path and 'image' none",
            hint="make file_name the first column of the metadata file (the file-name columns after it are read "
                 "correctly)")
    return rows


def _is_hub_failure(error: BaseException) -> bool:
    """A failed Hub request (missing, gated, unreachable), as opposed to a bug or a bad split name."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectionError", "HfHubHTTPError", "DatasetNotFoundError", "GatedRepoError",
                         "RepositoryNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "HTTPError",
                         "Timeout", "DataFilesNotFoundError"})


def _local_folder(path: str, project_root: Path, name: str, config: DatasetConfig | None = None) -> Path:
    folder = Path(path).expanduser()
    folder = folder if folder.is_absolute() else project_root / folder
    if not folder.exists():
        message = f"dataset {name!r}: folder not found: {folder}"
        if config is not None:
            raise value_error(config, "path", message, hint="a path relative to the project folder, or absolute")
        raise CscopeError(message, hint=f"check path in [datasets.{name}]")
    return folder.resolve()


def undecodable_files(folder: Path) -> list[str]:
    """Relative paths that are not valid UTF-8, with their bad bytes escaped (only those are held)."""
    from conceptscope_cli.data.folder_listing import undecodable_files as listing_undecodable

    return listing_undecodable(folder)


def skipped_file_names(config: DatasetConfig, project_root: Path, name: str, split: str) -> list[str]:
    """Files of an imagefolder split left out because their names are not UTF-8 (counted by extract)."""
    if config.source != "imagefolder":
        return []
    bad = undecodable_files(_local_folder(config.path, project_root, name, config))
    return [b for b in bad if b.split("/", 1)[0] == split]


# Files read whole into the fingerprint (metadata: labels and attributes live there); image
# files count by relative name and size, so fingerprinting a large folder reads no pixels.
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


def folder_fingerprint(folder: Path) -> str:
    """Content key of a local image folder: every file's relative path and size, plus the bytes
    of every non-image file (metadata.jsonl / .csv). The same files anywhere give the same key.

    An image replaced by a different one of exactly the same byte size is not noticed
    (`cscope cache rm` the entry after such an edit)."""
    digest = hashlib.sha256()
    for relative, path in _sorted_files(folder, b""):
        stat = path.stat()
        digest.update(relative + b"\0" + str(stat.st_size).encode() + b"\0")
        if path.suffix.lower() not in _IMAGE_SUFFIXES:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        digest.update(b"\n")
    return "files-sha256:" + digest.hexdigest()[:32]


def _sorted_files(folder: Path, prefix: bytes) -> Iterator[tuple[bytes, Path]]:
    """(relative path bytes, path) of every file below `folder`, in the byte order of the relative
    paths, holding one directory's names at a time (not the whole tree: ImageNet has 1.28M files).

    Sorting each directory's children by name, with "/" after a directory's, yields exactly the order
    of sorting the full relative paths: a directory's files all share its "name/" prefix. Like
    os.walk, dot-files and dot-directories are skipped and links to directories not followed."""
    children = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir or not entry.is_dir():  # a link to a directory is neither walked nor a file
                children.append((os.fsencode(entry.name) + (b"/" if is_dir else b""), is_dir))
    for key, is_dir in sorted(children):
        if is_dir:
            yield from _sorted_files(folder / os.fsdecode(key[:-1]), prefix + key)
        else:
            yield prefix + key, folder / os.fsdecode(key)


def _streaming_fingerprint(config: DatasetConfig, split: str) -> str:
    return f"{config.source}:{config.path}:{config.config}:{config.revision}:{split}"


def decode_image(value: Any) -> Image.Image:
    """Decode an undecoded `datasets.Image` value ({"bytes", "path"}) or a PIL image to RGB."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    elif isinstance(value, (str, Path)):
        image = Image.open(value)
    else:
        raise ValueError("empty image value")
    image.load()
    return image.convert("RGB")


class DecodedRows(torch.utils.data.Dataset):
    """Map-style view over raw rows that decodes and preprocesses each image.

    A failure returns `(None, row_index, error)` instead of raising, so the batch
    collation can drop it and the caller can count and list it.
    """

    def __init__(
        self,
        rows: list[tuple[int, Any, int]],
        preprocess: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.rows = rows  # (row_index, image value, label)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int, str | None]:
        row_index, value, label = self.rows[i]
        try:
            tensor = self.preprocess(decode_image(value))
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a skip, reported upstream
            return None, row_index, label, f"{type(exc).__name__}: {exc}"
        return tensor, row_index, label, None


@dataclass
class DecodedBatch:
    images: torch.Tensor | None  # (b, 3, H, W), only the rows that decoded
    row_index: np.ndarray  # (b,) int64
    labels: np.ndarray  # (b,) int64
    failures: list[tuple[int, str]]  # (row_index, error) for rows that did not decode


def collate_decoded(items: list[tuple[torch.Tensor | None, int, int, str | None]]) -> DecodedBatch:
    good = [it for it in items if it[0] is not None]
    failures = [(it[1], it[3] or "unknown error") for it in items if it[0] is None]
    images = torch.stack([it[0] for it in good if it[0] is not None]) if good else None
    return DecodedBatch(
        images=images,
        row_index=np.array([it[1] for it in good], dtype=np.int64),
        labels=np.array([it[2] for it in good], dtype=np.int64),
        failures=failures,
    )


def decoded_loader(
    split: SplitHandle,
    start: int,
    stop: int | None,
    preprocess: Callable[[Image.Image], torch.Tensor],
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over rows [start, stop) that decodes in worker processes, in order."""
    image_column = split.config.image_column
    rows = [(row_index, row[image_column], split.label_of(row)) for row_index, row in split.iter_raw(start, stop)]
    return torch.utils.data.DataLoader(
        DecodedRows(rows, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers if len(rows) > batch_size else 0,
        collate_fn=collate_decoded,
        pin_memory=pin_memory,
    )
