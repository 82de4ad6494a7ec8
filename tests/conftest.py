"""Shared fixtures: a tiny open_clip ViT on disk, generated image folders, project builders.

Everything is made locally: no test reaches the network (HF_*_OFFLINE are set).
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import CliResult, run_cli

# One thread per process: CI has 2 cores and several test processes run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("CSCOPE_CACHE", None)

# A 3-block ViT at 32 px with 8-px patches: 17 tokens of width 32. Small enough to build in
# milliseconds, real enough to exercise every code path of the backbone loader.
TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip ViT built from a config and saved as a local-dir folder."""
    import open_clip
    import torch

    from conceptscope_cli.backbone.local import save_local_dir

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_MODEL_CFG)
    folder = tmp_path_factory.mktemp("tiny-clip")
    return save_local_dir(model, TINY_MODEL_CFG, folder, {"size": 32})


def write_image_folder(folder: Path, n_per_split: dict[str, int], *, size: int = 40, corrupt: dict[str, list[int]] | None = None, seed: int = 0) -> Path:
    """Random RGB PNGs with metadata.jsonl (label, a colour attribute); `corrupt` rows get junk bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in n_per_split.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        with open(folder / split / "metadata.jsonl", "w") as meta:
            for i in range(n):
                name = f"{i:05d}.png"
                label = i % 3
                pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
                pixels[..., label] = 255
                if corrupt and i in corrupt.get(split, []):
                    (folder / split / name).write_bytes(b"this is not a png")
                else:
                    Image.fromarray(pixels).save(folder / split / name)
                meta.write(json.dumps({"file_name": name, "label": label, "colour": ["red", "green", "blue"][label]}) + "\n")
    return folder


def write_manifest(project: Path, body: str) -> Path:
    project.mkdir(parents=True, exist_ok=True)
    path = project / "cscope.toml"
    path.write_text(textwrap.dedent(body).lstrip(), encoding="utf-8")
    return path


# Settings that train, describe and categorize the tiny project in seconds (ConceptScope's relu
# recipe and absolute valid-latent rule, set explicitly: the tests below were written for them).
FAST_STAGES = """
[sae]
architecture = "relu"
expansion = 4
total_tokens = 12000
batch_size = 256
warmup_steps = 5
checkpoint_every = 20
geometric_median_samples = 256
shuffle_buffer = 2048

[dict]
valid_rule = "reference"
noisy_threshold = 100.0
strong_value = 0.0
min_strong_images = 2
naming_images = 4
"""
FAST_CATEGORIZE = """
[categorize]
num_samples = 6
candidates = 5
"""


def make_tiny_project(root: Path, model_dir: Path, extra: str = "") -> Path:
    """A project over a 3-class image folder (one corrupt image in train) and the tiny ViT."""
    write_image_folder(root / "images", {"train": 23, "test": 9}, corrupt={"train": [5]})
    project = root / "proj"
    write_manifest(
        project,
        f"""
        [project]
        name = "tiny"
        seed = 0
        device = "cpu"
        num_workers = 0

        [backbone]
        model = "local-dir:{model_dir}"
        layer = -2

        [datasets.shapes]
        source = "imagefolder"
        path = "../images"
        splits = ["train", "test"]
        class_names = ["red", "green", "blue"]
        attribute_columns = ["colour"]

        [extract]
        batch_size = 4
        shard_size = 8
        chunk_images = 4
        """,
    )
    if extra:
        with open(project / "cscope.toml", "a") as manifest:
            manifest.write(extra)
    return project


@pytest.fixture
def tiny_project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return make_tiny_project(tmp_path, tiny_model_dir)


@pytest.fixture(scope="module")
def categorized_tiny_project(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny project with fast stage settings, taken through categorize once per module."""
    from conceptscope_cli.categorize.stage import categorize
    from conceptscope_cli.project import Project

    project = make_tiny_project(tmp_path_factory.mktemp("categorized"), tiny_model_dir, FAST_STAGES + FAST_CATEGORIZE)
    categorize(Project.open(project))
    return project


@pytest.fixture(scope="session")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CliResult, CliResult]:
    """The embedded example: `cscope init --example` then `cscope run` twice, once per test session
    (every slow example test shares it). CSCOPE_TEST_EXAMPLE=DIR reuses an example project already
    made by `cscope init --example DIR && cscope run` (a developer shortcut; the tests write into it)."""
    reuse = os.environ.get("CSCOPE_TEST_EXAMPLE")
    if reuse:
        project = Path(reuse)
        again = run_cli(["run"], project, timeout=900)
        assert again.exit_code == 0, again.output
        return project, again, again
    root = tmp_path_factory.mktemp("example")
    init = run_cli(["init", "--example", "demo"], root)
    assert init.exit_code == 0, init.output
    project = root / "demo"
    first = run_cli(["run"], project, timeout=900)
    assert first.exit_code == 0, first.output
    second = run_cli(["run"], project, timeout=300)
    return project, first, second
