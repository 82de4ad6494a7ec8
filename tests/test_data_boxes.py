"""Object boxes (conceptscope_cli/data/boxes.py): the manifest key, the column reader and the
box -> patch mask through the model's own preprocessing (open_clip's eval transform)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conceptscope_cli.backbone.views import ModelView, model_view
from conceptscope_cli.config.schema import FieldValueError
from conceptscope_cli.config.sections import DatasetConfig
from conceptscope_cli.data.boxes import box_patch_mask, box_patch_masks, in_pixels, object_boxes, parse_boxes
from conceptscope_cli.data.datasets import open_split
from conceptscope_cli.errors import CscopeError

# ------------------------------------------------------------------ manifest key


def test_object_box_column_must_name_another_column() -> None:
    assert DatasetConfig(source="imagefolder", path="d").object_box_column is None
    assert DatasetConfig(source="imagefolder", path="d", object_box_column="box").object_box_column == "box"
    for bad in ("", "  ", "image", "label"):
        with pytest.raises(FieldValueError, match="other than image_column and label_column") as err:
            DatasetConfig(source="imagefolder", path="d", object_box_column=bad)
        assert err.value.key == "object_box_column"
    with pytest.raises(FieldValueError, match="other than"):
        DatasetConfig(source="imagefolder", path="d", label_column="klass", object_box_column="klass")
    # unlabelled data: the box column is free to be called anything but the image column
    assert DatasetConfig(source="imagefolder", path="d", label_column="", object_box_column="label").object_box_column


def test_object_box_column_does_not_change_the_dict_stamp() -> None:
    """dict's outputs do not depend on the boxes: setting the key must not re-run `cscope dict`,
    and adding the key to DatasetConfig must not invalidate the stamps of existing projects."""
    import dataclasses

    from conceptscope_cli.config.sections import DictConfig
    from conceptscope_cli.dictionary.stage import dict_stamp

    plain = DatasetConfig(source="imagefolder", path="d")
    boxed = DatasetConfig(source="imagefolder", path="d", object_box_column="box")
    stamp = dict_stamp(None, DictConfig(), plain, "latents-key")  # type: ignore[arg-type]  # the project is unused here
    assert dict_stamp(None, DictConfig(), boxed, "latents-key") == stamp  # type: ignore[arg-type]
    assert dict_stamp(None, DictConfig(), dataclasses.replace(plain, class_names=["a"]), "latents-key") != stamp  # type: ignore[arg-type]


# ------------------------------------------------------------------ values


def test_parse_boxes_forms() -> None:
    assert parse_boxes(None) == [] and parse_boxes([]) == []
    assert parse_boxes([1, 2, 3.5, 4]) == [(1.0, 2.0, 3.5, 4.0)]
    assert parse_boxes([[0, 0, 1, 1], [2, 2, 3, 3]]) == [(0.0, 0.0, 1.0, 1.0), (2.0, 2.0, 3.0, 3.0)]
    assert parse_boxes(np.array([1.0, 2.0, 3.0, 4.0])) == [(1.0, 2.0, 3.0, 4.0)]


@pytest.mark.parametrize(("value", "problem"), [
    ([1, 2, 3], "3 numbers, not 4"),
    ([1, 2, 3, 4, 5, 6, 7, 8], "8 numbers, not 4"),
    ([5, 0, 5, 4], "x1 <= x0"),
    ([6, 0, 5, 4], "x1 <= x0"),
    ([0, 4, 5, 3], "y1 <= y0"),
    ([-1, 0, 5, 4], "negative"),
    ([0, 0, float("nan"), 4], "non-finite"),
    ([0, 0, float("inf"), 4], "non-finite"),
    ([0, 0, "5", 4], "not a number"),
    ([0, 0, True, 4], "not a number"),
    ([[0, 0, 1, 1], 3], "mixes numbers and boxes"),
    ([[0, 0, 1, 1], [0, 0, 1]], "3 numbers, not 4"),
    ("0 0 1 1", "is not a box"),
    (7, "is not a box"),
])
def test_parse_boxes_says_what_is_wrong(value: Any, problem: str) -> None:  # noqa: ANN401
    with pytest.raises(ValueError, match=problem):
        parse_boxes(value)


def test_xywh_boxes_become_corners() -> None:
    """COCO's [x, y, width, height]: x1 = x + width, y1 = y + height; a zero width or height is refused."""
    assert parse_boxes([1, 2, 3.5, 4], "xywh") == [(1.0, 2.0, 4.5, 6.0)]
    assert parse_boxes([[0, 0, 1, 1], [2, 3, 2, 2]], "xywh") == [(0.0, 0.0, 1.0, 1.0), (2.0, 3.0, 4.0, 5.0)]
    # [5, 0, 2, 4] is a valid xywh box although x1 <= x0 would refuse it as xyxy
    assert parse_boxes([5, 0, 2, 4], "xywh") == [(5.0, 0.0, 7.0, 4.0)]
    with pytest.raises(ValueError, match="width <= 0"):
        parse_boxes([1, 1, 0, 3], "xywh")
    with pytest.raises(ValueError, match="height <= 0"):
        parse_boxes([1, 1, 3, 0], "xywh")


def test_relative_boxes_scale_to_the_image() -> None:
    """Fractions of the width and height (Open Images) scale per image; a coordinate above 1 is refused."""
    assert in_pixels([(0.25, 0.5, 0.75, 1.0)], (64, 32), "relative") == [(16.0, 16.0, 48.0, 32.0)]
    assert in_pixels([(0.25, 0.5, 0.75, 1.0)], (64, 32), "pixels") == [(0.25, 0.5, 0.75, 1.0)]
    assert in_pixels([(0.0, 0.0, 1.00001, 1.0)], (10, 10), "relative") == [(0.0, 0.0, 10.0, 10.0)]  # rounding: clipped
    with pytest.raises(ValueError, match="not in relative units"):
        in_pixels([(0, 0, 20, 20)], (32, 32), "relative")
    view = _view(32)
    assert torch.equal(box_patch_mask(in_pixels([(0.25, 0.0, 0.5, 0.25)], (32, 32), "relative"), (32, 32), view, (4, 4)),
                       box_patch_mask([(8, 0, 16, 8)], (32, 32), view, (4, 4)))


@pytest.mark.parametrize("key", ["object_box_format", "object_box_units"])
def test_box_convention_keys_name_their_line(tmp_path: Path, key: str) -> None:
    """A wrong value of the new keys is refused with the key, the line and the allowed values."""
    from conceptscope_cli.config.manifest import load_manifest

    path = tmp_path / "cscope.toml"
    path.write_text('[project]\nname = "p"\n\n[datasets.d]\nsource = "imagefolder"\npath = "data"\n'
                    f'object_box_column = "box"\n{key} = "yxyx"\n')
    with pytest.raises(CscopeError) as err:
        load_manifest(path)
    text = str(err.value) + (err.value.hint or "")
    assert key in text and ":8" in text and ('"xyxy"' in text or '"pixels"' in text), text


# ------------------------------------------------------------------ reader


def _folder(root: Path, boxes: list[Any], column: str = "box") -> Path:
    (root / "train").mkdir(parents=True)
    with open(root / "train" / "metadata.jsonl", "w") as meta:
        for i, box in enumerate(boxes):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / "train" / f"{i:03d}.png")
            meta.write(json.dumps({"file_name": f"{i:03d}.png", "label": i % 2, column: box}) + "\n")
    return root


def _split(root: Path, *, streaming: bool = False, column: str = "box") -> Any:  # noqa: ANN401
    cfg = DatasetConfig(source="imagefolder", path=str(root), splits=["train"], object_box_column=column, streaming=streaming,
                        class_names=["a", "b"])
    return open_split("shapes", cfg, "train", root)


@pytest.mark.parametrize("streaming", [False, True])
def test_reader_imagefolder_flat_boxes_and_no_box(tmp_path: Path, streaming: bool) -> None:
    _folder(tmp_path, [[0, 1, 4, 5], None, [], [0.5, 1.5, 7.25, 8]])
    split = _split(tmp_path, streaming=streaming)
    assert object_boxes(split, [3, 1, 0, 3]) == {0: [(0.0, 1.0, 4.0, 5.0)], 1: [], 3: [(0.5, 1.5, 7.25, 8.0)]}
    assert object_boxes(split, [2]) == {2: []}
    assert object_boxes(split, []) == {}
    with pytest.raises(IndexError, match="row 4"):
        object_boxes(split, [4])


@pytest.mark.parametrize("streaming", [False, True])
def test_reader_imagefolder_lists_of_boxes(tmp_path: Path, streaming: bool) -> None:
    _folder(tmp_path, [[[0, 0, 2, 2], [4, 4, 8, 8]], None, [[1, 1, 3, 3]]])
    assert object_boxes(_split(tmp_path, streaming=streaming), [0, 1, 2]) == {
        0: [(0.0, 0.0, 2.0, 2.0), (4.0, 4.0, 8.0, 8.0)], 1: [], 2: [(1.0, 1.0, 3.0, 3.0)]}


@pytest.mark.parametrize("streaming", [False, True])
def test_reader_bad_value_names_dataset_column_and_row(tmp_path: Path, streaming: bool) -> None:
    _folder(tmp_path, [[0, 0, 4, 4], [0, 0, 4, 4], [5, 0, 2, 4]])
    split = _split(tmp_path, streaming=streaming)
    assert object_boxes(split, [0, 1]) == {0: [(0.0, 0.0, 4.0, 4.0)], 1: [(0.0, 0.0, 4.0, 4.0)]}  # only rows read
    with pytest.raises(CscopeError) as err:
        object_boxes(split, [0, 2])
    message = err.value.message
    assert "'shapes'" in message and "'box'" in message and "row 2" in message and "x1 <= x0" in message
    assert err.value.hint and "[x0, y0, x1, y1]" in err.value.hint


@pytest.mark.parametrize("streaming", [False, True])
def test_reader_missing_column_lists_the_columns(tmp_path: Path, streaming: bool) -> None:
    _folder(tmp_path, [[0, 0, 4, 4]], column="bbox")
    with pytest.raises(CscopeError) as err:
        object_boxes(_split(tmp_path, streaming=streaming, column="box"), [0])
    assert "'box'" in err.value.message and err.value.hint and "bbox" in err.value.hint and "label" in err.value.hint


def test_reader_without_the_key_says_to_set_it(tmp_path: Path) -> None:
    _folder(tmp_path, [[0, 0, 4, 4]])
    split = open_split("shapes", DatasetConfig(source="imagefolder", path=str(tmp_path), class_names=["a", "b"]),
                       "train", tmp_path)
    with pytest.raises(CscopeError, match="object_box_column"):
        object_boxes(split, [0])


@pytest.mark.parametrize("streaming", [False, True])
def test_reader_disk_dataset_sequence_features(tmp_path: Path, streaming: bool) -> None:
    """A save_to_disk dataset with Sequence features: one box per row, and a list of boxes per row."""
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (8, 8)) for _ in range(3)]
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]),
        "box": datasets.Sequence(datasets.Value("float32"), length=4),
        "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
    })
    ds = datasets.Dataset.from_dict({
        "image": images, "label": [0, 1, 0], "box": [[0, 0, 4, 4], [1, 2, 3, 4], [0, 0, 8, 8]],
        "boxes": [[[0, 0, 4, 4], [4, 4, 8, 8]], [], [[float("nan"), 0, 1, 1]]],
    }, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "disk"))
    cfg = DatasetConfig(source="disk", path=str(tmp_path / "disk"), object_box_column="box", streaming=streaming)
    split = open_split("d", cfg, "train", tmp_path)
    assert object_boxes(split, [1, 2]) == {1: [(1.0, 2.0, 3.0, 4.0)], 2: [(0.0, 0.0, 8.0, 8.0)]}
    cfg = DatasetConfig(source="disk", path=str(tmp_path / "disk"), object_box_column="boxes", streaming=streaming)
    split = open_split("d", cfg, "train", tmp_path)
    assert object_boxes(split, [0, 1]) == {0: [(0.0, 0.0, 4.0, 4.0), (4.0, 4.0, 8.0, 8.0)], 1: []}
    with pytest.raises(CscopeError, match="row 2: .*non-finite"):
        object_boxes(split, [2])


# ------------------------------------------------------------------ boxes -> patches


def _view(size: int) -> ModelView:
    """open_clip's own eval transform at `size` px (Resize shortest side, bicubic; CenterCrop; RGB)."""
    from open_clip.transform import image_transform

    return model_view(image_transform(size, is_train=False))


def _marked(mask: torch.Tensor, grid: tuple[int, int]) -> set[tuple[int, int]]:
    """{(row, column)} of the marked patches of a raster-order (P,) mask."""
    assert mask.dtype == torch.bool and mask.shape == (grid[0] * grid[1],)
    return {(int(i) // grid[1], int(i) % grid[1]) for i in torch.nonzero(mask).flatten()}


def test_square_image_resized_64_to_32() -> None:
    """64 px -> 32 px crop, 4x4 grid: a patch is 8 crop px = 16 image px. The box x 20..40,
    y 4..30 is crop x 10..20, y 2..15: columns 1-2, rows 0-1."""
    mask = box_patch_mask([(20, 4, 40, 30)], (64, 64), _view(32), (4, 4))
    assert _marked(mask, (4, 4)) == {(0, 1), (0, 2), (1, 1), (1, 2)}
    assert mask.view(4, 4)[0, 1]  # raster order: index row * gw + column


def test_non_square_image_centre_crop_cuts_the_box() -> None:
    """96x64 -> resize 48x32 -> centre crop x 8..40 of the resized image = x 16..80 of the image.
    The box x 4..40, y 10..44 keeps x 16..40 = crop x 0..12 (columns 0-1) and crop y 5..22 (rows
    0-2); its part left of x 16 is cut away. A box at x 82..94 lies outside the crop: nothing."""
    view = _view(32)
    cut = box_patch_mask([(4, 10, 40, 44)], (96, 64), view, (4, 4))
    assert _marked(cut, (4, 4)) == {(r, c) for r in range(3) for c in range(2)}
    assert not box_patch_mask([(82, 10, 94, 40)], (96, 64), view, (4, 4)).any()
    # a tall image is cropped in y: 64x96 -> 32x48 -> crop y 8..40 (image y 16..80)
    tall = box_patch_mask([(10, 4, 44, 40)], (64, 96), view, (4, 4))
    assert _marked(tall, (4, 4)) == {(r, c) for r in range(2) for c in range(3)}


def test_one_pixel_touch_marks_the_patch() -> None:
    """At the model's size (no resampling), 8-px patches: a box covering only pixel column 8 of
    rows 7..8 touches patches (0, 1) and (1, 1); a box of a fraction of one pixel marks its patch."""
    view = _view(32)
    assert _marked(box_patch_mask([(8, 7, 9, 9)], (32, 32), view, (4, 4)), (4, 4)) == {(0, 1), (1, 1)}
    assert _marked(box_patch_mask([(31.5, 31.5, 31.6, 31.9)], (32, 32), view, (4, 4)), (4, 4)) == {(3, 3)}
    # x1 is exclusive: a box ending at 8 does not touch column 8 (patch column 1)
    assert _marked(box_patch_mask([(0, 0, 8, 8)], (32, 32), view, (4, 4)), (4, 4)) == {(0, 0)}
    assert _marked(box_patch_mask([(0, 0, 8.01, 8)], (32, 32), view, (4, 4)), (4, 4)) == {(0, 0), (0, 1)}


def test_several_boxes_mark_their_union_and_no_box_marks_nothing() -> None:
    view = _view(32)
    both = box_patch_mask([(0, 0, 4, 4), (25, 17, 30, 20)], (32, 32), view, (4, 4))
    assert _marked(both, (4, 4)) == {(0, 0), (2, 3)}
    assert not box_patch_mask([], (32, 32), view, (4, 4)).any()
    batch = box_patch_masks([[(0, 0, 4, 4)], [], [(0, 0, 4, 4), (25, 17, 30, 20)]], [(32, 32)] * 3, view, (4, 4))
    assert batch.shape == (3, 16) and torch.equal(batch[2], both) and not batch[1].any()
    assert torch.equal(batch[0], box_patch_mask([(0, 0, 4, 4)], (32, 32), view, (4, 4)))


def test_boxes_that_do_not_fit_the_image_or_grid() -> None:
    view = _view(32)
    # up to one pixel past the edge (rounding) is clipped; farther means other coordinates
    assert _marked(box_patch_mask([(24, 24, 32.9, 33)], (32, 32), view, (4, 4)), (4, 4)) == {(3, 3)}
    with pytest.raises(ValueError, match="does not fit the 32x32 image"):
        box_patch_mask([(0, 0, 40, 8)], (32, 32), view, (4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        box_patch_mask([(32, 0, 33, 8)], (32, 32), view, (4, 4))
    with pytest.raises(ValueError, match="patch grid"):
        box_patch_mask([(0, 0, 8, 8)], (32, 32), view, (5, 5))


@pytest.mark.parametrize("streaming", [False, True])
def test_reader_struct_field_of_a_detection_dataset(tmp_path: Path, streaming: bool) -> None:
    """`objects.bbox` of a Hugging Face detection dataset (a Sequence of dicts: one dict of lists
    per row), in COCO's [x, y, width, height]: every object's box, as corners."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]),
        "objects": datasets.Sequence({"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                      "category": datasets.Value("int64")}),
    })
    ds = datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (8, 8)) for _ in range(3)], "label": [0, 1, 0],
        "objects": [{"bbox": [[0, 0, 4, 4], [4, 4, 2, 3]], "category": [1, 2]}, {"bbox": [], "category": []},
                    {"bbox": [[1, 1, 0, 2]], "category": [1]}],
    }, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "disk"))
    cfg = DatasetConfig(source="disk", path=str(tmp_path / "disk"), object_box_column="objects.bbox",
                        object_box_format="xywh", streaming=streaming)
    split = open_split("d", cfg, "train", tmp_path)
    assert object_boxes(split, [0, 1]) == {0: [(0.0, 0.0, 4.0, 4.0), (4.0, 4.0, 6.0, 7.0)], 1: []}
    with pytest.raises(CscopeError, match="row 2: .*width <= 0"):
        object_boxes(split, [2])
    wrong = DatasetConfig(source="disk", path=str(tmp_path / "disk"), object_box_column="objects.box", streaming=streaming)
    with pytest.raises(CscopeError, match="objects has no field 'box' .*bbox"):
        object_boxes(open_split("d", wrong, "train", tmp_path), [0])
    with pytest.raises(CscopeError) as err:
        object_boxes(open_split("d", DatasetConfig(source="disk", path=str(tmp_path / "disk"),
                                                   object_box_column="things.bbox", streaming=streaming), "train", tmp_path), [0])
    assert err.value.hint and "objects" in err.value.hint


def test_reader_list_of_dicts_gives_one_box_per_element(tmp_path: Path) -> None:
    """An imagefolder's metadata.jsonl with a list of objects per image: `objects.box` reads each one's box."""
    _folder(tmp_path, [[{"box": [0, 0, 2, 2], "name": "a"}, {"box": [4, 4, 8, 8], "name": "b"}], [],
                       [{"box": [1, 1, 3, 3], "name": "a"}]], column="objects")
    split = _split(tmp_path, column="objects.box")
    assert object_boxes(split, [0, 1, 2]) == {0: [(0.0, 0.0, 2.0, 2.0), (4.0, 4.0, 8.0, 8.0)], 1: [],
                                               2: [(1.0, 1.0, 3.0, 3.0)]}
