"""The run context (issue 19 item 3): one device choice, one precision vocabulary, one bf16 rule.

The resolution logic is pure (`choose_device` takes which accelerators exist), so the CUDA and MPS
branches are tested here on a CPU-only machine with fake availability."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conceptscope_cli.context import device_of, run_context
from conceptscope_cli.devices import autocast_dtype, autocast_for, choose_device, precision_of
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.project import Project
from helpers import make_tiny_project


@pytest.mark.parametrize(("requested", "cuda", "mps", "expected"), [
    ("auto", True, False, "cuda"), ("auto", False, True, "cpu"), ("auto", False, False, "cpu"),
    ("cpu", True, True, "cpu"), ("cuda", True, False, "cuda"), ("cuda:1", True, False, "cuda:1"),
    ("mps", False, True, "mps"),
])
def test_choose_device_given_the_machine(requested: str, cuda: bool, mps: bool, expected: str) -> None:
    assert choose_device(requested, cuda=cuda, mps=mps) == torch.device(expected)


@pytest.mark.parametrize(("requested", "message"), [
    ("cuda:0", "CUDA is not available"), ("cuda", "CUDA is not available"), ("mps", "MPS is not available"),
    ("meta", "not supported"), ("xla", "not supported"), ("gpu", "unknown device"),
])
def test_choose_device_refuses_what_the_machine_cannot_run(requested: str, message: str) -> None:
    with pytest.raises(CscopeError, match=message):
        choose_device(requested, cuda=False, mps=False)


@pytest.mark.parametrize(("device", "precision", "dtype"), [
    ("cuda", "bf16", torch.bfloat16), ("cuda:1", "bf16", torch.bfloat16), ("cuda", "fp32", None),
    ("cpu", "bf16", None), ("mps", "bf16", None), ("cpu", "fp32", None),
])
def test_bf16_only_on_cuda(device: str, precision: str, dtype: torch.dtype | None) -> None:
    assert autocast_dtype(torch.device(device), precision_of(precision)) is dtype  # type: ignore[arg-type]


def test_both_manifest_vocabularies_map_to_one_precision() -> None:
    """`[backbone] precision` says fp32/bf16, `[sae] autocast` none/bf16: the same two precisions."""
    assert precision_of("fp32") == precision_of("none") == "fp32"
    assert precision_of("bf16") == "bf16"
    with pytest.raises(CscopeError, match=r"\[sae\] autocast = 'fp16' is not a precision"):
        precision_of("fp16", "[sae] autocast")
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_dtype(torch.device("cuda"), "none")  # type: ignore[arg-type]


def test_autocast_for_cpu_keeps_float32() -> None:
    layer = torch.nn.Linear(4, 4)
    with autocast_for(torch.device("cpu"), "bf16"):
        assert layer(torch.ones(1, 4)).dtype == torch.float32


def test_run_context_resolves_once_from_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_tiny_project(tmp_path, tmp_path, '[sae]\nautocast = "none"\n')
    manifest = folder / "cscope.toml"
    manifest.write_text(manifest.read_text().replace("layer = -2", 'layer = -2\nprecision = "bf16"'))
    project = Project.open(folder)
    calls: list[str] = []
    import conceptscope_cli.devices as devices

    real = devices.resolve_device
    monkeypatch.setattr(devices, "resolve_device", lambda requested: calls.append(requested) or real(requested))
    ctx = run_context(project, None, None, device="cpu")
    assert (ctx.device, ctx.precision, ctx.train_precision, ctx.seed) == (torch.device("cpu"), "bf16", "fp32", 0)
    assert ctx.split == ctx.dataset_cfg.splits[0]
    assert run_context(project, ctx.dataset, "test", device="cpu").split == "test"
    assert device_of(project, "cpu") == torch.device("cpu")
    assert calls == ["cpu"]  # three resolutions of the same request probe the machine once
    assert ctx.at_split("test").split == "test" and ctx.at_split(None) is ctx
    with pytest.raises(CscopeError, match="split 'nope' is not listed"):
        ctx.at_split("nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_pipeline_resolves_the_context_before_any_stage(tmp_path: Path) -> None:
    """`cscope run --device cuda:0` on a machine without CUDA fails before any stage starts (the
    model folder here does not even exist: a stage that ran first would fail on it instead)."""
    from conceptscope_cli.config.sections import ProjectConfig
    from conceptscope_cli.pipeline.run import run_pipeline
    from conceptscope_cli.progress import NullReporter

    project = Project.open(make_tiny_project(tmp_path, tmp_path / "no-model"))
    project.manifest.override(ProjectConfig, device="cuda:0")
    with pytest.raises(CscopeError, match="CUDA is not available"):
        run_pipeline(project, None, reporter=NullReporter())
    assert project.devices == {}  # the failed resolution is not memoised


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_stage_handed_a_context_runs_it_all_the_way_down(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The CLI and `cscope run` hand categorize (and through it dict, train, extract) a resolved
    context: its dataset, split and device are the ones every stage below uses. Here `[project]
    device` is a CUDA device this machine lacks, so a stage below that resolved its own device
    from the manifest would fail; the names given beside the context are ignored."""
    from conceptscope_cli.categorize.stage import categorize
    from conceptscope_cli.config.sections import ProjectConfig
    from helpers import FAST_CATEGORIZE, FAST_STAGES

    project = Project.open(make_tiny_project(tmp_path, tiny_model_dir, FAST_STAGES + FAST_CATEGORIZE))
    ctx = run_context(project, None, "test", device="cpu")
    project.manifest.override(ProjectConfig, device="cuda:0")
    result = categorize(project, "no-such-dataset", "no-such-split", ctx=ctx)
    assert result.out_dir == project.outputs_dir / "shapes" / "test"
    assert result.categorization["meta"]["split"] == "test"
    assert set(project.devices) == {"cpu"}  # nothing below asked for the manifest's device
    from conceptscope_cli.export.stage import export  # `cscope run` hands export the same context

    exported = export(project, "no-such-dataset", formats=["csv"], ctx=ctx)
    assert exported.out_dir == project.outputs_dir / "report" / "shapes" / "test"
    assert exported.path("csv") is not None and exported.path("csv").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_and_extract_handed_a_context_use_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`cscope run` hands train and extract its context: they train on its split, on its device (the
    manifest's cuda:0 is missing here), whatever names are given beside it."""
    from conceptscope_cli.config.sections import ProjectConfig
    from conceptscope_cli.train.stage import train_stage
    from helpers import FAST_STAGES

    project = Project.open(make_tiny_project(tmp_path, tiny_model_dir, FAST_STAGES))
    ctx = run_context(project, None, "test", device="cpu")
    project.manifest.override(ProjectConfig, device="cuda:0")
    result = train_stage(project, "no-such-dataset", "no-such-split", ctx=ctx)
    activations = project.cache.lookup("activations", result.entry.record["inputs"]["activations"])
    assert activations is not None and activations.record["summary"]["split"] == "test"
    assert set(project.devices) == {"cpu"}
