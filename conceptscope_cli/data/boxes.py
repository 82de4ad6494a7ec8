"""Object bounding boxes: read them from a dataset column, map them onto the model's patches.

A bias claim measured on whole images cannot tell a context over-represented in a class from
a latent that fires on "context around this class's object" (METHOD §Categorization). With the
class object's box per image (`[datasets.NAME] object_box_column`), the claim can be measured
again on context-only images: the patch tokens any box touches are dropped.

A box is `[x0, y0, x1, y1]` in the image's own pixels (x right, y down, x1 and y1 exclusive,
floats allowed): pixel (i, j) is the square [i, i+1) x [j, j+1), and a box touches it when
they overlap with positive area. A value is one box, a list of boxes, or null / [] (no box).
In an imagefolder's metadata.jsonl every row of a split must use the same form (the JSON
reader refuses a column that holds both flat boxes and lists of boxes).

Other datasets' conventions are read as they are, never guessed: `object_box_format = "xywh"`
takes [x, y, width, height] (COCO), `object_box_units = "relative"` fractions of the image's
width and height (Open Images), and a dotted `object_box_column` ("objects.bbox") a field of a
struct column (a Hugging Face `Sequence` of dicts is a dict of lists per row; a list of dicts
gives one box per element). Every box is turned into pixel [x0, y0, x1, y1] before it is used.

`box_patch_mask` follows the model's own preprocessing: the boxes are drawn as a mask of the
original image size and sent through the model view's `to_crop` (resize, centre crop, whatever the
model uses), and a patch is marked when any pixel of it is > 0 afterwards. A resize
interpolates, so the mask can spread by up to about one crop pixel past the box's edge
(bicubic: its positive lobe); a patch whose boundary lies that close outside a box is then
marked too. That errs on the side of dropping a little more context, never of keeping
object pixels.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from conceptscope_cli.config.manifest import value_error
from conceptscope_cli.data.datasets import SplitHandle
from conceptscope_cli.errors import CscopeError

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), pixels, x1 / y1 exclusive


class CropView(Protocol):
    """What the mask needs of the model's view (`backbone.views.ModelView` is one): its resize and
    crop of a PIL image. A protocol, so the data layer does not import the backbone above it."""

    @property
    def to_crop(self) -> Callable[[Image.Image], Image.Image]: ...

BOX_HINT = ("a box is [x0, y0, x1, y1] in the image's pixels (x right, y down, x1 > x0, y1 > y0, none negative); "
            "several boxes are a list of such lists; null or [] for an image without a box. "
            'For [x, y, width, height] boxes (COCO) set object_box_format = "xywh"; for coordinates in '
            'fractions of the image\'s size, object_box_units = "relative"')

# A relative coordinate may exceed 1 by this much (float rounding of x + width) and is clipped.
RELATIVE_TOLERANCE = 1e-4

# A box may reach this far past the image's right / bottom edge (annotation tools round) and is
# clipped; farther out it is taken for boxes in other coordinates (another resolution).
EDGE_TOLERANCE = 1.0


def _is_number(value: Any) -> bool:  # noqa: ANN401 - any decoded column value
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _one_box(value: Any, box_format: str = "xyxy") -> Box:  # noqa: ANN401
    if not all(_is_number(v) for v in value):
        raise ValueError(f"box {value!r} holds something that is not a number")
    if len(value) != 4:
        raise ValueError(f"box {value!r} has {len(value)} numbers, not 4")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {value!r} has a non-finite coordinate")
    if min(x0, y0, x1, y1) < 0:
        raise ValueError(f"box {value!r} has a negative coordinate")
    if box_format == "xywh":
        if x1 <= 0:
            raise ValueError(f"box {value!r} has width <= 0 ([x, y, width, height])")
        if y1 <= 0:
            raise ValueError(f"box {value!r} has height <= 0 ([x, y, width, height])")
        return (x0, y0, x0 + x1, y0 + y1)
    if box_format != "xyxy":
        raise ValueError(f"unknown box format {box_format!r}")
    if x1 <= x0:
        raise ValueError(f"box {value!r} has x1 <= x0")
    if y1 <= y0:
        raise ValueError(f"box {value!r} has y1 <= y0")
    return (x0, y0, x1, y1)


def parse_boxes(value: Any, box_format: str = "xyxy") -> list[Box]:  # noqa: ANN401 - a raw column value
    """The boxes of one column value: one box, a list of them, or None / [] (no box), each read in
    `box_format` ("xyxy" or "xywh") and returned as (x0, y0, x1, y1).

    Raises ValueError saying what is wrong (not 4 numbers, x1 <= x0, negative, non-finite, ...)."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{value!r} is not a box (a list of 4 numbers) or a list of boxes")
    if not value:
        return []
    if all(isinstance(v, (list, tuple, np.ndarray)) for v in value):
        return [_one_box(v.tolist() if isinstance(v, np.ndarray) else v, box_format) for v in value]
    if any(isinstance(v, (list, tuple, np.ndarray)) for v in value):
        raise ValueError(f"{value!r} mixes numbers and boxes")
    return [_one_box(value, box_format)]


def in_pixels(boxes: Sequence[Box], image_size: tuple[int, int], units: str) -> list[Box]:
    """`boxes` in pixels of an image of `image_size` (W, H): unchanged for units "pixels"; for
    "relative" (fractions of the width and height) scaled, after checking they are fractions."""
    if units == "pixels":
        return list(boxes)
    if units != "relative":
        raise ValueError(f"unknown box units {units!r}")
    width, height = float(image_size[0]), float(image_size[1])
    out = []
    for box in boxes:
        if max(box) > 1 + RELATIVE_TOLERANCE:
            raise ValueError(f"box {list(box)} has a coordinate above 1, so it is not in relative units "
                             "(fractions of the image's width and height)")
        x0, y0, x1, y1 = (min(v, 1.0) for v in box)
        out.append((x0 * width, y0 * height, x1 * width, y1 * height))
    return out


def box_error(split: SplitHandle, row: int, problem: str) -> CscopeError:
    """The error for a bad box value of `row`: names the dataset, split, column and row."""
    return CscopeError(
        f"dataset {split.name!r} split {split.split!r}, column {split.config.object_box_column!r}, "
        f"row {row}: {problem}", hint=BOX_HINT)


def _column(split: SplitHandle, first_row: dict[str, Any] | None = None) -> tuple[str, tuple[str, ...]]:
    """The split's object box column and the field path inside it (() for a plain column), checked
    to exist (features, or a streamed row's keys). A dotted name is a column only when no column
    has that exact name: then its first part names the column and the rest fields of its structs."""
    column = split.config.object_box_column
    if column is None:
        raise value_error(split.config, "object_box_column", f"dataset {split.name!r} has no object_box_column",
                          hint=f"set object_box_column in [datasets.{split.name}] to the column of object boxes")
    features = getattr(split.rows, "features", None)
    available = list(features) if features else list(first_row) if first_row is not None else None
    if available is None or column in available:
        return column, ()
    top, *fields = column.split(".")
    if fields and top in available:
        return top, tuple(fields)
    raise value_error(split.config, "object_box_column",
                      f"dataset {split.name!r} split {split.split!r} has no column {column!r}",
                      hint=f"columns: {', '.join(available)}; set object_box_column in [datasets.{split.name}] "
                           '(a dotted name such as "objects.bbox" reads a field of a struct column)')


def _field(value: Any, fields: tuple[str, ...], column: str) -> Any:  # noqa: ANN401 - a raw column value
    """The value at `fields` inside a struct value: a dict's key, or that key of each element of a
    list of dicts (one box per element)."""
    for depth, name in enumerate(fields):
        where = ".".join((column, *fields[:depth]))
        if value is None:
            return None
        if isinstance(value, dict):
            if name not in value:
                raise ValueError(f"{where} has no field {name!r} (fields: {', '.join(map(str, value))})")
            value = value[name]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value):
            missing = [v for v in value if name not in v]
            if missing:
                raise ValueError(f"an element of {where} has no field {name!r} (fields: {', '.join(map(str, missing[0]))})")
            value = [v[name] for v in value]
        else:
            raise ValueError(f"{where} is {type(value).__name__}, not a struct with a field {name!r}")
    return value


def object_boxes(split: SplitHandle, rows: Sequence[int]) -> dict[int, list[Box]]:
    """{row: its object boxes} for some rows of a split ([] when the row has none).

    Random access, reading only the box column; one ordered pass over the first max(rows) + 1
    rows when streaming. Every value read is validated (`parse_boxes`, in the dataset's
    `object_box_format`) and returned as (x0, y0, x1, y1) in the dataset's `object_box_units`
    (`in_pixels` makes them pixels); a bad one raises a CscopeError naming the dataset, the column
    and the row."""
    column, fields = _column(split)
    wanted = sorted({int(r) for r in rows})
    out: dict[int, list[Box]] = {}
    if not wanted:
        return out
    if wanted[0] < 0:
        raise IndexError(f"row {wanted[0]} of split {split.split!r} does not exist")
    if not split.streaming:
        if wanted[-1] >= len(split.rows):
            raise IndexError(f"row {wanted[-1]} of split {split.split!r} does not exist ({len(split.rows)} rows)")
        values = split.rows.select_columns([column])[wanted][column]
        triples: Iterator[tuple[int, Any, tuple[str, ...]]] = ((r, v, fields) for r, v in zip(wanted, values))
    else:
        triples = _streamed(split, column, fields, wanted)
    for row, value, path in triples:
        try:
            out[row] = parse_boxes(_field(value, path, column), split.config.object_box_format)
        except ValueError as exc:
            raise box_error(split, row, str(exc)) from None
    if len(out) != len(wanted):
        missing = next(r for r in wanted if r not in out)
        raise IndexError(f"row {missing} of split {split.split!r} does not exist (the stream ended before it)")
    return out


def _streamed(split: SplitHandle, column: str, fields: tuple[str, ...],
              wanted: list[int]) -> Iterator[tuple[int, Any, tuple[str, ...]]]:
    """(row, box column value, field path inside it) of the wanted rows, in one ordered pass over
    the box column only."""
    known = bool(getattr(split.rows, "features", None))
    stream = split.rows.select_columns([column]) if known else split.rows
    chosen = set(wanted)
    for row, raw in enumerate(itertools.islice(iter(stream), wanted[-1] + 1)):
        if row == 0 and not known:
            # A stream's features can be unknown until a row is read: resolve the column on it.
            column, fields = _column(split, raw)
        if row in chosen:
            yield row, raw.get(column), fields


# ------------------------------------------------------------------ boxes -> patches


def box_pixel_mask(boxes: Sequence[Box], image_size: tuple[int, int]) -> Image.Image:
    """The pixels any box touches, as a mode "L" image of `image_size` (W, H): 255 touched, 0 not.

    A box reaching at most EDGE_TOLERANCE past the right / bottom edge is clipped; one starting
    outside the image or reaching farther raises ValueError (boxes in other coordinates)."""
    width, height = int(image_size[0]), int(image_size[1])
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {image_size}")
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        x0, y0, x1, y1 = _one_box(box)
        if x0 >= width or y0 >= height or x1 > width + EDGE_TOLERANCE or y1 > height + EDGE_TOLERANCE:
            raise ValueError(f"box {list(box)} does not fit the {width}x{height} image")
        # Pixel i is [i, i+1): the box touches pixels floor(x0) .. ceil(x1) - 1 (PIL's ends are inclusive).
        draw.rectangle((math.floor(x0), math.floor(y0), min(math.ceil(x1), width) - 1,
                        min(math.ceil(y1), height) - 1), fill=255)
    return mask


def box_patch_mask(boxes: Sequence[Box], image_size: tuple[int, int], view: CropView,
                   grid: tuple[int, int]) -> torch.Tensor:
    """Which of the model's P = gh * gw patches any box touches, (P,) bool in raster order.

    `image_size` is the original image's (W, H), the boxes' coordinates; `grid` is (gh, gw).
    The box mask goes through `view.to_crop` (the model's resize and crop), so a box part the
    crop cuts away marks nothing. Raises ValueError when the crop does not divide into the grid."""
    gh, gw = int(grid[0]), int(grid[1])
    if not boxes:
        box_pixel_mask(boxes, image_size)  # still check the size
        return torch.zeros(gh * gw, dtype=torch.bool)
    return pixel_mask_patches(box_pixel_mask(boxes, image_size), view, grid)


def pixel_mask_patches(mask: Image.Image, view: CropView, grid: tuple[int, int]) -> torch.Tensor:
    """Which of the model's P = gh * gw patches a pixel mask of the original image touches, (P,)
    bool in raster order: the mask (mode "L", nonzero = object) goes through the model's resize and
    crop, and a patch is marked when any of its pixels is nonzero afterwards (boxes and
    segmentation masks alike). Raises ValueError when the crop does not divide into the grid."""
    gh, gw = int(grid[0]), int(grid[1])
    crop = np.asarray(view.to_crop(mask))
    if crop.ndim == 3:  # the model's mode conversion made it RGB (equal channels)
        crop = crop.max(axis=2)
    height, width = crop.shape
    if height % gh or width % gw:
        raise ValueError(f"the model's {width}x{height} crop does not divide into a {gh}x{gw} patch grid")
    touched = crop.reshape(gh, height // gh, gw, width // gw).max(axis=(1, 3)) > 0  # (gh, gw)
    return torch.from_numpy(touched.reshape(-1))


def box_patch_masks(boxes: Sequence[Sequence[Box]], image_sizes: Sequence[tuple[int, int]], view: CropView,
                    grid: tuple[int, int]) -> torch.Tensor:
    """`box_patch_mask` of several images: (B, P) bool, row b for `boxes[b]` on an image of `image_sizes[b]`."""
    if len(boxes) != len(image_sizes):
        raise ValueError(f"{len(boxes)} box lists for {len(image_sizes)} images")
    if not boxes:
        return torch.zeros((0, int(grid[0]) * int(grid[1])), dtype=torch.bool)
    return torch.stack([box_patch_mask(b, s, view, grid) for b, s in zip(boxes, image_sizes)])
