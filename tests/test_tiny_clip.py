"""Tests of the shipped tiny CLIP (conceptscope_cli.example.tiny_clip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from conceptscope_cli.example import tiny_clip as T
from conceptscope_cli.example import world as W

# A fresh balanced test split, with a seed the model never saw (it was trained on seed 1000).
EVAL_WORLD = W.WorldConfig(seed=7, n_train_per_class=1, n_test_per_class=40)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, object, object]:
    path = T.ensure_tiny_clip(tmp_path_factory.mktemp("cache"))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    model.eval()
    return path, model, preprocess, tokenizer


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_world")
    W.generate_world(out, EVAL_WORLD)
    return out


def test_shipped_asset_is_small_and_unpacks_to_local_dir(loaded: tuple, tmp_path: Path) -> None:
    path, model, _, tokenizer = loaded
    archive = T.ASSET_DIR / T.ARCHIVE_NAME
    assert archive.stat().st_size <= 6 * 1024 * 1024
    assert (path / T.CONFIG_FILE).is_file() and (path / T.WEIGHTS_FILE).is_file()
    cfg = json.loads((path / T.CONFIG_FILE).read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == 64
    assert cfg["preprocess_cfg"]["size"] == 64
    # Idempotent: a second call reuses the same folder.
    assert T.ensure_tiny_clip(path.parent) == path
    assert T.tiny_clip_dir(path.parent) == path
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert isinstance(model, open_clip.model.CLIP)
    # Weights really came from the file (not a random init): unused token rows are zero.
    emb = model.token_embedding.weight
    assert (emb.abs().sum(dim=1) == 0).sum() > 0.9 * emb.shape[0]


def test_preprocess_matches_training_normalisation(loaded: tuple, eval_world: Path) -> None:
    _, _, preprocess, _ = loaded
    images, rows = W.load_split_arrays(eval_world, "test")
    from PIL import Image

    via_open_clip = preprocess(Image.fromarray(images[0]))
    via_training = T.images_to_tensor(images[:1])[0]
    assert torch.allclose(via_open_clip, via_training, atol=1e-5)


def test_zero_shot_accuracy_on_fresh_balanced_split(loaded: tuple, eval_world: Path) -> None:
    _, model, preprocess, tokenizer = loaded
    acc = T.zero_shot_accuracy(model, preprocess, tokenizer, eval_world, "test")
    assert acc >= 0.85, acc


def test_background_and_co_object_auroc(loaded: tuple, eval_world: Path) -> None:
    _, model, preprocess, tokenizer = loaded
    aurocs = T.attribute_aurocs(model, preprocess, tokenizer, eval_world, "test", attributes=("background", "co_object"))
    assert aurocs["background"]["water"] >= 0.9, aurocs
    assert aurocs["co_object"]["star"] >= 0.9, aurocs
    assert min(aurocs["background"].values()) >= 0.9, aurocs


def test_auroc_helper() -> None:
    assert T.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == pytest.approx(0.75)
    assert T.auroc(np.array([1.0, 1.0]), np.array([1, 0], bool)) == pytest.approx(0.5)
    assert np.isnan(T.auroc(np.array([1.0, 2.0]), np.array([1, 1], bool)))


def test_multi_positive_loss_prefers_correct_pairs() -> None:
    emb = torch.nn.functional.normalize(torch.eye(3), dim=-1)
    pos = torch.eye(3, dtype=torch.bool)
    good = T.multi_positive_clip_loss(emb, emb, pos, torch.tensor(10.0))
    bad = T.multi_positive_clip_loss(emb, emb.roll(1, 0), pos, torch.tensor(10.0))
    assert good < bad


def test_shipped_model_is_calibrated_on_masked_images(loaded: tuple, eval_world: Path) -> None:
    """What categorize's alignment scores need: on ground-truth parts of unseen images, keeping
    only the object keeps the class similarity, removing it lowers it, and no cosine is negative."""
    _, model, _, tokenizer = loaded
    cal = T.mask_calibration(model, tokenizer, eval_world, "test", limit=100)
    assert cal["negative_fraction"] <= 0.01, cal
    assert cal["object_sufficiency"] > 0.7 and cal["object_sufficiency"] > cal["background_sufficiency"] + 0.2, cal
    # Removing the object halves the class similarity at least. (Removing the background does
    # too: on an 8x8 patch grid its mask also covers the object's outline.)
    assert cal["object_necessity"] > 2.0 and cal["sim_object_removed"] < 0.5 * cal["sim_image"], cal


def test_mask_augment_hides_what_the_mask_removes() -> None:
    """One image, object in the left half: removing the object's patches makes class, colour and
    texture ABSENT; keeping only them makes the background ABSENT and hides the co-object."""
    info_keys = T._KEYS
    h = w = 16
    pixels = torch.rand(1, 3, h, w)
    obj = torch.zeros(1, h, w)
    obj[:, :, :8] = 1.0
    co = torch.zeros(1, h, w)
    co[:, 12:, 12:] = 1.0
    obj[:, 12:, 12:] = 0.0
    codes = torch.tensor([[2, 1, 3, 0, 1]])  # class, background, colour, texture, co_object (1 = star)
    assert len(info_keys) == codes.shape[1]
    none_code = 0
    seen = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        out, new = T.mask_augment(pixels, obj, co, codes, none_code, rng, patch_size=4, prob=1.0)
        assert out.shape == pixels.shape and (out <= pixels + 1e-6).all()
        row = dict(zip(info_keys, new[0].tolist()))
        if torch.equal(out, pixels):
            continue
        seen.add((row["class_name"] == T.ABSENT, row["background"] == T.ABSENT, row["co_object"] == none_code))
        # The codes follow the visible part of the object: its mean surviving pixel weight.
        kept_obj = (out[0, :, obj[0] > 0] / pixels[0, :, obj[0] > 0]).mean()
        if row["class_name"] == T.ABSENT:
            assert kept_obj < 0.6 and row["object_color"] == row["object_texture"] == T.ABSENT
        else:
            assert row["class_name"] == 2 and kept_obj > 0.2
    assert len(seen) >= 3, seen  # several kinds of masks happened
    rng = np.random.default_rng(0)
    out, new = T.mask_augment(pixels, obj, co, codes, none_code, rng, patch_size=4, prob=0.0)
    assert torch.equal(out, pixels) and torch.equal(new, codes)


def test_cone_penalty_is_zero_above_the_floor() -> None:
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [1.0, -0.2]]), dim=-1)
    assert T.cone_penalty(a, a, 0.05) == 0.0
    b = torch.tensor([[-1.0, 0.0]])
    # cos = -1 with both rows of a (up to their norm): relu(0.05 + 0.98)^2 each
    expected = ((0.05 + a[:, 0]) ** 2).mean()
    assert T.cone_penalty(a, b, 0.05) == pytest.approx(float(expected), rel=1e-5)


def test_sample_caption_states_only_visible_attributes() -> None:
    rng = np.random.default_rng(0)
    row = {"background": "water", "co_object": "star"}
    for _ in range(50):
        text, stated = T.sample_caption(row, rng)
        assert set(stated) <= set(row) and all(stated[k] == row[k] for k in stated)
        assert "circle" not in text


def test_patch_positives_name_what_covers_each_patch() -> None:
    """Object patches: the class, colour and texture prompts; background patches: the background
    prompt; co-object patches: the co-object prompt; a mixed patch: none (hand-built case)."""
    config = W.WorldConfig()
    vocab = {"class_name": list(config.classes), **{a: list(config.values(a)) for a in W.ATTRIBUTES}}
    info = {"class_names": list(config.classes), "vocabulary": vocab}
    fixed = T.fixed_prompts(info)
    fixed_codes = torch.from_numpy(T._constraint_codes([c for _, c in fixed], info))
    row = {"class_name": "circle", "background": "water", "object_color": "red", "object_texture": "solid",
           "co_object": "star"}
    codes = torch.from_numpy(T._codes([row], info))
    object_cover = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    co_cover = torch.tensor([[0.0, 0.0, 0.9, 0.0]])
    pos = T.patch_positives(object_cover, co_cover, codes, fixed_codes)[0]
    texts = [t for t, _ in fixed]
    named = [sorted(texts[j] for j in np.flatnonzero(pos[p].numpy())) for p in range(4)]
    assert named[0] == sorted(["a photo of a circle.", "a photo of something red.", "a photo of something solid."])
    assert named[1] == ["a photo of water."]
    assert named[2] == ["a photo of a small star."]
    assert named[3] == []


def test_patch_loss_prefers_patches_that_match_their_prompts() -> None:
    text = torch.nn.functional.normalize(torch.eye(3), dim=-1)
    positives = torch.tensor([[[True, False, False], [False, True, False], [False, False, False]]])
    right = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 1.0]]]), dim=-1)
    wrong = right[:, [1, 0, 2]]
    scale = torch.tensor(10.0)
    assert T.patch_loss(right, text, positives, scale) < T.patch_loss(wrong, text, positives, scale)
    # the unlabelled third patch does not count
    moved = right.clone()
    moved[0, 2] = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 1.0]), dim=-1)
    assert T.patch_loss(moved, text, positives, scale) == pytest.approx(float(T.patch_loss(right, text, positives, scale)))
