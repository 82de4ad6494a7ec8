"""Object segmentation masks, and where the object is in an image whether it comes as boxes or masks.

With `[datasets.NAME] object_mask_column`, each image has a mask of its class's object: an image of
the same size whose nonzero pixels are the object. Any mode is read as the annotation tools write
it: a label map or palette image (VOC, ADE20K) counts every nonzero index, whatever its colour; a
grey or binary image every nonzero value; an RGB(A) image every pixel with a nonzero colour
channel (its alpha is ignored). A null value, or a mask without a single nonzero pixel, means "no
object here": such an image is left out of the context-only check and counted, as one without a
box.

`object_patch_masks` is the one entry the context-only check uses: for some rows and their decoded
images, the model's patches the object touches, from the boxes (`data/boxes.py`) or the masks.
Both go through the same drawing: a mode "L" mask of the image's size, through the model's own
resize and crop, a patch marked when any of its pixels is nonzero afterwards.
"""

from __future__ import annotations

import io
import itertools
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from conceptscope_cli.config.manifest import value_error
from conceptscope_cli.data.boxes import CropView, box_error, box_pixel_mask, in_pixels, object_boxes, pixel_mask_patches
from conceptscope_cli.data.datasets import SplitHandle
from conceptscope_cli.errors import CscopeError

MASK_HINT = ("a mask is an image of the same size as its image, nonzero where the class's object is (null: no "
             "mask); in an imagefolder's metadata.jsonl, name the file in a <column>_file_name field, e.g. "
             "mask_file_name for the column mask")


def parse_mask(value: Any, image_size: tuple[int, int]) -> Image.Image | None:  # noqa: ANN401 - a raw column value
    """The object pixels of one mask value as a mode "L" image (255 object, 0 not), or None when the
    value is null or marks no pixel. `image_size` is the image's (W, H), which the mask must have.

    Raises ValueError saying what is wrong (not an image, another size, unreadable)."""
    if value is None or (isinstance(value, dict) and value.get("bytes") is None and not value.get("path")):
        return None
    if isinstance(value, Image.Image):
        mask = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        mask = _open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict):
        mask = _open(value["path"])
    else:
        raise ValueError(f"{type(value).__name__} value is not an image (a mask column holds images)")
    if tuple(mask.size) != (int(image_size[0]), int(image_size[1])):
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but its image {image_size[0]}x{image_size[1]}")
    values = np.asarray(mask)  # palette images give their indices, not their colours
    if values.ndim == 3:
        values = values[..., :3] if mask.mode in ("RGBA", "RGBa", "LA", "La") and values.shape[2] > 1 else values
        values = values.max(axis=2)
    object_pixels = values > 0
    if not object_pixels.any():
        return None
    return Image.fromarray(object_pixels.astype(np.uint8) * 255, "L")


def _open(source: Any) -> Image.Image:  # noqa: ANN401 - a path or a file object
    try:
        image = Image.open(source)
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"the mask could not be read: {exc}") from None
    return image


def mask_error(split: SplitHandle, row: int, problem: str) -> CscopeError:
    """The error for a bad mask value of `row`: names the dataset, split, column and row."""
    return CscopeError(
        f"dataset {split.name!r} split {split.split!r}, column {split.config.object_mask_column!r}, "
        f"row {row}: {problem}", hint=MASK_HINT)


def _mask_column(split: SplitHandle) -> str:
    column = split.config.object_mask_column
    if column is None:
        raise value_error(split.config, "object_mask_column", f"dataset {split.name!r} has no object_mask_column",
                          hint=f"set object_mask_column in [datasets.{split.name}] to the column of object masks")
    features = getattr(split.rows, "features", None)
    if features and column not in features:
        raise value_error(split.config, "object_mask_column",
                          f"dataset {split.name!r} split {split.split!r} has no column {column!r}",
                          hint=f"columns: {', '.join(features)}; " + MASK_HINT)
    return column


def mask_values(split: SplitHandle, rows: Sequence[int]) -> dict[int, Any]:
    """{row: its raw mask value} for some rows (undecoded: {"bytes", "path"} for an Image column).
    Random access reading the mask column only; one ordered pass when streaming."""
    import datasets

    column = _mask_column(split)
    wanted = sorted({int(r) for r in rows})
    if not wanted:
        return {}
    if wanted[0] < 0:
        raise IndexError(f"row {wanted[0]} of split {split.split!r} does not exist")
    if not split.streaming:
        if wanted[-1] >= len(split.rows):
            raise IndexError(f"row {wanted[-1]} of split {split.split!r} does not exist ({len(split.rows)} rows)")
        table = split.rows.select_columns([column])
        if isinstance(table.features[column], datasets.Image):
            table = table.cast_column(column, datasets.Image(decode=False))  # decoded here, with errors per row
        return dict(zip(wanted, table[wanted][column]))
    out: dict[int, Any] = {}
    for row, raw in _stream(split, column, wanted):
        out[row] = raw
    if len(out) != len(wanted):
        missing = next(r for r in wanted if r not in out)
        raise IndexError(f"row {missing} of split {split.split!r} does not exist (the stream ended before it)")
    return out


def _stream(split: SplitHandle, column: str, wanted: list[int]) -> Iterator[tuple[int, Any]]:
    chosen = set(wanted)
    for row, raw in enumerate(itertools.islice(iter(split.rows), wanted[-1] + 1)):
        if row == 0 and column not in raw:
            raise value_error(split.config, "object_mask_column",
                              f"dataset {split.name!r} split {split.split!r} has no column {column!r}",
                              hint=f"columns: {', '.join(raw)}; " + MASK_HINT)
        if row in chosen:
            yield row, raw[column]


def object_patch_masks(split: SplitHandle, rows: Sequence[int], images: dict[int, Image.Image], view: CropView,
                       grid: tuple[int, int]) -> dict[int, torch.Tensor | None]:
    """{row: (P,) bool, the model's patches its object touches} for some rows and their decoded
    images, from the dataset's object masks or boxes (`[datasets.NAME] object_mask_column` /
    `object_box_column`); None for a row without a box or mask. A bad value raises a CscopeError
    naming the dataset, column and row."""
    out: dict[int, torch.Tensor | None] = {}
    if split.config.object_mask_column is not None:
        for row, value in mask_values(split, rows).items():
            try:
                mask = parse_mask(value, images[row].size)
            except ValueError as exc:
                raise mask_error(split, row, str(exc)) from None
            out[row] = None if mask is None else pixel_mask_patches(mask, view, grid)
        return out
    boxes = object_boxes(split, rows)
    for row in sorted(boxes):
        if not boxes[row]:
            out[row] = None
            continue
        size = images[row].size
        try:
            pixels = box_pixel_mask(in_pixels(boxes[row], size, split.config.object_box_units), size)
            out[row] = pixel_mask_patches(pixels, view, grid)
        except ValueError as exc:  # a box outside its image: boxes in other coordinates
            raise box_error(split, row, str(exc)) from None
    return out

