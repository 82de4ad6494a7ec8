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
