"""Data-parallel stages under torchrun: 2 gloo processes give what 1 process gives.

Each test launches the real `torchrun` (torch.distributed.run) over the real CLI on the
tiny project; a single-process run of the same manifest is the reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conceptscope_cli.distributed import contiguous_span
from helpers import FAST_CATEGORIZE, FAST_STAGES, assert_same_h5, make_tiny_project, run_cli, torchrun

pytestmark = pytest.mark.slow  # torchrun: several processes per test

TESTS = Path(__file__).parent


def entry(project: Path, kind: str) -> Path:
    (found,) = [p for p in (project / ".cscope" / "cache" / kind).iterdir() if (p / "record.json").is_file()]
    return found


def test_contiguous_span_covers_every_unit_once() -> None:
    for n in (0, 1, 2, 3, 7, 100):
        for world in (1, 2, 3, 8):
            spans = [contiguous_span(n, r, world) for r in range(world)]
            assert [i for s in spans for i in s] == list(range(n))
            assert max(len(s) for s in spans) - min(len(s) for s in spans) <= 1
    assert contiguous_span(3, 0, 2) == range(1) and contiguous_span(3, 1, 2) == range(1, 3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One process, every stage up to categorize."""
    project = make_tiny_project(tmp_path_factory.mktemp("single"), tiny_model_dir, FAST_STAGES + FAST_CATEGORIZE)
    result = run_cli(["categorize"], project)
    assert result.exit_code == 0, result.output
    return project


def sibling(reference: Path, name: str) -> Path:
    """A second project beside the reference: same manifest, same images, its own cache."""
    project = reference.parent / name
    project.mkdir()
    shutil.copy(reference / "cscope.toml", project / "cscope.toml")
    return project


def test_two_processes_give_the_single_process_outputs(reference: Path) -> None:
    project = sibling(reference, "two-ranks")
    # Same SAE in both (DDP training matches single-process training only to float tolerance,
    # tested in test_sae_training): everything else is recomputed by the two ranks.
    sae = entry(reference, "sae")
    shutil.copytree(sae, project / ".cscope" / "cache" / "sae" / sae.name)

    run = torchrun(["categorize"], project)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("classes ranked by evidence of bias") == 1  # only rank 0 prints

    acts_1, acts_2 = entry(reference, "activations"), entry(project, "activations")
    assert acts_1.name == acts_2.name
    assert_same_h5(acts_1 / "activations.h5", acts_2 / "activations.h5")
    record_1, record_2 = (json.loads((p / "record.json").read_text())["stats"] for p in (acts_1, acts_2))
    assert record_2["n_images"] == record_1["n_images"] == 22 and record_2["skipped"] == record_1["skipped"]
    assert len(list((acts_2 / "shards").glob("shard-*.h5"))) == 3  # rank 0 wrote shard 0, rank 1 shards 1-2

    lat_1, lat_2 = entry(reference, "latents"), entry(project, "latents")
    assert not (lat_2 / "parts").exists()  # merged into latents.h5
    assert_same_h5(lat_1 / "latents.h5", lat_2 / "latents.h5")
    assert_same_h5(lat_1 / "stats.h5", lat_2 / "stats.h5")

    out_1, out_2 = reference / "outputs" / "shapes", project / "outputs" / "shapes"
    for name in ("train_concept_categorization.json", "train_alignment_scores.json"):
        assert json.loads((out_1 / name).read_text()) == json.loads((out_2 / name).read_text()), name
    for name in ("concept_dict.json", "valid_latents.json", "latent_stats.json"):
        assert json.loads((out_1 / "train" / name).read_text()) == json.loads((out_2 / "train" / name).read_text())

    again = torchrun(["categorize"], project)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr


def test_a_killed_rank_fails_the_run_and_the_rerun_completes(reference: Path) -> None:
    project = sibling(reference, "killed")
    killed = torchrun(["extract"], project, script=TESTS / "torchrun_kill_rank.py")
    assert killed.returncode != 0, killed.stdout + killed.stderr
    cache = project / ".cscope" / "cache" / "activations"
    assert not [p for p in cache.iterdir() if (p / "record.json").is_file()]  # nothing marked complete
    (partial,) = cache.glob("*.partial")
    kept = {p.name: p.stat().st_mtime_ns for p in (partial / "shards").glob("shard-*.h5")}
    assert "shard-000001.h5" in kept and "shard-000002.h5" not in kept  # rank 1 died after its first shard

    rerun = torchrun(["extract"], project)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    done = entry(project, "activations")
    for name, mtime in kept.items():  # complete shards were kept, not redone
        assert (done / "shards" / name).stat().st_mtime_ns == mtime
    assert_same_h5(entry(reference, "activations") / "activations.h5", done / "activations.h5")


def test_commands_that_do_not_split_refuse_torchrun(tiny_project: Path) -> None:
    result = torchrun(["export"], tiny_project, timeout=120)
    assert result.returncode != 0
    assert "does not run under torchrun" in result.stderr


def test_train_under_torchrun_uses_distributed_data_parallel(reference: Path) -> None:
    project = sibling(reference, "ddp-train")
    run = torchrun(["train"], project)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("trained") == 1  # rank 0 reports, rank 1 is silent
    cfg = json.loads((entry(project, "sae") / "cfg.json").read_text())
    assert cfg["training"]["world_size"] == 2
    assert entry(project, "activations").name == entry(reference, "activations").name


def test_build_entry_commits_only_what_finished(tmp_path: Path) -> None:
    """One process: a failing build or finish leaves no entry (its parts stay for the re-run);
    a successful one commits once, and the next call reuses it without building."""
    from conceptscope_cli.cache.store import CacheStore
    from conceptscope_cli.distributed import build_entry

    cache = CacheStore(tmp_path / "cache")
    calls: list[str] = []

    def build(pending):  # noqa: ANN001, ANN202
        calls.append("build")
        (pending.path / "part-0").write_text("done")
        if len(calls) == 1:
            raise RuntimeError("rank died")
        return 7

    def finish(pending, built):  # noqa: ANN001, ANN202
        assert (pending.path / "part-0").read_text() == "done" and built == 7
        return {"parts": 1}, {"value": built}

    with pytest.raises(RuntimeError, match="rank died"):
        build_entry(cache, "demo", "k1", {"x": 1}, build, finish)
    assert cache.lookup("demo", "k1") is None and (cache.root / "demo" / "k1.partial" / "part-0").is_file()
    entry, reused = build_entry(cache, "demo", "k1", {"x": 1}, build, finish)
    assert not reused and entry.record["stats"] == {"value": 7} and (entry.path / "part-0").is_file()
    again, reused = build_entry(cache, "demo", "k1", {"x": 1}, build, finish)
    assert reused and again.path == entry.path and calls == ["build", "build"]


def test_run_under_torchrun_exports_once_on_rank_0(reference: Path) -> None:
    """`cscope run` under torchrun: the parallel stages split, export (which calls categorize
    and dict again) runs on rank 0 alone without waiting for the other rank."""
    project = sibling(reference, "pipeline")
    with open(project / "cscope.toml", "a") as manifest:
        manifest.write('\n[run]\nstages = ["extract", "train", "dict", "categorize", "export"]\n')
    run = torchrun(["run"], project, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("report:") == 1
    assert (project / "outputs" / "report" / "shapes" / "train" / "report.html").is_file()
