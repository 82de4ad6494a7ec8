"""Open dataset splits with Hugging Face `datasets` and decode images robustly.

Row order is the dataset's own order, and a row's position in the split is its
stable `row_index`, which every later stage uses to refer to an image. Images are
decoded by us (the image column is cast to `Image(decode=False)`) inside DataLoader
workers, so that an unreadable file becomes a counted, listed skip instead of a crash,
and never shifts the indices of the rows after it.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

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


def open_split(name: str, config: DatasetConfig, split: str, project_root: Path) -> SplitHandle:
    """Open one split of a `[datasets.NAME]` entry without decoding any image."""
    import datasets

    datasets.disable_progress_bars()  # our own progress display is the one users watch
    if split not in config.splits:
        raise CscopeError(
            f"split {split!r} is not listed for dataset {name!r}",
            hint=f"configured splits: {', '.join(config.splits)} (edit [datasets.{name}] splits)",
        )
    try:
        if config.source == "hf":
            rows = datasets.load_dataset(
                config.path, config.config, split=split, revision=config.revision, streaming=config.streaming
            )
        elif config.source == "imagefolder":
            folder = _local_folder(config.path, project_root, name)
            rows = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split, streaming=config.streaming)
        else:
            folder = _local_folder(config.path, project_root, name)
            loaded = datasets.load_from_disk(str(folder))
            rows = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            if config.streaming:
                rows = rows.to_iterable_dataset()
    except CscopeError:
        raise
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as exc:
        raise CscopeError(f"could not open split {split!r} of dataset {name!r}: {exc}") from exc

    features = rows.features or {}
    if config.image_column not in features:
        raise CscopeError(
            f"dataset {name!r} has no image column {config.image_column!r}",
            hint=f"columns: {', '.join(features)}; set image_column in [datasets.{name}]",
        )
    if config.label_column and config.label_column not in features:
        raise CscopeError(
            f"dataset {name!r} has no label column {config.label_column!r}",
            hint=f"columns: {', '.join(features)}; set label_column in [datasets.{name}] (or label_column = \"\")",
        )
    rows = rows.cast_column(config.image_column, datasets.Image(decode=False))
    class_names = config.class_names
    if class_names is None and config.label_column:
        feature = features[config.label_column]
        class_names = list(getattr(feature, "names", None) or []) or None
    fingerprint = getattr(rows, "_fingerprint", None) or _streaming_fingerprint(config, split)
    return SplitHandle(name, split, config, rows, str(fingerprint), class_names)


def _local_folder(path: str, project_root: Path, name: str) -> Path:
    folder = Path(path).expanduser()
    folder = folder if folder.is_absolute() else project_root / folder
    if not folder.exists():
        raise CscopeError(f"dataset {name!r}: folder not found: {folder}", hint=f"check path in [datasets.{name}]")
    return folder.resolve()


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
    images = torch.stack([it[0] for it in good]) if good else None
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
    label_column = split.config.label_column
    rows = []
    for row_index, row in split.iter_raw(start, stop):
        label = row.get(label_column) if label_column else None
        rows.append((row_index, row[image_column], -1 if label is None else int(label)))
    return torch.utils.data.DataLoader(
        DecodedRows(rows, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers if len(rows) > batch_size else 0,
        collate_fn=collate_decoded,
        pin_memory=pin_memory,
    )
