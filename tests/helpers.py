"""Shared test helpers (tests import these from here, never from conftest or another test):
run the real `cscope` entry point, build tiny projects and image folders, compare outputs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

TESTS = Path(__file__).parent
# The environment of every `cscope` run on the embedded example (conftest's `example` fixture, the
# modules that use it): portable numerics (conceptscope_cli/numerics.py), the same bits on any x86-64
# CPU with AVX2, which the README's example figures and the example's ground-truth bars were measured
# with. The rest of the suite computes natively: MKL's portable path makes matmuls 2.6-3.5x slower.
PORTABLE = {"CSCOPE_NUMERICS": "portable"}



@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def load_benchmark(name: str) -> Any:
    """A script of benchmarks/ imported as a module (the folder is no package), e.g. "scale"."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cscope_bench_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses of the script look their module up here
    spec.loader.exec_module(module)
    return module


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


# ------------------------------------------------------------------ the report in a browser
EVIL = "<img src=x onerror=alert(1)>"
EVIL_CLASS = "</script><script>document.title='pwned'</script><!--"


def browse(chromium: str, page: Path, fragment: str, work: Path, *, screenshot: Path | None = None,
           net_log: Path | None = None) -> str:
    """Open page#fragment from disk in headless Chromium; returns the DOM after the script ran
    (or writes a 1400×1000 screenshot). Host names all fail to resolve, so nothing can be fetched."""
    profile = work / "chromium-profile"
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
            "--disable-extensions", f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=5000", "--window-size=1400,1000", "--hide-scrollbars"]
    if net_log is not None:
        args.append(f"--log-net-log={net_log}")
    args += [f"--screenshot={screenshot}"] if screenshot is not None else ["--dump-dom"]
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    proc = subprocess.run(args + [url], capture_output=True, text=True, timeout=120)
    if screenshot is not None:
        assert screenshot.is_file(), proc.stderr[-2000:]
        return ""
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


class Dom(HTMLParser):
    """The dumped DOM as a flat list of elements with their attributes and full text."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        element = {"tag": tag, "attrs": dict(attrs), "text": [], "parents": [e["attrs"].get("id") for e in self._open]}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element["text"].append(data)

    def by_id(self, element_id: str) -> dict:
        matches = [e for e in self.elements if e["attrs"].get("id") == element_id]
        assert matches, f"no element #{element_id}"
        return matches[0]

    def text(self, element_id: str) -> str:
        return "".join(self.by_id(element_id)["text"])

    def inside(self, element_id: str, tag: str) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and element_id in e["parents"]]

    def view(self) -> str:
        return self.by_id("main")["attrs"].get("data-view", "")


def assert_offline(html: str) -> None:
    """No src/href/url() that points at another host (the SVG namespace is a name, not a fetch)."""
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//", html, re.I)
    assert not re.search(r"@import|<link\b|<iframe\b|fetch\(|XMLHttpRequest|WebSocket|EventSource", html)
    assert "connect-src 'none'" in html  # the page's CSP forbids any connection


def page_requests(net_log: Path) -> list[str]:
    """URLs the *page* asked the network stack for, from Chromium's net log.

    Chromium itself talks to Google services in the background (time, updates) even with
    background networking disabled; those requests carry the initiator "not an origin",
    while a page opened from disk starts its requests with the opaque origin "null".
    """
    text = net_log.read_text(errors="replace").rstrip()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # killed before the closing brackets were written
        log = json.loads(text.rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return sorted({event["params"].get("url", "") for event in log["events"]
                   if event["type"] == start_job and event.get("params", {}).get("initiator") != "not an origin"
                   and event["params"].get("url") and not event["params"]["url"].startswith(("file:", "data:"))})



def synthetic_inputs(folder: Path, n_classes: int = 1000, n_latents: int = 4000, candidates: int = 20,
                     seed: int = 0) -> Any:
    """An ImageNet-sized categorization made without any model: names, scores, statistics and a
    reference tile (5 crops of 64 px, smooth colour with noise, like masked photos) per latent."""
    from PIL import Image

    from conceptscope_cli.export.report import ReportInputs

    rng = np.random.default_rng(seed)
    (folder / "reference").mkdir(parents=True, exist_ok=True)
    x = np.linspace(0, 1, 64)
    bases = []
    for _ in range(40):
        hue = rng.random(3)
        crop = np.stack([np.outer(x ** (1 + hue[c]), 1 - x * hue[c]) for c in range(3)], -1) * 255
        tile = np.concatenate([crop * rng.random() + rng.normal(0, 12, crop.shape) for _ in range(5)], 1)
        bases.append(Image.fromarray(tile.clip(0, 255).astype(np.uint8)))
    concepts, stats = {}, {}
    for k in range(n_latents):
        name = f"reference/latent_{k:05d}.png"
        bases[k % len(bases)].save(folder / name)
        concepts[str(k)] = {"name": f"concept {k} " + "abcdefghij"[k % 10] * (4 + k % 7), "score": float(rng.random()),
                            "clarity": float(rng.random()), "source": "clip", "error": None,
                            "reference_image": name, "reference_rows": [1, 2, 3, 4, 5]}
        stats[str(k)] = {"frequency": [float(rng.random())] * 7, "mean": 0.1, "mean_when_active": 0.3,
                         "top_label_entropy": 1.2, "max_value": 2.0,
                         "top_classes": [{"label": int(c), "name": f"class {c}", "mean": float(rng.random()),
                                          "frequency": float(rng.random())} for c in rng.choice(n_classes, 5)]}
    classes = {}
    for y in range(n_classes):
        chosen = rng.choice(n_latents, candidates, replace=False)
        z = rng.normal(0, 1, candidates)
        strength = rng.gamma(2, 0.2, candidates)
        entries = [{"latent": int(k), "name": concepts[str(k)]["name"], "alignment_score": float(rng.normal(0, 0.05)),
                    "normalized_alignment_score": float(z[i]), "sufficiency": float(rng.random()),
                    "necessity": float(rng.random()), "concept_strength": float(strength[i]),
                    "class_frequency": float(rng.random()), "frequency": float(rng.random())}
                   for i, k in enumerate(chosen)]
        target = [e for e in entries if e["normalized_alignment_score"] >= 0]
        context = [e for e in entries if e["normalized_alignment_score"] < 0]
        cut = np.mean([e["concept_strength"] for e in context]) + np.std([e["concept_strength"] for e in context])
        classes[f"class {y} " + "xyz" * (y % 5)] = {
            "class": y, "n_images": 1300, "target": target, "context": context,
            "bias": [e for e in context if e["concept_strength"] >= cut],
            "thresholds": {"target_threshold": 0.0, "bias_sigma": 1.0, "bias_strength_threshold": float(cut)}, "notes": []}
    meta = {"title": "synthetic ImageNet-size report", "dataset": "synthetic", "split": "train", "n_images": 1_281_167,
            "backbone": "ViT-B-16", "layer": -2, "layer_index": 10,
            "sae": {"architecture": "topk", "d_in": 768, "d_sae": 49152, "k": 32, "fvu": 0.2, "l0": 32}}
    return ReportInputs(meta=meta, categorization={"meta": {}, "classes": classes}, concepts=concepts,
                        latent_stats=stats, reference_dir=folder)
