"""Reference masks sit on the crop the model saw; the clip namer names the example's concepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conceptscope_cli.backbone.views import model_view
from conceptscope_cli.dictionary.reference import masked_tile


def test_mask_is_aligned_with_the_model_crop() -> None:
    # A wide 64x48 image: open_clip-style preprocessing resizes the short side to 32 and
    # centre-crops 32x32, which cuts 5 px off each side. A bright square sits at x 29..36 of
    # the original, i.e. x 24..31 of the crop after the resize by 2/3 -> patch column 3 (8-px
    # patches), row 1 (y 12..19 -> 8..12 of the crop).
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[12:19, 41:53] = 255  # x 41..52 -> resized 27.3..35 -> crop 22.3..30 (column 2-3)
    image = Image.fromarray(pixels)
    preprocess = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                            T.Normalize((0.5,) * 3, (0.25,) * 3)])
    view = model_view(preprocess)
    crop = view.pixels(image)  # (3, 32, 32)
    bright = crop.mean(0) > 0.5
    ys, xs = np.nonzero(bright.numpy())
    cell = (int(np.median(ys)) // 8, int(np.median(xs)) // 8)
    # A latent built to fire exactly on the patch holding the square.
    patch_map = np.zeros((4, 4), dtype=np.float32)
    patch_map[cell] = 1.0
    tile = np.asarray(masked_tile([image], patch_map[None], view))
    assert tile.shape == (32, 32, 3)
    # The tile is exactly the crop times the upsampled, normalised map ...
    from conceptscope_cli.masks import patch_map_to_mask

    mask = patch_map_to_mask(torch.as_tensor(patch_map), (32, 32))
    expected = (crop * mask[None]).permute(1, 2, 0).numpy() * 255
    assert np.abs(tile.astype(float) - expected).max() <= 1.0
    # ... whose weight is centred on the firing patch, where the bright square is kept.
    weights = mask.numpy()
    cy = (weights * np.arange(32)[:, None]).sum() / weights.sum()
    cx = (weights * np.arange(32)[None, :]).sum() / weights.sum()
    assert abs(cy - (cell[0] * 8 + 3.5)) < 1 and abs(cx - (cell[1] * 8 + 3.5)) < 1
    centre = (slice(cell[0] * 8 + 2, cell[0] * 8 + 6), slice(cell[1] * 8 + 2, cell[1] * 8 + 6))
    assert weights[centre].min() > 0.7 and bright.numpy()[centre].any()
    # The mask is drawn on the crop, not on a stretched resize of the whole image.
    stretched = np.asarray(image.resize((32, 32))).mean(2) > 128
    assert not np.array_equal(stretched, bright.numpy())


@pytest.mark.slow
def test_clip_namer_names_example_concepts(tmp_path: Path) -> None:
    """Latents built to fire on one attribute's images get that attribute's word."""
    from conceptscope_cli.backbone.loader import load_backbone
    from conceptscope_cli.dictionary.clip_namer import embed_images, name_latents_clip, read_vocabulary_text
    from conceptscope_cli.example.tiny_clip import resolve_example_model
    from conceptscope_cli.example.world import WorldConfig, generate_world, load_metadata
    from conceptscope_cli.pipeline.init import write_example_vocabulary

    world = tmp_path / "world"
    info = generate_world(world, WorldConfig(seed=3, n_train_per_class=8, n_test_per_class=20))
    write_example_vocabulary(tmp_path / "vocab.txt", info)
    vocabulary = read_vocabulary_text((tmp_path / "vocab.txt").read_text())
    backbone = load_backbone(resolve_example_model("example:tiny-clip", tmp_path / "cache"),
                             torch.device("cpu"))
    rows = load_metadata(world, "test")
    images = [Image.open(world / "test" / r["file_name"]).convert("RGB") for r in rows]
    embeddings = embed_images(backbone.model, backbone.preprocess, images, backbone.device)
    expected = {
        0: ("background", "water", "water"), 1: ("background", "brick", "brick"),
        2: ("object_color", "red", "something red"), 3: ("co_object", "heart", "a small heart"),
        4: ("class_name", "triangle", "a triangle"),
    }
    latent_rows = {k: [i for i, r in enumerate(rows) if r[attr] == value][:20] for k, (attr, value, _) in expected.items()}
    text = backbone.encode_text([f"a photo of {w}." for w in vocabulary]).cpu()
    empty = backbone.encode_text([""]).cpu()[0]
    names = name_latents_clip(latent_rows, {i: embeddings[i] for i in range(len(rows))}, vocabulary, text, empty)
    assert {k: n.name for k, n in names.items()} == {k: v[2] for k, v in expected.items()}
    assert all(n.clarity > 0 for n in names.values())
