"""Shared test helpers (tests import these from here, never from conftest or another test):
run the real `cscope` entry point, build tiny projects and image folders, compare outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

TESTS = Path(__file__).parent


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
    """`python -m conceptscope_cli ARGS` in a subprocess: what a user's shell sees."""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "conceptscope_cli", *args], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def run_main(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliResult:
    """The console-script entry point in-process (faster than a subprocess)."""
    from conceptscope_cli.cli import app as cli_app

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["cscope", *args])
    monkeypatch.setattr(cli_app.state, "project_dir", None)
    monkeypatch.setattr(cli_app.state, "debug", False)
    code = 0
    try:
        cli_app.main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], cwd: Path, *, script: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "conceptscope_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), *target, *args]
    # Loopback for gloo: the ranks are on this machine, whatever its hostname resolves to.
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def h5_contents(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}


def assert_same_h5(a: Path, b: Path) -> None:
    left, right = h5_contents(a), h5_contents(b)
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        np.testing.assert_array_equal(left[name], right[name], err_msg=f"{a.name}:{name}")


# ------------------------------------------------------------------ tiny projects
# A 3-block ViT at 32 px with 8-px patches: 17 tokens of width 32. Small enough to build in
# milliseconds, real enough to exercise every code path of the backbone loader.
TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


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
