"""The one loader (issue 19 item 2): preprocessing from the config alone equals the full load's,
and a session opens only what is used (a report's heatmaps from the token cache read no CLIP weights)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptscope_cli.backbone import loader
from conceptscope_cli.backbone.local import save_local_dir
from conceptscope_cli.backbone.resolve import ResolvedModel
from conceptscope_cli.backbone.views import model_view
from helpers import TINY_MODEL_CFG, make_tiny_project

# Every knob of open_clip's eval transform away from its defaults.
ODD_PREPROCESS = {"size": 32, "mean": [0.2, 0.3, 0.4], "std": [0.5, 0.25, 0.125], "interpolation": "bilinear",
                  "resize_mode": "squash"}


def _image(seed: int = 0) -> Image.Image:
    """A non-square image, so resize and crop modes differ."""
    pixels = np.random.default_rng(seed).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _same_transform(a: loader.Preprocessing, b: loader.Preprocessing) -> None:
    assert a.grid_size == b.grid_size
    for seed in range(3):
        assert torch.equal(a.preprocess(_image(seed)), b.preprocess(_image(seed)))
    va, vb = model_view(a.preprocess), model_view(b.preprocess)
    assert torch.equal(va.mean, vb.mean) and torch.equal(va.std, vb.std)
    assert torch.equal(va.pixels(_image()), vb.pixels(_image()))


@pytest.mark.parametrize("preprocess_cfg", [{"size": 32}, ODD_PREPROCESS, {}])
def test_preprocessing_from_a_local_dir_config_equals_the_full_load(tmp_path: Path, preprocess_cfg: dict) -> None:
    cfg = copy.deepcopy(TINY_MODEL_CFG)
    cfg["vision_cfg"].update(image_size=[32, 48], patch_size=[8, 16])  # a non-square grid: (4, 3)
    import open_clip

    folder = save_local_dir(open_clip.CLIP(**cfg), cfg, tmp_path / "m", preprocess_cfg)
    resolved = ResolvedModel(f"local-dir:{folder}", None, "x", "test")
    full = loader.load_backbone(resolved, torch.device("cpu"))
    light = loader.load_preprocessing(resolved)
    _same_transform(loader.Preprocessing(full.preprocess, full.grid_size), light)
    assert light.grid_size == (4, 3)


def test_preprocessing_of_a_pretrained_tag_follows_the_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    """A built-in name with a tag whose preprocessing is not open_clip's default (CLIPA: squash,
    bilinear, ImageNet mean): the light path reads the tag like `create_model` does. The built-in
    config is swapped for a tiny ViT, and the weight download for nothing, so no network is used."""
    import open_clip
    from open_clip import factory

    tiny = copy.deepcopy(TINY_MODEL_CFG)
    monkeypatch.setattr(factory, "get_model_config", lambda name: copy.deepcopy(tiny))
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: copy.deepcopy(tiny))
    monkeypatch.setattr(factory, "download_pretrained", lambda *a, **k: "")
    _, _, full = open_clip.create_model_and_transforms("ViT-L-14-CLIPA", pretrained="datacomp1b", load_weights=False)
    light = loader.load_preprocessing(ResolvedModel("ViT-L-14-CLIPA", "datacomp1b", "x", "test"))
    _same_transform(loader.Preprocessing(full, (4, 4)), light)
    assert model_view(light.preprocess).mean.tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_a_session_reads_preprocessing_without_the_model(tmp_path: Path, tiny_model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from conceptscope_cli.context import run_context
    from conceptscope_cli.project import Project
    from conceptscope_cli.session import ModelSession

    project = Project.open(make_tiny_project(tmp_path, tiny_model_dir))
    session = ModelSession(project, run_context(project))
    loaded = loader.load_backbone(project.resolved_backbone(), torch.device("cpu"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "load_backbone", refuse)
    assert session.grid == loaded.grid_size == (4, 4)
    assert torch.equal(session.view.pixels(_image()), model_view(loaded.preprocess).pixels(_image()))
    assert session.split.class_names == ["red", "green", "blue"]
    with pytest.raises(AssertionError, match="the model was loaded"):
        session.backbone  # noqa: B018 - the first use of the model loads it


def test_the_report_draws_heatmaps_without_clip_weights(categorized_tiny_project: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the dictionary's token cache present, `cscope export` needs CLIP's crop and patch grid
    only: it must not build the model or read its weights (it used to load all of CLIP for that)."""
    from conceptscope_cli.export.stage import export
    from conceptscope_cli.project import Project

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("export loaded the CLIP model")

    monkeypatch.setattr(loader, "load_backbone", refuse)
    result = export(Project.open(categorized_tiny_project), out_dir=tmp_path / "report", formats=["html"])
    html = result.path("html")
    assert html is not None and "data:image/" in html.read_text()  # heatmap tiles were drawn
