"""Tests of the procedural example world (conceptscope_cli.example.world)."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptscope_cli.example import world as W

SMALL = W.WorldConfig(seed=3, n_train_per_class=8, n_test_per_class=5)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    W.generate_world(out, SMALL)
    return out


def test_same_seed_same_bytes_other_seed_differs(small_world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    W.generate_world(again, SMALL)
    a, b = _all_bytes(small_world), _all_bytes(again)
    assert a.keys() == b.keys()
    assert a == b
    other = tmp_path / "other"
    W.generate_world(other, W.WorldConfig(seed=4, n_train_per_class=8, n_test_per_class=5))
    c = _all_bytes(other)
    assert a.keys() == c.keys()
    differing = [k for k in a if k.endswith(".png") and a[k] != c[k]]
    assert len(differing) > 0.9 * sum(k.endswith(".png") for k in a)


def test_layout_and_metadata(small_world: Path) -> None:
    info = W.load_world_info(small_world)
    assert info["class_names"] == list(SMALL.classes)
    assert info["splits"] == {"train": 8 * len(SMALL.classes), "test": 5 * len(SMALL.classes)}
    assert info["planted_biases"] == [b.to_json() for b in SMALL.biases]
    assert W.WorldConfig.from_json(info["config"]) == SMALL
    for split in W.SPLITS:
        rows = W.load_metadata(small_world, split)
        pngs = sorted(p.name for p in (small_world / split).glob("*.png"))
        assert [r["file_name"] for r in rows] == pngs  # row order == sorted file order
        for r in rows:
            assert info["class_names"][r["label"]] == r["class_name"]
            for attr in W.ATTRIBUTES:
                assert r[attr] in info["vocabulary"][attr]
            assert r["caption"] == W.caption_for(
                r["class_name"], r["background"], r["object_color"], r["object_texture"], r["co_object"]
            )
            assert r["class_name"] in r["caption"] and r["background"] in r["caption"]
            assert ("with a small" in r["caption"]) == (r["co_object"] != "none")
        with Image.open(small_world / split / rows[0]["file_name"]) as im:
            assert im.size == (SMALL.image_size, SMALL.image_size) and im.mode == "RGB"
    gt = W.ground_truth(small_world, "test", "background", "grass")
    assert gt.dtype == bool and gt.shape == (5 * len(SMALL.classes),)
    assert np.array_equal(W.labels(small_world, "test"), [r["label"] for r in W.load_metadata(small_world, "test")])


def test_planted_rates_within_binomial_bounds() -> None:
    config = W.WorldConfig()  # default sizes; sampling only, no rendering
    rows = [s.__dict__ for s in W.sample_split(config, "train")]
    n = config.n_train_per_class
    assert config.biases, "the default train split must carry planted biases"
    for b in config.biases:
        observed = W.empirical_rates(rows, b.class_name, b.attribute, b.value)
        sigma = math.sqrt(b.rate * (1 - b.rate) / n)
        assert abs(observed - b.rate) <= 4 * sigma, (b, observed)
        assert observed >= 0.8
    # Unbiased (class, attribute) cells stay near uniform.
    biased = {(b.class_name, b.attribute) for b in config.biases}
    for cls in config.classes:
        for attr in W.ATTRIBUTES:
            if (cls, attr) in biased:
                continue
            vocab = config.values(attr)
            p = 1 / len(vocab)
            for v in vocab:
                observed = W.empirical_rates(rows, cls, attr, v)
                assert abs(observed - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (cls, attr, v, observed)


def test_test_split_balanced() -> None:
    config = W.WorldConfig()
    rows = W.sample_split(config, "test")
    per_class = Counter(s.class_name for s in rows)
    assert set(per_class.values()) == {config.n_test_per_class}
    for attr in W.ATTRIBUTES:
        vocab = config.values(attr)
        for cls in config.classes:
            counts = Counter(s.attribute(attr) for s in rows if s.class_name == cls)
            # Every value equally often within each class, up to rounding.
            assert set(counts) == set(vocab)
            assert max(counts.values()) - min(counts.values()) <= 1, (cls, attr, counts)
    # Pairs of attributes are not locked together (shuffled independently).
    pairs = Counter((s.background, s.co_object) for s in rows)
    assert len(pairs) == len(config.backgrounds) * len(config.co_objects)


def test_bias_rate_one_and_validation() -> None:
    config = W.WorldConfig(
        n_train_per_class=20, biases=(W.PlantedBias("square", "background", "brick", 1.0),)
    )
    rows = W.sample_split(config, "train")
    assert all(s.background == "brick" for s in rows if s.class_name == "square")
    with pytest.raises(ValueError):
        W.WorldConfig(biases=(W.PlantedBias("square", "background", "lava", 0.9),))
    with pytest.raises(ValueError):
        W.WorldConfig(classes=("circle", "dragon"))


def test_loads_with_datasets_imagefolder(small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(small_world), cache_dir=str(tmp_path / "hf"))
    assert set(ds.keys()) == {"train", "test"}
    for split in W.SPLITS:
        rows = W.load_metadata(small_world, split)
        d = ds[split]
        assert d.num_rows == len(rows)
        for col in ("label", "class_name", "background", "object_color", "object_texture", "co_object", "caption",
                    "object_box"):
            assert d[col] == [r[col] for r in rows], col
        for i in (0, len(rows) - 1):
            expected = np.asarray(Image.open(small_world / split / rows[i]["file_name"]).convert("RGB"))
            assert np.array_equal(np.asarray(d[i]["image"].convert("RGB")), expected)


def test_regenerate_smaller_removes_stale_files(tmp_path: Path) -> None:
    W.generate_world(tmp_path, W.WorldConfig(seed=1, n_train_per_class=3, n_test_per_class=2))
    W.generate_world(tmp_path, W.WorldConfig(seed=1, n_train_per_class=2, n_test_per_class=1))
    n = len(W.DEFAULT_CLASSES)
    assert len(list((tmp_path / "train").glob("*.png"))) == 2 * n
    assert len(list((tmp_path / "test").glob("*.png"))) == n
    assert os.path.isfile(tmp_path / "world.json")


def test_render_layers_locate_object_and_co_object() -> None:
    """The part masks match the pixels: the object's pixels are the object colour or its outline,
    the co-object's are the star colour, and render() draws the same image."""
    sample = W.Sample(0, "square", "grass", "red", "solid", "star")
    a = W.render_layers(sample, 64, np.random.default_rng(3))
    b = W.render(sample, 64, np.random.default_rng(3))
    assert np.array_equal(np.asarray(a.image), np.asarray(b))
    pixels = np.asarray(a.image).astype(int)
    inner = (a.object_mask == 1.0) & (np.abs(pixels - W.COLORS["red"]).sum(-1) < 10)
    assert inner.sum() > 0.15 * 64 * 64  # a large solid red square
    star = a.co_object_mask > 0.99
    assert 10 < star.sum() < 0.1 * 64 * 64
    assert (a.object_mask[star] == 0).all()
    # cyan fill or its dark teal edge: no red, green == blue
    teal = pixels[star]
    assert (teal[:, 0] <= 25).all() and (np.abs(teal[:, 1] - teal[:, 2]) <= 2).all() and (teal[:, 1] >= 80).all()
    assert (a.object_mask + a.co_object_mask <= 1.0 + 1e-6).all()


def test_object_box_is_the_tightest_box_around_the_object_mask(small_world: Path) -> None:
    """Every row's object_box holds every pixel its object's mask covers and is the tightest such box;
    the co-object is not part of it (some of its pixels lie outside). The reader of
    `object_box_column` gets the same boxes from the folder."""
    from conceptscope_cli.config.sections import DatasetConfig
    from conceptscope_cli.data.boxes import object_boxes
    from conceptscope_cli.data.datasets import open_split

    for split in W.SPLITS:
        rows = W.load_metadata(small_world, split)
        layers = W.render_split_layers(SMALL, split)
        with_co_object = 0
        for row, obj, co in zip(rows, layers.object_masks, layers.co_object_masks):
            x0, y0, x1, y1 = row["object_box"]
            covered = obj > 0
            inside = np.zeros_like(covered)
            inside[y0:y1, x0:x1] = True
            assert covered[inside].any() and not covered[~inside].any()  # holds the whole mask
            # tightest: every edge row / column of the box has a mask pixel
            assert covered[y0].any() and covered[y1 - 1].any() and covered[:, x0].any() and covered[:, x1 - 1].any()
            if row["co_object"] != "none":
                with_co_object += 1
                assert ((co > 0.5) & ~inside).any()
        assert with_co_object > 0
        cfg = DatasetConfig(source="imagefolder", path=str(small_world), splits=list(W.SPLITS),
                            class_names=list(SMALL.classes), object_box_column="object_box")
        boxes = object_boxes(open_split("world", cfg, split, small_world), range(len(rows)))
        assert boxes == {i: [tuple(float(v) for v in r["object_box"])] for i, r in enumerate(rows)}
