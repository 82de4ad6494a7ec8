"""Object segmentation masks (conceptscope_cli/data/object_masks.py): the manifest key, the mask
values, the column reader, and the patches the context-only check drops, from masks or boxes."""

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
from conceptscope_cli.data.boxes import box_patch_mask
from conceptscope_cli.data.datasets import open_split
from conceptscope_cli.data.object_masks import object_patch_masks, parse_mask
from conceptscope_cli.errors import CscopeError


def _view(size: int) -> ModelView:
    from open_clip.transform import image_transform

    return model_view(image_transform(size, is_train=False))


def _rect(size: tuple[int, int], box: tuple[int, int, int, int], mode: str = "L", value: int = 255) -> Image.Image:
    """A mask of `size` (W, H) that is `value` on the pixels x0 <= x < x1, y0 <= y < y1."""
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[box[1]:box[3], box[0]:box[2]] = value
    image = Image.fromarray(array, "L")
    return image if mode == "L" else image.convert(mode)


# ------------------------------------------------------------------ manifest key


def test_mask_column_is_checked_and_excludes_boxes() -> None:
    assert DatasetConfig(source="imagefolder", path="d", object_mask_column="mask").region_settings() == {
        "mask_column": "mask"}
    assert DatasetConfig(source="imagefolder", path="d", object_box_column="box").region_settings() == {
        "column": "box", "format": "xyxy", "units": "pixels"}
    assert DatasetConfig(source="imagefolder", path="d").region_settings() is None
    for bad in ("", "image", "label"):
        with pytest.raises(FieldValueError) as err:
            DatasetConfig(source="imagefolder", path="d", object_mask_column=bad)
        assert err.value.key == "object_mask_column"
    with pytest.raises(FieldValueError, match="not both") as err:
        DatasetConfig(source="imagefolder", path="d", object_mask_column="mask", object_box_column="box")
    assert err.value.key == "object_mask_column"


# ------------------------------------------------------------------ values


def test_parse_mask_reads_every_mode_as_the_tools_write_it() -> None:
    size = (8, 6)
    expected = np.zeros((6, 8), dtype=bool)
    expected[1:4, 2:5] = True
    # a palette label map: index 3 is the object whatever colour the palette gives it (here black)
    palette = _rect(size, (2, 1, 5, 4), value=3).convert("P")
    palette.putpalette([0, 0, 0] * 256)
    masks = {"L": _rect(size, (2, 1, 5, 4)), "1": _rect(size, (2, 1, 5, 4), "1"), "P": palette,
             "RGB": _rect(size, (2, 1, 5, 4), "RGB"), "label 1": _rect(size, (2, 1, 5, 4), value=1)}
    for name, mask in masks.items():
        parsed = parse_mask(mask, size)
        assert parsed is not None and parsed.mode == "L", name
        assert np.array_equal(np.asarray(parsed) > 0, expected), name
    # RGBA: the alpha channel is not the object (opaque black everywhere is an empty mask)
    assert parse_mask(Image.new("RGBA", size, (0, 0, 0, 255)), size) is None
    assert parse_mask(Image.new("L", size, 0), size) is None and parse_mask(None, size) is None
    assert parse_mask({"bytes": None, "path": None}, size) is None


def test_parse_mask_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the mask is 4x4 but its image 8x6"):
        parse_mask(Image.new("L", (4, 4), 255), (8, 6))
    with pytest.raises(ValueError, match="str value is not an image"):
        parse_mask("mask.png", (8, 6))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could not be read"):
        parse_mask({"bytes": None, "path": str(tmp_path / "broken.png")}, (8, 6))


# ------------------------------------------------------------------ reader and patches


def _disk(tmp_path: Path, masks: list[Any], streaming: bool) -> Any:  # noqa: ANN401
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]),
                                  "mask": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(len(masks))],
                                     "label": [i % 2 for i in range(len(masks))], "mask": masks}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "disk"))
    cfg = DatasetConfig(source="disk", path=str(tmp_path / "disk"), object_mask_column="mask", streaming=streaming)
    return open_split("d", cfg, "train", tmp_path)


@pytest.mark.parametrize("streaming", [False, True])
def test_masks_drop_the_patches_they_touch(tmp_path: Path, streaming: bool) -> None:
    """A rectangular mask drops exactly the patches of the box it fills; an L-shaped one only the
    patches it touches (what a box around it would not spare); a null mask gives no region."""
    view = _view(32)
    ell = np.zeros((32, 32), dtype=np.uint8)
    ell[0:16, 0:8] = 1  # patch column 0, rows 0-1
    ell[8:16, 8:24] = 1  # and row 1, columns 1-2
    split = _disk(tmp_path, [_rect((32, 32), (8, 0, 16, 8)), None, Image.fromarray(ell, "L")], streaming)
    images = {r: Image.new("RGB", (32, 32)) for r in range(3)}
    found = object_patch_masks(split, [0, 1, 2], images, view, (4, 4))
    assert found[1] is None
    assert found[0] is not None and torch.equal(found[0], box_patch_mask([(8, 0, 16, 8)], (32, 32), view, (4, 4)))
    expected = torch.zeros(16, dtype=torch.bool)
    expected[[0, 4, 5, 6]] = True
    assert found[2] is not None and torch.equal(found[2], expected)
    assert torch.equal(box_patch_mask([(0, 0, 24, 16)], (32, 32), view, (4, 4)).sum(), torch.tensor(6))  # the box: 6


@pytest.mark.parametrize("streaming", [False, True])
def test_a_bad_mask_names_dataset_column_and_row(tmp_path: Path, streaming: bool) -> None:
    split = _disk(tmp_path, [_rect((32, 32), (0, 0, 8, 8)), Image.new("L", (16, 16), 255)], streaming)
    images = {r: Image.new("RGB", (32, 32)) for r in range(2)}
    assert object_patch_masks(split, [0], images, _view(32), (4, 4))[0] is not None  # only the rows asked for
    with pytest.raises(CscopeError) as err:
        object_patch_masks(split, [0, 1], images, _view(32), (4, 4))
    message = err.value.message
    assert "'d'" in message and "'mask'" in message and "row 1" in message and "16x16 but its image 32x32" in message
    assert err.value.hint and "mask_file_name" in err.value.hint


def test_imagefolder_masks_from_metadata_file_names(tmp_path: Path) -> None:
    """An imagefolder names each mask in metadata.jsonl's `mask_file_name`; the column is `mask`."""
    (tmp_path / "train").mkdir()
    with open(tmp_path / "train" / "metadata.jsonl", "w") as meta:
        for i, box in enumerate([(0, 0, 8, 8), (24, 24, 32, 32)]):
            Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / "train" / f"{i}.png")
            _rect((32, 32), box).save(tmp_path / "train" / f"{i}_mask.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "mask_file_name": f"{i}_mask.png", "label": i}) + "\n")
    cfg = DatasetConfig(source="imagefolder", path=str(tmp_path), object_mask_column="mask", class_names=["a", "b"])
    split = open_split("shapes", cfg, "train", tmp_path)
    images = {r: Image.new("RGB", (32, 32)) for r in range(2)}
    found = object_patch_masks(split, [0, 1], images, _view(32), (4, 4))
    assert [torch.nonzero(found[r]).flatten().tolist() for r in (0, 1)] == [[0], [15]]  # type: ignore[arg-type]
    missing = DatasetConfig(source="imagefolder", path=str(tmp_path), object_mask_column="segmentation",
                            class_names=["a", "b"])
    with pytest.raises(CscopeError) as err:
        object_patch_masks(open_split("shapes", missing, "train", tmp_path), [0], images, _view(32), (4, 4))
    assert "'segmentation'" in err.value.message and err.value.hint and "mask" in err.value.hint
