"""The command line as a shell sees it: exit codes, Ctrl-C, --json / -q / -v, help text,
plain progress when output is not a terminal, `run --stages / --dry-run`, offline Hub errors.

Every test runs the real entry point in a subprocess (`python -m conceptscope_cli`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conceptscope_cli
from helpers import FAST_STAGES, make_tiny_project, run_cli, write_image_folder

ONLINE_ENV = {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "TRANSFORMERS_OFFLINE": ""}


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize("args", [[], ["run", "--bogus"], ["attribute"], ["frobnicate"]],
                         ids=["no-arguments", "unknown-option", "missing-required-option", "unknown-command"])
def test_usage_errors_exit_2_with_the_usage_message(args: list[str], tmp_path: Path) -> None:
    result = run_cli(args, tmp_path)
    assert result.exit_code == 2, result.output
    assert "Usage: cscope" in result.output
    assert "internal error" not in result.output and "bug in cscope" not in result.output


def test_version(tmp_path: Path) -> None:
    result = run_cli(["--version"], tmp_path)
    assert result.exit_code == 0 and result.stdout.strip() == f"cscope {conceptscope_cli.__version__}"


def test_shell_completion_is_available(tmp_path: Path) -> None:
    # --show-completion detects the shell from the parent process: run it from bash (a second
    # command keeps bash from exec-ing python in its place).
    command = f"{sys.executable} -m conceptscope_cli --show-completion; exit $?"
    shown = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "_CSCOPE_COMPLETE=complete_bash" in shown.stdout and "complete " in shown.stdout
    # what that script asks for: the commands and options that complete what was typed
    completed = run_cli([], tmp_path, env={"_CSCOPE_COMPLETE": "complete_bash", "COMP_WORDS": "cscope run --dr",
                                           "COMP_CWORD": "2"})
    assert completed.exit_code == 0 and completed.stdout.split() == ["--dry-run"]


def test_help_shows_manifest_keys_and_defaults_from_the_sections(tmp_path: Path) -> None:
    from conceptscope_cli.config.sections import BackboneConfig, ExtractConfig

    result = run_cli(["extract", "--help"], tmp_path)
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())  # help is wrapped in a box
    assert "([project] device, default auto)" in text
    assert f"([extract] batch_size, default {ExtractConfig().batch_size})" in text
    assert f"([backbone] layer, default {BackboneConfig().layer})" in text
    for flag in ("--quiet", "--verbose", "--json"):
        assert flag in text


def test_missing_upstream_artifact_exits_3_naming_the_command(tiny_project: Path) -> None:
    image = str(tiny_project.parent / "images" / "test" / "00000.png")
    result = run_cli(["attribute", "--image", image, "--prompt", "a red square", "--json"], tiny_project)
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["ok"] is False and summary["exit_code"] == 3 and "`cscope train`" in summary["hint"]
    assert not (tiny_project / ".cscope" / "cache" / "sae").exists()  # it did not train one on the side

    result = run_cli(["export"], tiny_project)
    assert result.exit_code == 3 and "`cscope categorize`" in result.stderr


@pytest.mark.slow  # several seconds of `cscope` subprocesses: kept out of the fast loop (make test-fast)
def test_ctrl_c_during_training_exits_130_and_says_a_rerun_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    # A budget of hours: the run is certainly still training when SIGINT arrives.
    project = make_tiny_project(tmp_path, tiny_model_dir, FAST_STAGES.replace("total_tokens = 12000", "total_tokens = 500000000"))
    env = {**os.environ, "NO_COLOR": "1"}
    # A shell without job control starts background jobs with SIGINT ignored, and children inherit
    # that (a CI runner may), as they inherit a blocked signal mask: give the command the
    # disposition and mask an interactive shell would.
    def interactive_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen([sys.executable, "-m", "conceptscope_cli", "train"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interactive_sigint)
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 240
    for line in proc.stderr:  # plain progress lines: stderr is a pipe
        seen.append(line)
        if line.startswith("train: SAE: started"):
            break
        assert time.monotonic() < deadline, "".join(seen)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, rest = proc.communicate()
        pytest.fail("still running 180 s after SIGINT; its stderr after the signal:\n" + rest[-4000:])
    assert proc.returncode == 130, "".join(seen) + rest
    lines = [line for line in rest.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1, rest
    assert "`cscope train` stopped during train: SAE (" in lines[0] and "again to resume" in lines[0]
    assert list((project / ".cscope" / "cache" / "sae").glob("*.partial"))  # kept for the resume


def test_a_swallowed_ctrl_c_stops_the_command_at_its_next_progress_update() -> None:
    """SIGINT's KeyboardInterrupt is raised in whatever code runs when it arrives; in a finaliser
    (a generator collected mid-step) Python prints "Exception ignored" and drops it. The handler's
    flag makes the next progress update raise it again, in every output mode."""
    from conceptscope_cli.cli import command, ui

    reporters = [ui.QuietReporter(), ui.PlainReporter(ui.err_console, interval=3600.0)]
    for reporter in reporters:
        reporter.task("train: SAE", 100, unit="tokens")
    try:
        with pytest.raises(KeyboardInterrupt):
            command._on_sigint(signal.SIGINT, None)  # the raise a finaliser would swallow
        for reporter in reporters:
            with pytest.raises(KeyboardInterrupt):
                reporter.advance(1)
            assert reporter.task_state is not None and reporter.task_state.completed == 0
    finally:
        ui.interrupt.requested = False
    reporters[0].advance(1)  # and without a pending interrupt, progress goes on
    assert reporters[0].task_state is not None and reporters[0].task_state.completed == 1


def test_a_slow_stage_shows_its_rate_per_minute_not_zero_per_second() -> None:
    """categorize of a large class takes minutes: "0.0 classes/s" said nothing. The rate is given
    in the largest time unit that makes it at least ~1, in plain lines as in the live bar."""
    from conceptscope_cli.cli import ui

    assert ui.format_rate(5120.0, "tokens") == "5,120.0 tokens/s" and ui.format_rate(0.96, "it") == "1.0 it/s"
    assert ui.format_rate(1 / 33, "classes") == "1.8 classes/min"
    assert ui.format_rate(1 / 7200, "classes") == "0.5 classes/h"
    reporter = ui.PlainReporter(ui.err_console, interval=3600.0)
    reporter.task("categorize world/train", 5, unit="classes")
    assert reporter.task_state is not None
    reporter.task_state.started -= 66.0  # two classes in 66 s
    reporter.task_state.completed = 2
    line = reporter._line(reporter.task_state.started + 66.0)
    assert line == "categorize world/train: 2/5 classes (40%), 1.8 classes/min, eta 0:01:39", line


# --------------------------------------------------------------------------- output modes


@pytest.mark.slow  # several seconds of `cscope` subprocesses: kept out of the fast loop (make test-fast)
def test_json_summary_on_stdout_and_quiet(tiny_project: Path, tmp_path: Path) -> None:
    result = run_cli(["init", str(tmp_path / "new"), "--json"], tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert summary["command"] == "init" and Path(summary["outputs"]["manifest"]).is_file()
    assert "wrote" in result.stderr  # the human lines moved to stderr

    result = run_cli(["extract", "--json"], tiny_project)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    folder = Path(summary["outputs"]["activations"])
    record = json.loads((folder / "record.json").read_text())
    assert summary["up_to_date"] is False and summary["n_images"] == record["stats"]["n_images"] == 22
    assert summary["n_skipped"] == 1

    quiet = run_cli(["extract", "-q"], tiny_project)
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    again = json.loads(run_cli(["extract", "--json", "-q"], tiny_project).stdout)
    assert again["up_to_date"] is True and again["outputs"] == summary["outputs"]


def test_logs_are_plain_lines_when_not_a_terminal(tiny_project: Path) -> None:
    """Piped output: one line per update, no bar characters, no path cut by wrapping (even at COLUMNS=40)."""
    with open(tiny_project / "cscope.toml", "a") as manifest:
        manifest.write(FAST_STAGES)
    result = run_cli(["train", "-v"], tiny_project, env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    assert "━" not in result.stderr and "\r" not in result.stderr
    assert "extract shapes/train: started (23 images)" in result.stderr
    # training shows tokens/s and a real ETA (not -:--:--) while it runs, then the total
    running = [line for line in result.stderr.splitlines() if line.startswith("train: SAE:") and "eta" in line]
    assert running and all(re.search(r"[\d,.]+ tokens/s, eta \d+:\d\d:\d\d$", line) for line in running), result.stderr
    assert re.search(r"train: SAE: 12,032/12,032 tokens \(100%\), [\d,.]+ tokens/s, \d+:\d\d:\d\d elapsed", result.stderr)
    assert re.search(r"^metrics: step \d+, tokens_per_s", result.stderr, re.M)
    sae_dirs = [p for p in (tiny_project / ".cscope" / "cache" / "sae").iterdir() if p.is_dir()]
    assert len(sae_dirs) == 1 and any(str(sae_dirs[0]) in line for line in result.stdout.splitlines())


# --------------------------------------------------------------------------- run --stages / --dry-run


@pytest.mark.slow  # several seconds of `cscope` subprocesses: kept out of the fast loop (make test-fast)
def test_run_stages_and_dry_run(tiny_project: Path) -> None:
    cache = tiny_project / ".cscope" / "cache"
    plan = json.loads(run_cli(["run", "--dry-run", "--json"], tiny_project).stdout)
    assert [s["stage"] for s in plan["stages"]] == ["extract", "extract", "train", "dict", "dict", "categorize", "export"]
    assert not any(s["up_to_date"] for s in plan["stages"])
    assert not [p for p in cache.iterdir() if p.is_dir()]  # a dry run makes no entry (only the weights-hash memo)

    done = run_cli(["run", "--stages", "extract", "--json"], tiny_project)
    assert done.exit_code == 0, done.output
    assert [s["stage"] for s in json.loads(done.stdout)["stages"]] == ["extract", "extract"]
    # nothing past extract ran (the listing is the split extract opened)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["activations", "listing"]

    plan = json.loads(run_cli(["run", "--dry-run", "--json", "--stages", "extract,train"], tiny_project).stdout)
    by_stage = {(s["stage"], s["target"]): s for s in plan["stages"]}
    assert by_stage["extract", "shapes/train"]["up_to_date"] and by_stage["extract", "shapes/test"]["up_to_date"]
    assert not by_stage["train", "shapes/train"]["up_to_date"]
    assert by_stage["train", "shapes/train"]["reason"] == "no sae entry yet"

    manifest = tiny_project / "cscope.toml"
    manifest.write_text(manifest.read_text().replace("layer = -2", "layer = -1"))
    plan = json.loads(run_cli(["run", "--dry-run", "--json", "--stages", "extract"], tiny_project).stdout)
    for stage in plan["stages"]:
        assert not stage["up_to_date"] and stage["changes"] == ["layer: -2 → -1"], stage

    bad = run_cli(["run", "--stages", "extract,dictionary"], tiny_project)
    assert bad.exit_code == 2 and "unknown stage(s) in --stages: dictionary" in bad.stderr


# --------------------------------------------------------------------------- offline Hub


def _hub_project(root: Path, *, model: str, dataset: str) -> Path:
    write_image_folder(root / "images", {"train": 3})
    (root / "cscope.toml").write_text(f"""
[project]
device = "cpu"
num_workers = 0

[backbone]
model = "{model}"

[datasets.data]
{dataset}
""")
    return root


@pytest.mark.parametrize("case", ["model", "dataset"])
def test_hub_names_fail_offline_with_a_hint(case: str, tmp_path: Path) -> None:
    """No network here: a Hub model or dataset fails with a hint that names the fixes, with
    HF_HUB_OFFLINE unset (exit 1, not an internal error)."""
    if case == "model":
        project = _hub_project(tmp_path, model="openai/clip-vit-large-patch14",
                               dataset='source = "imagefolder"\npath = "images"')
        expected = ["local-dir:", "hf download", "hf auth login", "HF_HUB_OFFLINE"]
    else:
        project = _hub_project(tmp_path, model="example:tiny-clip", dataset='source = "hf"\npath = "imagenet-1k"\nsplits = ["validation"]')
        expected = ["imagefolder", "hf download imagenet-1k --repo-type dataset", "hf auth login", "HF_DATASETS_OFFLINE"]
    result = run_cli(["extract"], project, env=ONLINE_ENV, timeout=180)
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.output
    hint = " ".join(line for line in result.stderr.splitlines() if line.startswith("hint:"))
    for part in expected:
        assert part in hint, result.stderr


def test_hub_lookups_fail_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub step itself, timed in-process (imports excluded, so a loaded machine does not
    blur it): the model's weights and the dataset fail in seconds, not after the libraries'
    retries (measured before: 62 s for the model, 30 s for the dataset)."""
    import datasets  # noqa: F401
    import open_clip  # noqa: F401 - imported before the clock starts

    from conceptscope_cli import hub
    from conceptscope_cli.backbone.loader import load_backbone
    from conceptscope_cli.backbone.resolve import resolve_model
    from conceptscope_cli.config.sections import DatasetConfig
    from conceptscope_cli.data.datasets import open_split
    from conceptscope_cli.errors import CscopeError

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    hub.hub_access.cache_clear()
    monkeypatch.setattr(hub, "_force_offline", _restoring_force_offline(monkeypatch, hub._force_offline))
    resolved = resolve_model("openai/clip-vit-large-patch14", None, project_root=tmp_path, cache_root=tmp_path)
    started = time.monotonic()
    with pytest.raises(CscopeError, match="not in the local Hugging Face cache"):
        load_backbone(resolved, __import__("torch").device("cpu"))
    model_seconds = time.monotonic() - started
    started = time.monotonic()
    with pytest.raises(CscopeError, match="not in the local Hugging Face cache"):
        open_split("data", DatasetConfig(source="hf", path="imagenet-1k", splits=["validation"]), "validation", tmp_path)
    dataset_seconds = time.monotonic() - started
    hub.hub_access.cache_clear()
    assert model_seconds < 10 and dataset_seconds < 10, (model_seconds, dataset_seconds)


def _restoring_force_offline(monkeypatch: pytest.MonkeyPatch, original: object) -> object:
    """hub._force_offline, with every change it makes undone after the test."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "")
    try:
        import datasets.config

        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.setattr(datasets.config, name, getattr(datasets.config, name))
    except ImportError:
        pass
    return original
