"""Shared fixtures: a tiny open_clip ViT on disk, tiny projects, the example. Plain helpers live in helpers.py.

Everything is made locally: no test reaches the network (HF_*_OFFLINE are set).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

# One thread per process: CI has 2 cores and several test processes run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Native numerics here and in most `cscope` subprocesses; the example's runs ask for portable ones
# (helpers.PORTABLE). A developer's CSCOPE_NUMERICS applies before numpy and torch load.
from conceptscope_cli import numerics  # noqa: E402  (light: no numpy, no torch)

numerics.apply()

import pytest  # noqa: E402

from helpers import FAST_CATEGORIZE, FAST_STAGES, PORTABLE, TINY_MODEL_CFG, CliResult, make_tiny_project, run_cli  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("CSCOPE_CACHE", None)

@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the mark into the node id
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs two workers, `--dist loadgroup`), every test that uses
    the embedded example goes to one worker: a session or module fixture is built once per worker,
    and the example's `cscope run` (about two minutes), its seed twins and its module fixtures
    should run once, not on both."""
    for item in items:
        if "example" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("example"))


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


@pytest.fixture
def tiny_project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return make_tiny_project(tmp_path, tiny_model_dir)


@pytest.fixture(scope="session")
def _categorized_tiny_original(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny project with fast stage settings, taken through categorize once per session.
    Tests never see this folder, only copies of it (categorized_tiny_project)."""
    from conceptscope_cli.categorize.stage import categorize
    from conceptscope_cli.project import Project

    project = make_tiny_project(tmp_path_factory.mktemp("categorized-original"), tiny_model_dir,
                                FAST_STAGES + FAST_CATEGORIZE)
    categorize(Project.open(project))
    return project


@pytest.fixture(scope="module")
def categorized_tiny_project(tmp_path_factory: pytest.TempPathFactory, _categorized_tiny_original: Path) -> Path:
    """The categorized tiny project, a fresh copy per module (images, manifest, outputs and its
    cache): what one module writes into it no other module sees. The cache keys and the dataset
    fingerprint depend on contents, not paths, so the copy is up to date as it stands."""
    root = tmp_path_factory.mktemp("categorized")
    shutil.copytree(_categorized_tiny_original.parent, root, symlinks=True, dirs_exist_ok=True)
    return root / _categorized_tiny_original.name


@pytest.fixture(scope="session")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CliResult, CliResult]:
    """The embedded example: `cscope init --example` then `cscope run` twice, once per test session
    (every slow example test shares it). CSCOPE_TEST_EXAMPLE=DIR reuses an example project already
    made by `cscope init --example DIR && cscope run` (a developer shortcut; the tests write into it).
    Every run is portable numerics' (helpers.PORTABLE), as the README's figures are."""
    reuse = os.environ.get("CSCOPE_TEST_EXAMPLE")
    if reuse:
        project = Path(reuse)
        again = run_cli(["run"], project, env=PORTABLE, timeout=900)
        assert again.exit_code == 0, again.output
        return project, again, again
    root = tmp_path_factory.mktemp("example")
    init = run_cli(["init", "--example", "demo"], root, env=PORTABLE)
    assert init.exit_code == 0, init.output
    project = root / "demo"
    first = run_cli(["run"], project, env=PORTABLE, timeout=900)
    assert first.exit_code == 0, first.output
    second = run_cli(["run"], project, env=PORTABLE, timeout=300)
    return project, first, second


@pytest.fixture(scope="module")
def portable_numerics() -> Iterator[None]:
    """For a module (`pytest.mark.usefixtures`): every `cscope` subprocess its tests start
    computes with helpers.PORTABLE, as the example's runs do (they share its cache entries)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in PORTABLE.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt only when running as root in CI, else the test skips."""
    def found() -> str | None:
        for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
            if candidate and os.path.exists(candidate):
                return candidate
        return None

    path = found()
    if path is None and os.geteuid() == 0 and os.environ.get("CI"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=False, timeout=900)
        path = found()
    if path is None:
        pytest.skip("the report test needs Chromium: `apt-get install chromium` (the test installs it itself "
                    "when run as root with CI set)")
    return path
