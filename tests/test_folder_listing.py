"""The image-folder listing gives exactly `datasets`' imagefolder rows, with memory flat in N.

`datasets.load_dataset("imagefolder", ...)` is called directly here as the reference: every
cache entry keyed by row_index depends on the two agreeing row for row."""

from __future__ import annotations

import json
import os
import tracemalloc
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

from conceptscope_cli.cache.store import CacheStore
from conceptscope_cli.config.sections import DatasetConfig
from conceptscope_cli.data import datasets as D
from conceptscope_cli.data import folder_listing as L
from conceptscope_cli.errors import CscopeError

PNG = bytes.fromhex(  # a valid 1x1 PNG: the listing never decodes, datasets' reference neither
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc000"
    "0003010100c9fe92ef0000000049454e44ae426082")


def _touch(root: Path, *paths: str, data: bytes = PNG) -> None:
    for relative in paths:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _zip(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("inner.png", PNG)


def _undecoded(rows: Any) -> Any:
    import datasets

    for column, feature in rows.features.items():
        if isinstance(feature, datasets.Image):
            rows = rows.cast_column(column, datasets.Image(decode=False))
    return rows


def _reference(folder: Path, split: str, data_files: list[str] | None = None) -> Any:
    import datasets

    datasets.disable_progress_bars()
    if data_files is not None:
        return datasets.load_dataset("imagefolder", data_files={split: data_files}, split=split)
    return datasets.load_dataset("imagefolder", data_dir=str(folder), split=split)


def _listed(folder: Path, split: str, tmp: Path, *, listed: bool = False) -> Any:
    import datasets

    out = tmp / f"{split}-{len(list(tmp.glob('*.arrow')))}.arrow"
    L.write_rows(folder.resolve(), split, listed, out)
    return datasets.Dataset.from_file(str(out))


def _assert_same(folder: Path, split: str, tmp: Path) -> Any:
    ref, mine = _reference(folder.resolve(), split), _listed(folder, split, tmp)
    assert mine.features == ref.features
    assert len(mine) == len(ref) and _undecoded(mine)[:] == _undecoded(ref)[:]
    return mine


def _split_folders(root: Path) -> None:
    _touch(root, *(f"{s}/{c}/{i}.png" for s in ("train", "test") for c in ("cat", "dog", "émile") for i in (2, 10, 1)))
    _touch(root, "train/cat/x.JPG", "train/dog/y.jpeg", "train/cat/a.png.gz", data=PNG)
    _touch(root, "train/notes.txt", "train/cat/.hidden.png", "train/.cache/z.png", "train/__pycache__/q.png",
           "README.md", data=b"x")


def _flat_unlabelled(root: Path) -> None:
    _touch(root, *(f"{i:03d}.png" for i in range(7)), "sub/a.png")  # two depths: no label


def _nested_classes(root: Path) -> None:
    _touch(root, "a/x/1.png", "a/y/2.png", "b/z/3.png", "b/x/4.png")  # parents x, y, z at one depth


def _backslash_name(root: Path) -> None:
    _touch(root, "x/1.png", "y/2.png", "y/a\\b.png")  # datasets counts "\\" as a separator: two depths


def _keyword_names(root: Path) -> None:
    # split names in file names: the second pattern group (files, not folders)
    # ("test-0" and "my_test_1" match two patterns of "test": concatenated in pattern order)
    _touch(root, "train_0.png", "train_1.png", "test-0.png", "my_test_1.png", "other.png", "val.0.png", "a-test.png")


def _keywords_not_splits(root: Path) -> None:
    # "contest", "latest", "trainer" hold keywords but match no split pattern: one "train" split
    _touch(root, "contest/1.png", "latest/2.png", "trainer/3.png", "contest/devices.png")


def _metadata_jsonl(root: Path) -> None:
    for split in ("train", "validation"):
        _touch(root, *(f"{split}/{i:06d}.png" for i in range(5)))
        lines = [{"file_name": f"{i:06d}.png", "label": ["b", "a"][i % 2], "size": i * 0.5,
                  "boxes": [[i, 1, 2, 3]], "note": None if i == 2 else f"n{i}"} for i in (3, 0, 4, 1, 2)]
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _metadata_csv_flat(root: Path) -> None:
    _touch(root, "cls1/a.png", "cls2/b.png", "cls2/c.png")
    (root / "metadata.csv").write_text("file_name,label,weight\ncls2/c.png,2,0.5\ncls1/a.png,1,\n"
                                       "cls2/b.png,2,1.5\nmissing.png,3,2.0\n")


def _mask_lines(order: tuple[str, ...]) -> str:
    """metadata.jsonl lines naming an image and its mask, columns in `order`; row 2 has no mask."""
    lines = []
    for i in (1, 0, 2):
        values = {"file_name": f"img/{i}.png", "mask_file_name": None if i == 2 else f"masks/{i}.png",
                  "label": ["a", "b"][i % 2]}
        lines.append(json.dumps({k: values[k] for k in order}) + "\n")
    return "".join(lines)


def _metadata_masks(root: Path) -> None:
    _touch(root, *(f"train/{d}/{i}.png" for d in ("img", "masks") for i in range(3)))
    (root / "train" / "metadata.jsonl").write_text(_mask_lines(("file_name", "label", "mask_file_name")))


LAYOUTS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "split_folders": (_split_folders, ["train", "test"]),
    "flat_unlabelled": (_flat_unlabelled, ["train"]),
    "nested_classes": (_nested_classes, ["train"]),
    "backslash_name": (_backslash_name, ["train"]),
    "keyword_names": (_keyword_names, ["train", "test", "validation"]),
    "keywords_not_splits": (_keywords_not_splits, ["train"]),
    "metadata_jsonl": (_metadata_jsonl, ["train", "validation"]),
    "metadata_csv_flat": (_metadata_csv_flat, ["train"]),
    "metadata_masks": (_metadata_masks, ["train"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rows_are_datasets_imagefolder_rows(layout: str, tmp_path: Path) -> None:
    make, splits = LAYOUTS[layout]
    make(tmp_path / "data")
    for split in splits:
        _assert_same(tmp_path / "data", split, tmp_path)


def test_the_layouts_cover_labels_metadata_and_filtering(tmp_path: Path) -> None:
    """The comparison above is only as good as its layouts: they produce labels, metadata columns,
    skipped hidden / "__" / non-image files and more than one split pattern group."""
    _split_folders(tmp_path / "a")
    rows = _undecoded(_listed(tmp_path / "a", "train", tmp_path))
    assert rows.features["label"].names == ["cat", "dog", "émile"] and len(rows) == 12  # 9 + JPG, jpeg, .png.gz
    paths = [v["path"] for v in rows["image"]]
    assert paths == sorted(paths) and not any("hidden" in p or "cache" in p or ".txt" in p for p in paths)
    _metadata_jsonl(tmp_path / "m")
    rows = _undecoded(_listed(tmp_path / "m", "train", tmp_path))
    assert list(rows.features) == ["image", "label", "size", "boxes", "note"]
    assert [Path(v["path"]).name for v in rows["image"]] == [f"{i:06d}.png" for i in (3, 0, 4, 1, 2)]
    _keyword_names(tmp_path / "k")
    paths = [Path(v["path"]).name for v in _undecoded(_listed(tmp_path / "k", "test", tmp_path))["image"]]
    assert paths == ["test-0.png", "a-test.png", "my_test_1.png"]


@pytest.mark.parametrize("order", [("file_name", "mask_file_name", "label"), ("mask_file_name", "file_name", "label"),
                                   ("label", "mask_file_name", "file_name")])
def test_mask_columns_become_image_columns_in_any_column_order(order: tuple[str, ...], tmp_path: Path) -> None:
    """Every `<name>_file_name` column is read by its own name, wherever it stands, and an empty
    one is no image. `datasets` 5.x gets both wrong (shown here, so the departure is on record):
    a mask column before file_name takes the image's path and leaves `image` None, and an empty
    mask name becomes the folder's path."""
    root = tmp_path / "data"
    _touch(root, *(f"train/{d}/{i}.png" for d in ("img", "masks") for i in range(3)))
    lines = _mask_lines(order).replace('"mask_file_name": null', '"mask_file_name": ""')
    (root / "train" / "metadata.jsonl").write_text(lines)
    folder = (root / "train").resolve()
    rows = _undecoded(_listed(root, "train", tmp_path))
    assert list(rows.features) == [{"file_name": "image", "mask_file_name": "mask"}.get(k, k) for k in order]
    assert [v["path"] for v in rows["image"]] == [str(folder / f"img/{i}.png") for i in (1, 0, 2)]
    assert [v and v["path"] for v in rows["mask"]] == [str(folder / "masks/1.png"), str(folder / "masks/0.png"), None]
    assert rows["label"] == ["b", "a", "a"]
    ref = _undecoded(_reference(root.resolve(), "train"))
    if order.index("mask_file_name") < order.index("file_name"):
        assert ref["image"] == [None] * 3 and [v["path"] for v in ref["mask"][:2]] == [
            str(folder / f"img/{i}.png") for i in (1, 0)]
    else:
        assert ref["image"] == rows["image"] and ref["mask"][2]["path"] == os.path.join(folder, ".")


@pytest.mark.parametrize("streaming", [False, True])
def test_datasets_fallback_refuses_image_columns_it_shifts(streaming: bool, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where `datasets` opens the folder itself (streaming, or a layout the listing leaves to it),
    a mask column before file_name is refused with the fix; after file_name it opens."""
    root = tmp_path / "data"
    _touch(root, *(f"train/{d}/{i}.png" for d in ("img", "masks") for i in range(3)))
    metadata = root / "train" / "metadata.jsonl"
    metadata.write_text(_mask_lines(("mask_file_name", "file_name", "label")))

    def unsupported(*args: Any, **kwargs: Any) -> Any:
        raise L.UnsupportedLayoutError("a layout left to datasets (this test)")

    monkeypatch.setattr(L, "open_rows", unsupported)
    monkeypatch.setattr(D, "_OPENED", {})
    monkeypatch.setattr(D, "LISTING_FALLBACKS", {})
    cfg = DatasetConfig(source="imagefolder", path=str(root), splits=["train"], label_column="label",
                        class_names=["a", "b"], streaming=streaming)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(CscopeError, match="'mask_file_name' comes before file_name") as caught:
            D.open_split("d", cfg, "train", tmp_path)
        assert "make file_name the first column" in str(caught.value.hint)
        metadata.write_text(_mask_lines(("file_name", "mask_file_name", "label")))
        monkeypatch.setattr(D, "_OPENED", {})
        handle = D.open_split("d", cfg, "train", tmp_path)
    first = next(iter(handle.rows))
    # image undecoded (open_split casts it), the mask as datasets decodes it
    assert first["image"]["path"].endswith("img/1.png") and first["mask"].filename.endswith("masks/1.png")


def test_names_that_are_not_utf8_are_listed_like_the_explicit_file_list(tmp_path: Path) -> None:
    """Such a folder's split is handed to datasets file by file; hidden files then count (the
    current loader's behaviour, kept), the undecodable file is left out and named."""
    root = tmp_path / "data"
    _touch(root, "train/a/1.png", "train/b/2.png", "train/b/.h.png", "test/a/3.png")
    (root / "train" / "a").joinpath(os.fsdecode(b"bad\xff.png")).write_bytes(PNG)
    folder = root.resolve()
    assert L.undecodable_files(folder) == ["train/a/bad\\xff.png"]
    good = [str(folder / r) for r in ("train/a/1.png", "train/b/.h.png", "train/b/2.png")]
    ref, mine = _reference(folder, "train", good), _listed(root, "train", tmp_path, listed=True)
    assert mine.features == ref.features and _undecoded(mine)[:] == _undecoded(ref)[:] and len(mine) == 3


@pytest.mark.parametrize("make", [
    lambda r: _touch(r, "train/a/1.png", "train/b/2.png", "test/3.png"),  # splits disagree on class folders
    lambda r: (_touch(r, "x/1.png"), (r / "link").symlink_to(r / "x")),  # datasets walks into links
    lambda r: (_touch(r, "train/1.png"), _zip(r / "train" / "more.zip")),  # archives are extracted by datasets
    lambda r: _touch(r, "data/train-00000-of-00001.png"),  # sharded names
    lambda r: (_touch(r, "train/1.png", "test/2.png"), (r / "train" / "metadata.jsonl").write_text(
        '{"file_name": "1.png"}\n')),  # metadata in one split only
])
def test_layouts_it_does_not_reproduce_fall_back_to_datasets(make: Callable[[Path], Any], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(L.UnsupportedLayoutError):
        L.write_rows(root.resolve(), "train", False, tmp_path / "x.arrow")
    monkeypatch.setattr(D, "LISTING_FALLBACKS", {})
    with pytest.warns(UserWarning, match="opened with datasets' imagefolder loader"):
        handle = D.open_split("d", DatasetConfig(source="imagefolder", path=str(root), splits=["train"],
                                                 label_column=""), "train", tmp_path)
    ref = _reference(root.resolve(), "train")
    assert D.LISTING_FALLBACKS and _undecoded(handle.rows)[:] == _undecoded(ref)[:]


def _entries(cache: CacheStore) -> list[Any]:
    return [e for e in cache.entries() if e.kind == L.KIND]


def test_listing_is_cached_reused_and_relisted_when_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CacheStore(tmp_path / "cache")
    writes: list[str] = []
    write_rows = L.write_rows
    monkeypatch.setattr(L, "write_rows", lambda *a: writes.append(a[1]) or write_rows(*a))
    monkeypatch.setattr(D, "_OPENED", {})
    _split_folders(tmp_path / "p" / "data")
    cfg = DatasetConfig(source="imagefolder", path="data", splits=["train", "test"])
    first = D.open_split("d", cfg, "train", tmp_path / "p", cache)
    assert writes == ["train"] and len(_entries(cache)) == 1
    monkeypatch.setattr(D, "_OPENED", {})  # a new process: the entry is read, the folder not listed
    again = D.open_split("d", cfg, "train", tmp_path / "p", cache)
    assert writes == ["train"] and again.rows[:] == first.rows[:] and again.class_names == ["cat", "dog", "émile"]
    os.rename(tmp_path / "p", tmp_path / "q")  # the rows hold absolute paths: listed again there
    monkeypatch.setattr(D, "_OPENED", {})
    moved = D.open_split("d", cfg, "train", tmp_path / "q", cache)
    assert writes == ["train", "train"] and len(_entries(cache)) == 2
    ref = _undecoded(_reference((tmp_path / "q" / "data").resolve(), "train"))
    assert moved.rows[:] == ref[:] and moved.fingerprint == first.fingerprint


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_record"])
def test_a_damaged_or_incomplete_listing_is_never_used(damage: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CacheStore(tmp_path / "cache")
    _metadata_jsonl(tmp_path / "data")
    cfg = DatasetConfig(source="imagefolder", path="data", splits=["train", "validation"], label_column="")
    monkeypatch.setattr(D, "_OPENED", {})
    good = D.open_split("d", cfg, "train", tmp_path, cache).rows[:]
    (entry,) = _entries(cache)
    rows_file = entry.path / L.ROWS_FILE
    data = bytearray(rows_file.read_bytes())
    if damage == "truncate":
        rows_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        index = data.index(b"000003.png")  # one byte of a path: the file still reads as Arrow
        data[index] = ord("9")
        rows_file.write_bytes(bytes(data))
    else:  # an interrupted build: the partial folder only, no record, half its rows
        rows_file.write_bytes(data[: len(data) // 2])
        os.rename(entry.path, entry.path.with_name(entry.key + ".partial"))
        (entry.path.with_name(entry.key + ".partial") / "record.json").unlink()
    monkeypatch.setattr(D, "_OPENED", {})
    reopened = D.open_split("d", cfg, "train", tmp_path, cache)
    assert reopened.rows[:] == good and [Path(v["path"]).name for v in reopened.rows["image"]][0] == "000003.png"
    (entry,) = _entries(cache)
    assert L._valid(entry.path, entry.record)


def _peak_of_listing(root: Path, per_folder: int, out: Path) -> int:
    _touch(root, *(f"train/c{k:02d}/{i:04d}.png" for k in range(20) for i in range(per_folder)), data=b"")
    tracemalloc.start()
    try:
        L.write_rows(root.resolve(), "train", False, out)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_listing_memory_is_flat_in_the_number_of_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's peak while listing 400 and 3,200 files (20 class folders) differs by about one
    folder's names (140 more in each, ~40 KB measured: the walk holds one folder's names twice),
    not by a list of every path (~400 KB; every row's dict, the broken version, ~1 MB)."""
    import datasets

    monkeypatch.setattr(L, "_WRITER_BATCH", 50)  # both sizes span many record batches
    _peak_of_listing(tmp_path / "w", 5, tmp_path / "w.arrow")  # warm-up: imports, compiled patterns
    small = _peak_of_listing(tmp_path / "s", 20, tmp_path / "s.arrow")
    large = _peak_of_listing(tmp_path / "l", 160, tmp_path / "l.arrow")
    assert len(datasets.Dataset.from_file(str(tmp_path / "l.arrow"))) == 3200
    assert large - small < 100_000, (small, large)
