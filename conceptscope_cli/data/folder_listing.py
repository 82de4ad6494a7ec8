"""Open one split of a local image folder as `datasets`' imagefolder loader would, without its globbing.

`datasets.load_dataset("imagefolder", data_dir=...)` resolves its split patterns by globbing the
whole tree ~65 times and builds an info dict per file: O(N) memory and minutes per open at
ImageNet scale (README "Scaling out"). This module gives the same rows from two streaming walks
of the folder (one to choose the splits and labels, one to write the requested split's rows),
holding one directory's names at a time, into an Arrow file that is then memory-mapped as a
`datasets.Dataset`. The rules are `datasets` 5.x's, read from its own constants (split patterns,
ignored file names, image extensions, metadata readers):

* split inference: the first pattern group with a match wins (split folders such as train/ test/,
  then split names in file names, then everything as "train"); hidden files and folders, folders
  starting with "__" and README.md-like files are not data files;
* rows of a split without metadata: its image files in sorted path order, with `label` (a
  ClassLabel of every parent-folder name over all splits, sorted) when there is more than one such
  folder and every image sits at the same depth;
* with a metadata file (metadata.csv / .jsonl / .parquet): the metadata rows in file order,
  `file_name` becoming the image path next to the metadata file (rows, not files: no join), and
  each top-level `<name>_file_name` string column the image column `<name>` (a segmentation mask
  beside its image) read by its own name, where `datasets` 5.x mixes up such columns placed
  before `file_name` (see `_metadata_rows`);
* with file names that are not UTF-8: the split is the top folder of that name, its files listed
  explicitly as `conceptscope_cli.data.datasets` hands them over.

Whatever is outside those rules (archives, symlinked folders, several metadata files in a split,
a split matched by more than one pattern, a `datasets` other than 5.x, ...) raises `UnsupportedLayoutError`,
and the caller opens the split with `datasets` itself: never silently different rows.

Where the rows live: in the project's cache (kind `listing`, FORMATS.md), keyed by the folder's
content fingerprint, its absolute path (the rows hold absolute image paths, as `datasets`' do), the
split and the `datasets` version, so a re-open reads the file and checks its hash instead of
walking; a moved folder is listed again (one walk). Without a cache (library callers) the file is
written to a temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

from conceptscope_cli.cache.store import CacheStore, content_key

KIND = "listing"
LISTING_VERSION = 1
ROWS_FILE = "rows.arrow"
# Rows buffered per Arrow record batch (~0.5 MB of Python objects), whatever N is.
_WRITER_BATCH = 1_000
_NEUTRAL = "x"  # a file name that no split pattern can see (see _neutral)


class UnsupportedLayoutError(Exception):
    """A layout this module does not reproduce exactly; open the split with `datasets` instead."""


@dataclass
class _Bucket:
    """What pass 1 learns about the files that match one set of split patterns."""

    labels: set[str] = field(default_factory=set)  # parent-folder names of image files
    depths: set[int] = field(default_factory=set)  # path segments of image files
    metadata: list[str] = field(default_factory=list)  # metadata files (absolute paths)
    archives: bool = False

    def add(self, path: str, rules: SimpleNamespace) -> None:
        """Count one data file of these patterns by its kind."""
        kind = _file_kind(path, rules)
        if kind == "image":
            self.labels.add(os.path.basename(os.path.dirname(path)))
            self.depths.add(path.replace("\\", "/").count("/"))  # datasets counts "\\" too
        elif kind == "metadata":
            self.metadata.append(path)
        elif kind == "archive":
            self.archives = True


@dataclass(frozen=True)
class _Pattern:
    group: int
    split: str
    regex: re.Pattern[str]


def _datasets_rules() -> SimpleNamespace:
    """`datasets`' own constants for local folders (5.x only: the version these rules were checked on)."""
    import datasets
    from datasets import data_files as df
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if not datasets.__version__.startswith("5."):
        raise UnsupportedLayoutError(f"datasets {datasets.__version__} (the folder listing follows 5.x)")
    groups: list[dict[str, list[str]]] = [{"*sharded*": [p.replace("{split}", "*") for p in df.ALL_SPLIT_PATTERNS]}]
    groups += [dict(g) for g in df.ALL_DEFAULT_PATTERNS]
    tokens = sorted({k for words in df.SPLIT_KEYWORDS.values() for k in words} | {".eval", "task.toml",
                                                                                 "instruction.md", "-of-"})
    for group in groups:
        for patterns in group.values():
            for pattern in patterns:
                last = pattern.rsplit("/", 1)[-1]
                if last != "**" and not any(t in last for t in tokens):
                    # _neutral's shortcut holds only when a file name can matter through a token
                    raise UnsupportedLayoutError(f"datasets split pattern {pattern!r} is not one the listing knows")
    return SimpleNamespace(groups=groups, tokens=tokens, ignore=set(df.FILES_TO_IGNORE),
                           extensions=set(ImageFolder.EXTENSIONS), metadata_names=set(ImageFolder.METADATA_FILENAMES),
                           builder=ImageFolder)


def _neutral(name: str, tokens: list[str]) -> bool:
    """Whether no split pattern can depend on this file name, only on its folder.

    Every pattern ends in "**" (any name) or in a segment holding a keyword (train, test, ...,
    ".eval", "-of-", ...): a name without any of them (case-folded, to be safe) matches exactly
    where the name "x" in the same folder does."""
    lowered = name.lower()
    return not any(t in lowered for t in tokens)


def _compile(base: str, rules: SimpleNamespace) -> list[_Pattern]:
    from fsspec.utils import glob_translate

    return [_Pattern(g, split, re.compile(glob_translate(f"{base}/{pattern}")))
            for g, group in enumerate(rules.groups) for split, patterns in group.items() for pattern in patterns]


def _dir_mode_files(folder: Path, relative: str = "") -> Iterator[tuple[str, list[str]]]:
    """(relative folder, its data-file names) in sorted path order, as `datasets`' glob sees them:
    one directory's names at a time. Raises `UnsupportedLayoutError` for links to folders, broken links and
    special files (fsspec walks into or trips over those)."""
    names: list[tuple[str, bool]] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if set(name) == {"."}:
                raise UnsupportedLayoutError(f"a file named {name!r}")
            if name.startswith("."):
                continue  # hidden: datasets' glob drops it and everything below it
            if entry.is_symlink():
                try:
                    mode = os.stat(entry.path).st_mode
                except OSError:
                    raise UnsupportedLayoutError(f"broken link {entry.path}") from None
                if not stat.S_ISREG(mode):
                    raise UnsupportedLayoutError(f"link to a folder or special file: {entry.path}")
                is_dir = False
            elif entry.is_dir(follow_symlinks=False):
                is_dir = True
            elif entry.is_file(follow_symlinks=False):
                is_dir = False
            else:
                raise UnsupportedLayoutError(f"special file {entry.path}")
            if is_dir and name.startswith("__"):
                continue  # datasets skips "__pycache__"-like folders
            names.append((name + "/" if is_dir else name, is_dir))
    names.sort()  # "/" after a folder's name: the order of sorting whole paths (see _sorted_files)
    files: list[str] = []
    for key, is_dir in names:
        if is_dir:
            if files:
                yield relative, files
                files = []
            yield from _dir_mode_files(folder / key[:-1], relative + key)
        else:
            files.append(key)
    if files:
        yield relative, files


def _file_kind(path: str, rules: SimpleNamespace) -> str:
    """How datasets' folder builder files a data file: "image" (counted for labels), "image2"
    (a row, not counted: the image extension is the second one, "a.png.gz"), "metadata",
    "archive" or "other" (dropped)."""
    root, ext = os.path.splitext(path)
    _, second = os.path.splitext(root)
    if ext.lower() in rules.extensions:
        return "image"
    if second.lower() in rules.extensions:
        return "image2"
    if os.path.basename(path) in rules.metadata_names:
        return "metadata"
    return "archive" if ext.lower() == ".zip" else "other"


@dataclass
class Plan:
    """How one split's rows are made: which data files, labels or metadata, and the features."""

    split: str
    splits: list[str]
    patterns: list[int]  # dir mode: the split patterns whose files, in this order, are the rows
    labels: list[str] | None  # ClassLabel names when datasets adds `label`
    metadata: str | None  # the split's metadata file, when rows come from it
    metadata_ext: str | None
    features: Any


def _dir_matches(base: str, relative: str, name: str, patterns: list[_Pattern], memo: dict[str, tuple[int, ...]],
                 tokens: list[str]) -> tuple[int, ...]:
    folder = f"{base}/{relative}"
    if _neutral(name, tokens):
        if relative not in memo:
            memo.clear()  # one folder at a time: the walk hands each folder's files together
            memo[relative] = tuple(i for i, p in enumerate(patterns) if p.regex.match(folder + _NEUTRAL))
        return memo[relative]
    path = folder + name
    return tuple(i for i, p in enumerate(patterns) if p.regex.match(path))


def plan_split(folder: Path, split: str, rules: SimpleNamespace | None = None) -> Plan:
    """Pass 1 over a folder whose names are all UTF-8: the split's data files and features."""
    rules = rules or _datasets_rules()
    base = folder.as_posix()
    if any(c in base for c in "*?["):
        raise UnsupportedLayoutError(f"the folder path {base!r} has glob characters")
    patterns = _compile(base, rules)
    buckets: dict[tuple[int, ...], _Bucket] = {}
    memo: dict[str, tuple[int, ...]] = {}
    for relative, names in _dir_mode_files(folder):
        for name in names:
            if name in rules.ignore:
                continue
            matches = _dir_matches(base, relative, name, patterns, memo, rules.tokens)
            if not matches:
                continue
            buckets.setdefault(matches, _Bucket()).add(f"{base}/{relative}{name}", rules)
    matched = {i for key in buckets for i in key}
    group = next((g for g in range(len(rules.groups)) if any(patterns[i].group == g for i in matched)), None)
    if group is None:
        raise UnsupportedLayoutError("no data files (datasets raises its own error)")
    if group == 0:
        raise UnsupportedLayoutError("sharded file names (data/train-00000-of-00001...)")
    splits = [s for s in rules.groups[group] if any(patterns[i].split == s and patterns[i].group == group
                                                    for i in matched)]
    if split not in splits:
        raise ValueError(f'Unknown split "{split}". Should be one of {splits}.')
    # datasets concatenates the files of each of the split's patterns, in pattern order (a file
    # matching two is listed twice): the rows are one pass-2 walk per pattern.
    own = sorted(i for i in matched if patterns[i].group == group and patterns[i].split == split)
    per_split: dict[str, _Bucket] = {s: _Bucket() for s in splits}
    for key, bucket in buckets.items():
        for s in {patterns[i].split for i in key if patterns[i].group == group}:
            per_split[s].labels |= bucket.labels
            per_split[s].depths |= bucket.depths
            per_split[s].metadata = sorted(set(per_split[s].metadata) | set(bucket.metadata))
            per_split[s].archives |= bucket.archives
    return _features_plan(split, splits, per_split, own, rules)


def _features_plan(split: str, splits: list[str], per_split: dict[str, _Bucket], own: list[int],
                   rules: SimpleNamespace) -> Plan:
    """Labels, metadata and features as datasets' folder builder derives them from all splits."""
    import datasets

    if any(b.archives for b in per_split.values()):
        raise UnsupportedLayoutError("zip archives among the data files")
    with_metadata = [s for s in splits if per_split[s].metadata]
    if with_metadata and len(with_metadata) != len(splits):
        raise UnsupportedLayoutError("metadata files in some splits only")
    if not with_metadata:
        # datasets decides `label` per split on the labels seen so far; different answers along the
        # way would give rows without the feature's column.
        labels: set[str] = set()
        depths: set[int] = set()
        answers = []
        for s in splits:
            labels |= per_split[s].labels
            depths |= per_split[s].depths
            answers.append((s, len(labels) > 1 and len(depths) == 1))
        add_labels = answers[-1][1]
        if any(a != add_labels for _, a in answers):
            raise UnsupportedLayoutError("splits disagree on whether images are in class folders")
        names = sorted(labels) if add_labels else None
        features = datasets.Features({"image": datasets.Image(), **(
            {"label": datasets.ClassLabel(names=names)} if names else {})})
        return Plan(split, splits, own, names, None, None, features)
    exts = {os.path.splitext(m)[1] for s in splits for m in per_split[s].metadata}
    if len(exts) != 1:
        raise UnsupportedLayoutError("metadata files of different formats")
    ext = exts.pop()
    if len(per_split[split].metadata) != 1:
        raise UnsupportedLayoutError(f"{len(per_split[split].metadata)} metadata files in split {split!r} (datasets reads them "
                          "in no fixed order)")
    found = [_metadata_features(m, ext, rules) for s in splits for m in per_split[s].metadata]
    if any(f != found[0] for f in found):
        raise UnsupportedLayoutError("metadata files with different columns (datasets refuses them)")
    return Plan(split, splits, own, None, per_split[split].metadata[0], ext, _image_features(found[0]))


def _read_metadata(path: str, ext: str, rules: SimpleNamespace) -> Iterator[Any]:
    """datasets' own metadata reader (pandas chunks for csv, 10 MB blocks for jsonl, parquet
    row groups), so types are inferred chunk by chunk exactly as it infers them."""
    fake = SimpleNamespace(config=SimpleNamespace(filters=None, features=None))
    try:
        yield from rules.builder._read_metadata(fake, path, metadata_ext=ext)
    except (AttributeError, TypeError) as exc:  # the private reader changed: not the version checked
        raise UnsupportedLayoutError(f"datasets' metadata reader: {exc}") from exc


def _metadata_features(path: str, ext: str, rules: SimpleNamespace) -> Any:
    import datasets

    for table in _read_metadata(path, ext, rules):
        return datasets.Features.from_arrow_schema(table.schema)
    raise UnsupportedLayoutError(f"empty metadata file {path}")


def _file_name_like(name: str) -> bool:
    return name in ("file_name", "file_names") or name.endswith(("_file_name", "_file_names"))


_STRINGS = ("string", "large_string")


def _file_columns(metadata: Any) -> dict[str, str]:
    """Metadata column -> image column, in metadata order: `file_name` -> "image" and every
    top-level string `<name>_file_name` -> `<name>` (a mask beside its image, say), as `datasets`
    makes them Image columns. Raises `UnsupportedLayoutError` for what the listing does not
    reproduce: no string `file_name`, an `image` column, file-name columns nested or of lists,
    or a `<name>` that names another column."""
    import datasets

    def is_string(feature: Any) -> bool:
        return isinstance(feature, datasets.Value) and feature.dtype in _STRINGS

    if "image" in metadata or not is_string(metadata.get("file_name")):
        raise UnsupportedLayoutError("metadata without a string file_name column, or with an image column")
    columns: dict[str, str] = {}
    for key, feature in metadata.items():
        if key == "file_name":
            columns[key] = "image"
        elif key.endswith("_file_name") and is_string(feature):
            name = key[: -len("_file_name")]
            if name in ("", "image") or name in metadata:
                raise UnsupportedLayoutError(f"metadata column {key!r} would become the column {name or 'image'!r}, "
                                             "which exists")
            columns[key] = name

    def nested_names(feature: Any) -> Iterator[str]:
        inner = getattr(feature, "feature", None)
        if isinstance(feature, dict):
            for key, value in feature.items():
                yield key
                yield from nested_names(value)
        elif isinstance(feature, list):
            for value in feature:
                yield from nested_names(value)
        elif inner is not None:
            yield from nested_names(inner)

    names = list(nested_names(metadata))
    if any(_file_name_like(n) and n not in columns for n in names) or any(names.count(n) != 1 for n in columns):
        raise UnsupportedLayoutError("metadata with file-name columns besides file_name and <name>_file_name strings")
    return columns


def _image_features(metadata: Any) -> Any:
    """The metadata's features with each file-name column an Image column of its name, in its place."""
    import datasets

    columns = _file_columns(metadata)
    return datasets.Features({columns.get(k, k): (datasets.Image() if k in columns else v)
                              for k, v in metadata.items()})


def _joined(folder: str, value: str | None) -> str | None:
    """A metadata file name as the path next to the metadata file; None for a missing or empty one.

    `datasets` 5.x turns an empty `<name>_file_name` into the folder's own path (an empty
    `file_name` into None): here both are None, no image."""
    if not value:
        return None
    relative = os.path.normpath(value).replace("\\", "/")
    if "://" in value or os.path.isabs(value) or os.path.isabs(relative) or relative == ".." \
            or relative.startswith("../"):
        raise UnsupportedLayoutError(f"metadata file name {value!r} outside the folder (datasets refuses it)")
    return os.path.join(folder, relative)


def _metadata_rows(plan: Plan, rules: SimpleNamespace) -> Iterator[dict[str, Any]]:
    """The split's metadata rows, each file-name column joined to the metadata file's folder.

    Each column is read by its own name. `datasets` 5.x reads every image column's value from
    `file_name` first when that is still present, so a `<name>_file_name` column before
    `file_name` gets the image's path there and leaves `image` None; `datasets.py` refuses that
    column order on the fallback path (`_image_columns_in_place`)."""
    assert plan.metadata is not None and plan.metadata_ext is not None
    folder = os.path.dirname(plan.metadata)
    columns: dict[str, str] | None = None
    for table in _read_metadata(plan.metadata, plan.metadata_ext, rules):
        if columns is None:
            import datasets

            columns = _file_columns(datasets.Features.from_arrow_schema(table.schema))
        for sample in table.to_pylist():
            for source, image in columns.items():
                sample[image] = _joined(folder, sample.pop(source, None))
            yield sample


def _dir_mode_rows(folder: Path, plan: Plan, rules: SimpleNamespace) -> Iterator[dict[str, Any]]:
    """Pass 2: the image files of each of the plan's patterns, in sorted path order."""
    base = folder.as_posix()
    patterns = _compile(base, rules)
    for pattern in plan.patterns:
        memo: dict[str, tuple[int, ...]] = {}
        for relative, names in _dir_mode_files(folder):
            for name in names:
                if name in rules.ignore:
                    continue
                if pattern not in _dir_matches(base, relative, name, patterns, memo, rules.tokens):
                    continue
                path = f"{base}/{relative}{name}"
                if _file_kind(path, rules) in ("image", "image2"):
                    row: dict[str, Any] = {"image": path}
                    if plan.labels is not None:
                        row["label"] = os.path.basename(os.path.dirname(path))
                    yield row


# ------------------------------------------------------------------ names that are not UTF-8
def _walk_bytes(folder: bytes, relative: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
    """(relative path, absolute path) of every file os.walk lists (dot-folders skipped, links to
    folders neither walked nor listed), in sorted path order, one directory at a time."""
    names: list[tuple[bytes, bool]] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            is_dir = entry.is_dir()  # follows links, as os.walk does when it sorts dirs from files
            if is_dir and (entry.name.startswith(b".") or entry.is_symlink()):
                continue
            names.append((entry.name + b"/" if is_dir else entry.name, is_dir))
    names.sort()
    for key, is_dir in names:
        if is_dir:
            yield from _walk_bytes(os.path.join(folder, key[:-1]), relative + key)
        else:
            yield relative + key, os.path.join(folder, key)


def undecodable_files(folder: Path) -> list[str]:
    """Files whose relative path is not UTF-8, bad bytes escaped, sorted (the walk holds one
    directory's names at a time; only these names are kept)."""
    bad = []
    for relative, _ in _walk_bytes(os.fsencode(folder)):
        try:
            relative.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(relative.decode("utf-8", "backslashreplace"))
    return sorted(bad)


def plan_listed_split(folder: Path, split: str, rules: SimpleNamespace | None = None) -> Plan:
    """Pass 1 for a folder with names that are not UTF-8: the split is the top folder `split`,
    every decodable file below it handed to datasets by name (so hidden and "__" files count)."""
    rules = rules or _datasets_rules()
    if not re.match(r"^\w+(\.\w+)*$", split):
        raise UnsupportedLayoutError(f"split name {split!r}")
    bucket = _Bucket()
    seen = False
    for path in _listed_files(folder, split):
        seen = True
        bucket.add(path, rules)
    if not seen:
        raise FileNotFoundError(f"no folder {split!r} in {folder}")
    return _features_plan(split, [split], {split: bucket}, [], rules)


def _listed_files(folder: Path, split: str) -> Iterator[str]:
    want = split.encode("utf-8")
    for relative, _ in _walk_bytes(os.fsencode(folder)):
        if relative.split(b"/", 1)[0] != want:
            continue
        try:
            relative.decode("utf-8")
        except UnicodeDecodeError:
            continue
        path = str(folder / relative.decode("utf-8"))
        if any(c in path for c in "*?["):
            raise UnsupportedLayoutError(f"glob characters in {path!r} (datasets would read the name as a pattern)")
        if not os.path.isfile(path):
            raise UnsupportedLayoutError(f"not a regular file: {path}")
        yield path


def _listed_rows(folder: Path, plan: Plan, rules: SimpleNamespace) -> Iterator[dict[str, Any]]:
    for path in _listed_files(folder, plan.split):
        if _file_kind(path, rules) in ("image", "image2"):
            row: dict[str, Any] = {"image": path}
            if plan.labels is not None:
                row["label"] = os.path.basename(os.path.dirname(path))
            yield row


# ------------------------------------------------------------------ the Arrow file
def write_rows(folder: Path, split: str, listed: bool, out: Path) -> int:
    """Plan the split and write its rows to `out` (an Arrow file datasets can memory-map)."""
    from datasets.arrow_writer import ArrowWriter

    rules = _datasets_rules()
    plan = plan_listed_split(folder, split, rules) if listed else plan_split(folder, split, rules)
    if plan.metadata is not None:
        rows = _metadata_rows(plan, rules)
    else:
        rows = _listed_rows(folder, plan, rules) if listed else _dir_mode_rows(folder, plan, rules)
    writer = ArrowWriter(features=plan.features, path=str(out), writer_batch_size=_WRITER_BATCH)
    try:
        for row in rows:
            writer.write(plan.features.encode_example(row))
        count, _ = writer.finalize()
    finally:
        writer.close()
    with open(out, "rb") as handle:
        os.fsync(handle.fileno())
    return int(count)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _valid(entry_path: Path, record: dict[str, Any]) -> bool:
    """A committed listing is used only if its file is the one written (size and hash)."""
    path = entry_path / ROWS_FILE
    stats = record.get("stats", {})
    try:
        return path.stat().st_size == stats.get("bytes") and _file_digest(path) == stats.get("sha256")
    except OSError:
        return False


_TEMP_DIRS: list[str] = []


def _remove_temp_dirs() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def open_rows(folder: Path, split: str, fingerprint: str, cache: CacheStore | None, *, listed: bool,
              write: bool = True) -> Any:
    """The split's rows as a memory-mapped `datasets.Dataset` (raises `UnsupportedLayoutError` for a layout
    to open with `datasets` itself). `listed`: the folder has names that are not UTF-8. `write` False
    (a dry run): an existing entry is read, but a new listing goes to a temporary file."""
    import datasets

    if cache is not None:
        inputs = {"folder": folder.as_posix(), "fingerprint": fingerprint, "split": split, "listed": listed,
                  "datasets": datasets.__version__, "listing_version": LISTING_VERSION}
        key = content_key(inputs)
        entry = cache.lookup(KIND, key)
        if entry is not None and _valid(entry.path, entry.record):  # no lock: a read-only cache still reads
            return datasets.Dataset.from_file(str(entry.path / ROWS_FILE))
        try:
            if write:
                return datasets.Dataset.from_file(str(_build_entry(cache, key, inputs, folder, split, listed)))
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # a cache we may not write (shared, read-only): the listing lives in a temporary file
    if not _TEMP_DIRS:
        atexit.register(_remove_temp_dirs)
    _TEMP_DIRS.append(tempfile.mkdtemp(prefix="cscope-listing-"))
    out = Path(_TEMP_DIRS[-1]) / ROWS_FILE
    write_rows(folder, split, listed, out)
    return datasets.Dataset.from_file(str(out))


def _build_entry(cache: CacheStore, key: str, inputs: dict[str, Any], folder: Path, split: str, listed: bool) -> Path:
    """List the split into a new cache entry (under the key's lock; a writer that got there first wins)."""
    with cache.lock(KIND, key):
        entry = cache.lookup(KIND, key)
        if entry is not None and not _valid(entry.path, entry.record):
            shutil.rmtree(entry.path)  # held lock: nobody else reads or writes it now
            entry = None
        if entry is None:
            pending = cache.begin(KIND, key, inputs)
            out = pending.path / ROWS_FILE
            out.unlink(missing_ok=True)  # an interrupted write is never resumed
            count = write_rows(folder, split, listed, out)
            entry = cache.commit(pending, summary={"rows": count, "split": split},
                                 stats={"rows": count, "bytes": out.stat().st_size, "sha256": _file_digest(out)})
    return entry.path / ROWS_FILE
