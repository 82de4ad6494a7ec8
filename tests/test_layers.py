"""The house rules of the import graph: layers import downward only, and light commands stay light.

Layers, top to bottom (CONTRIBUTING.md): cli -> pipeline -> stages (in pipeline order) -> project ->
libraries -> distributed -> base (devices, progress, cache, config, errors). A module may import
modules of its own unit (the longest prefix in LAYERS) or of a lower rank. Lazy imports inside
functions count too: they are still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "conceptscope_cli"

# unit (module prefix) -> rank; higher ranks may import lower ones. Every module must match a unit.
LAYERS: dict[str, int] = {
    # entry points
    "conceptscope_cli.__main__": 101,
    "conceptscope_cli.cli": 100,
    "conceptscope_cli.pipeline": 90,
    # stages: a stage may run or read the stages before it in the pipeline
    "conceptscope_cli.export": 87,  # the report shows every stage's results, the act section included
    "conceptscope_cli.act": 86,
    "conceptscope_cli.ablate": 85,
    "conceptscope_cli.attribute": 83,
    "conceptscope_cli.categorize": 82,
    "conceptscope_cli.dictionary.stage": 81,
    "conceptscope_cli.train": 80,
    "conceptscope_cli.extract.activations": 79,
    # what every stage shares: the run context, the opened manifest and cache
    "conceptscope_cli.session": 72,  # the one loader: backbone, preprocessing, SAE, split, token reader
    "conceptscope_cli.context": 71,
    "conceptscope_cli.project": 70,
    # libraries: plain functions over tensors, arrays and files
    "conceptscope_cli.dictionary": 60,
    "conceptscope_cli.attribute.core": 58,
    "conceptscope_cli.example": 56,
    "conceptscope_cli.sae": 55,
    "conceptscope_cli.extract": 54,
    "conceptscope_cli.backbone": 52,
    "conceptscope_cli.data": 50,
    "conceptscope_cli.masks": 50,
    "conceptscope_cli.devices": 35,  # picks the rank's GPU under torchrun (distributed)
    "conceptscope_cli.distributed": 30,
    # base
    "conceptscope_cli.progress": 20,
    "conceptscope_cli.artifacts": 16,  # the typed files between stages: every stage reads them
    "conceptscope_cli.cache": 15,
    "conceptscope_cli.config": 10,
    "conceptscope_cli.numerics": 6,  # the code-path variables, set before numpy and torch load
    "conceptscope_cli.errors": 5,
    "conceptscope_cli": 0,  # the package root: __version__, FORMAT_VERSION
}


# Known upward imports, each to be removed (not a place for new ones).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.with_suffix("").relative_to(package.parent).parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    matches = [u for u in LAYERS if module == u or module.startswith(u + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py (and CONTRIBUTING.md)"
    return max(matches, key=len)


def _imports(path: Path, module: str, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported module of the package) for every import statement in `path` (module `module`)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            # `from pkg import module` imports the module; `from module import name` the module itself.
            found += [(node.lineno, n) for n in names if n in modules] or [(node.lineno, target)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name in modules and name != module]


def layer_violations(package: Path = PACKAGE) -> list[str]:
    files = sorted(package.rglob("*.py"))
    modules = {_module_name(p, package) for p in files}
    bad = []
    for path in files:
        module = _module_name(path, package)
        source = _unit(module)
        for line, target in _imports(path, module, modules):
            unit = _unit(target)
            if unit != source and not LAYERS[unit] < LAYERS[source] and (module, target) not in KNOWN_UPWARD:
                bad.append(f"{path.relative_to(package.parent)}:{line}: {source} (rank {LAYERS[source]}) "
                           f"imports {target} (rank {LAYERS[unit]})")
    return bad


def _copy_package(tmp_path: Path) -> Path:
    """A copy of the package's sources under tmp_path, for a check's test to plant a violation in."""
    fake = tmp_path / "conceptscope_cli"
    for path in PACKAGE.rglob("*.py"):
        target = fake / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return fake


def test_layers_import_downward_only() -> None:
    assert layer_violations() == []


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule is not vacuous: a library importing a stage (even lazily) is reported, with its line."""
    fake = _copy_package(tmp_path)
    model = fake / "sae" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _f() -> None:\n    from conceptscope_cli.categorize import stage  # noqa\n")
    (fake / "masks.py").write_text((fake / "masks.py").read_text() + "\nfrom conceptscope_cli.data.datasets import decode_image\n")
    bad = layer_violations(fake)
    assert len(bad) == 2
    assert any("sae/model.py" in b and "imports conceptscope_cli.categorize.stage" in b for b in bad)
    assert any("masks.py" in b and "conceptscope_cli.data.datasets" in b for b in bad)  # same rank, other unit


HEAVY = ("torch", "h5py", "open_clip", "openai", "datasets", "safetensors", "numpy")  # numpy alone: +0.2 s

_PROBE = """
import sys
from conceptscope_cli.cli import app
sys.argv = ["cscope", *sys.argv[1:]]
try:
    app.main()
except SystemExit as exit_:
    assert not exit_.code, exit_.code
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["init", "fresh"], ["cache", "ls"], ["cache", "--help"]])
def test_light_commands_do_not_import_torch(tmp_path: Path, args: list[str]) -> None:
    """`cscope --help`, `init` and `cache ls` answer in a fraction of a second: no torch, h5py, open_clip."""
    project = tmp_path / "p"
    subprocess.run([sys.executable, "-m", "conceptscope_cli", "init", str(project)], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], cwd=project,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    heavy = proc.stdout.rsplit("HEAVY:", 1)[1].strip()
    assert heavy == "", f"`cscope {' '.join(args)}` imported {heavy}"


def test_tests_share_helpers_only_through_helpers_py() -> None:
    """Fixtures come from conftest.py by name; everything else shared is imported from tests/helpers.py."""
    tests = Path(__file__).parent
    bad = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{path.name}:{node.lineno}: {n}" for n in names if n == "conftest" or n.startswith("test_")]
    assert bad == []


def _calls(path: Path) -> set[str]:
    """Dotted names of everything called in a module (`torch.autocast`, `resolve_device`, ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                names.add(".".join([func.id, *reversed(parts)]))
    return names


# The one place each run-wide decision is made (issue 19 item 3): module -> what only it may call.
ONE_PLACE = {
    "resolve_device": {"conceptscope_cli/context.py"},  # the run context, memoised per project
    "torch.autocast": {"conceptscope_cli/devices.py", "conceptscope_cli/backbone/capture.py"},  # capture applies a given dtype
    # One loader (issue 19 item 2): every stage opens model, SAE and split through conceptscope_cli.session
    # (the extractor's and the dict's per-rank builders too); the loaders' own modules are the only others.
    "load_backbone": {"conceptscope_cli/session.py", "conceptscope_cli/backbone/loader.py"},
    "load_sae": {"conceptscope_cli/session.py"},
    "load_preprocessing": {"conceptscope_cli/session.py"},
}


def one_place_violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = str(path.relative_to(package.parent))
        bad += [f"{rel} calls {name} (only {sorted(owners)} may)" for name, owners in ONE_PLACE.items()
                if name in _calls(path) and rel not in owners]
    # The bf16 rule is written once: no module but devices.py names bfloat16.
    bad += [f"{p.relative_to(package.parent)} names torch.bfloat16 (the bf16 rule lives in devices.py)"
            for p in sorted(package.rglob("*.py")) if p.name != "devices.py" and "bfloat16" in p.read_text()]
    return bad


def test_device_and_precision_are_decided_in_one_place() -> None:
    assert one_place_violations() == []


def test_the_one_place_check_catches_a_second_spelling(tmp_path: Path) -> None:
    fake = _copy_package(tmp_path)
    stage = fake / "categorize" / "stage.py"
    stage.write_text(stage.read_text() + "\n\ndef _f(d):\n    return resolve_device(d), torch.bfloat16\n")
    bad = one_place_violations(fake)
    assert len(bad) == 2 and all("categorize/stage.py" in b for b in bad)


def private_import_violations(package: Path = PACKAGE) -> list[str]:
    """`from conceptscope_cli.X.m import _name` outside package X: a private helper is its package's
    own (ablate once borrowed attribute/run.py's; what two packages share is made public)."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        own = _module_name(path, package).split(".")[:2]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level \
                    and node.module.startswith(package.name + ".") and node.module.split(".")[:2] != own:
                bad += [f"{path.relative_to(package.parent)}:{node.lineno} imports {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_private_helpers_stay_in_their_package(tmp_path: Path) -> None:
    assert private_import_violations() == []
    fake = _copy_package(tmp_path)
    edit = fake / "ablate" / "edit.py"
    edit.write_text(edit.read_text() + "\n\ndef _f() -> None:\n    from conceptscope_cli.attribute.run import _image_scores  # noqa\n")
    assert [b.split(" imports ")[1] for b in private_import_violations(fake)] == ["conceptscope_cli.attribute.run._image_scores"]
