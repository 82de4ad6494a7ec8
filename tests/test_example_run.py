"""The embedded example end to end: `cscope init --example` then `cscope run`, twice.

The session-scoped `example` fixture (tests/conftest.py) runs the whole pipeline once (about a
minute on 2 cores); the tests below read what it produced.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import PORTABLE, CliResult, load_benchmark, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("portable_numerics")]  # the `example` fixture runs the whole example pipeline (~3 min)


def _stage_rows(stdout: str) -> list[tuple[str, str, str]]:
    """(stage, status, detail) of each row `cscope run` prints, in order."""
    import re

    return [(m[1], m[2], m[3]) for m in re.finditer(r"^(\w+) +(done|up to date) +(.*)$", stdout, re.M)]


def test_run_executes_every_stage_then_is_up_to_date(example: tuple[Path, CliResult, CliResult]) -> None:
    from conceptscope_cli.project import Project

    project, first, second = example
    splits = Project.open(project).dataset(None)[1].splits
    order = ["extract"] * len(splits) + ["train"] + ["dict"] * len(splits) + ["categorize", "export"]
    rows = _stage_rows(first.stdout)
    assert [r[0] for r in rows] == order and {r[1] for r in rows} == {"done"}, first.stdout
    train = rows[len(splits)][2]
    assert "fvu" in train and "l0" in train, train  # the SAE's held-out evaluation, from the train stage itself
    assert "report:" in rows[-1][2] and (project / "outputs" / "report" / "world" / "train" / "report.html").is_file()
    assert second.exit_code == 0, second.output
    again = _stage_rows(second.stdout)
    assert [r[0] for r in again] == order and {r[1] for r in again} == {"up to date"}, second.stdout
    assert "every stage is up to date; nothing to do" in second.stdout


def test_the_example_was_computed_with_portable_numerics(example: tuple[Path, CliResult, CliResult]) -> None:
    """The README's example figures are portable numerics' (helpers.PORTABLE): the `cscope`
    processes that made the dictionary and the categorization say so in their meta."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable settings are x86-64's")
    project, _, _ = example
    outputs = project / "outputs" / "world"
    for path in (outputs / "train" / "valid_latents.json", outputs / "train_concept_categorization.json"):
        state = json.loads(path.read_text())["meta"]["numerics"]
        assert (state["mode"], state["cpu_capability"], state["threads"], state["mkl_cbwr"]) == \
            ("portable", "AVX2", 1, 65539), (path.name, state)


def test_example_outputs_exist(example: tuple[Path, CliResult, CliResult]) -> None:
    project, _, _ = example
    outputs = project / "outputs" / "world"
    categorization = json.loads((outputs / "train_concept_categorization.json").read_text())
    assert set(categorization["classes"]) == {"circle", "square", "triangle", "cross", "ring"}
    concept = json.loads((outputs / "train" / "concept_dict.json").read_text())
    names = {v["name"] for v in concept["latents"].values()}
    assert len(concept["latents"]) >= 10 and names & {"water", "grass", "sand", "sky", "brick"}
    # The example ranks candidates by effect size ([categorize] strength = "effect"): the target and
    # context lists are sorted by it; the evidence rule's bias list by its own effect (Cliff's delta).
    assert categorization["meta"]["categorize"]["strength"] == "effect"
    assert categorization["meta"]["bias_rule"] == "evidence"
    for info in categorization["classes"].values():
        for kind, field in (("target", "effect_size"), ("context", "effect_size"), ("bias", "effect")):
            sizes = [e[field] for e in info[kind]]
            assert sizes and sizes == sorted(sizes, reverse=True), (kind, sizes)


def _latent_aurocs(project_dir: Path, class_name: str, kind: str, attribute: str, value: str,
                   data_dir: Path | None = None) -> list[float]:
    """AUROC over the train split, for ``attribute == value`` (ground truth, not names), of each
    latent in one of a class's lists (``target``, ``context`` or ``bias``), in list order."""
    from conceptscope_cli.dictionary.sparse import LatentMatrix
    from conceptscope_cli.example.tiny_clip import auroc
    from conceptscope_cli.example.world import ground_truth
    from conceptscope_cli.project import Project

    project = Project.open(project_dir)
    outputs = project_dir / "outputs" / "world"
    data_dir = data_dir or project_dir / "data" / "world"
    categorization = json.loads((outputs / "train_concept_categorization.json").read_text())
    concept = json.loads((outputs / "train" / "concept_dict.json").read_text())
    with LatentMatrix(project.cache.lookup("latents", concept["meta"]["latents_entry"]).path / "latents.h5") as matrix:
        truth = ground_truth(data_dir, "train", attribute, value)[matrix.row_index]
        # an entry is a concept group: its activation is the sum of its members' (METHOD §Concept groups)
        return [auroc(sum(matrix.column(m) for m in e.get("members", [e["latent"]])), truth)
                for e in categorization["classes"][class_name][kind]]


@pytest.mark.parametrize("class_name, attribute, value", [("circle", "background", "water"),
                                                       ("cross", "co_object", "star"),
                                                       ("triangle", "background", "sand")])
def test_planted_biases_are_found(example: tuple[Path, CliResult, CliResult], class_name: str,
                                  attribute: str, value: str) -> None:
    """Issue 6 acceptance: for each planted (class, attribute) bias, some latent in the class's
    bias list detects the attribute with AUROC >= 0.9 over the train split (seed 0 measured:
    water 0.999, star 0.991, sand 0.938)."""
    project_dir, _, _ = example
    scores = _latent_aurocs(project_dir, class_name, "bias", attribute, value)
    print(f"{class_name} bias list, AUROC for {attribute}={value}:", [round(s, 3) for s in scores])
    assert scores and max(scores) >= 0.9, scores
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("class_name", ["circle", "square", "triangle", "cross", "ring"])
def test_each_class_has_a_target_that_detects_it(example: tuple[Path, CliResult, CliResult], class_name: str) -> None:
    """Issue 6 acceptance: some target latent of each class detects the class (AUROC >= 0.9 over
    the train split; seed 0 measured 0.924-1.000)."""
    project_dir, _, _ = example
    scores = _latent_aurocs(project_dir, class_name, "target", "class_name", class_name)
    print(f"{class_name} targets, class AUROC:", [round(s, 3) for s in scores])
    assert scores and max(scores) >= 0.9, scores


def test_sae_on_the_example_reconstructs_sparsely(example: tuple[Path, CliResult, CliResult]) -> None:
    from conceptscope_cli.project import Project

    project_dir, _, _ = example
    (entry,) = [e for e in Project.open(project_dir).cache.entries() if e.kind == "sae"]
    metrics = entry.record["stats"]["eval"]
    print("example SAE held-out metrics:", metrics)
    assert metrics["fvu"] < 0.1 and metrics["l0"] <= 16.0 + 1e-6 and metrics["dead_fraction"] < 0.5


def test_attribution_finds_the_class_object(example: tuple[Path, CliResult, CliResult]) -> None:
    """Images of crosses carrying the planted star: the prompt "a photo of a cross." ranks a
    latent that detects crosses (AUROC ≥ 0.8 over the balanced test split; the best cross
    detector among all 1,024 latents measured 0.84-0.89) among its top 5."""
    from conceptscope_cli.attribute.run import attribute
    from conceptscope_cli.dictionary.sparse import LatentMatrix
    from conceptscope_cli.example.tiny_clip import auroc
    from conceptscope_cli.example.world import ground_truth, load_metadata
    from conceptscope_cli.project import Project

    project_dir, _, _ = example
    project = Project.open(project_dir)
    world = project_dir / "data" / "world"
    picks = [r for r in load_metadata(world, "test") if r["class_name"] == "cross" and r["co_object"] == "star"][:3]
    result = attribute(project, [str(world / "test" / r["file_name"]) for r in picks], ["a photo of a cross."],
                       top_k=5, out_dir=project_dir / "outputs" / "attribute-test")
    concept = json.loads((project_dir / "outputs" / "world" / "test" / "concept_dict.json").read_text())
    with LatentMatrix(project.cache.lookup("latents", concept["meta"]["latents_entry"]).path / "latents.h5") as matrix:
        truth = ground_truth(world, "test", "class_name", "cross")[matrix.row_index]
        for image in result.images:
            top = image.prompts[0].top
            scores = [auroc(matrix.column(t.latent), truth) for t in top]
            print(image.image, [t.latent for t in top], [round(s, 3) for s in scores])
            assert max(scores) >= 0.8, scores
            assert Path(image.figure).is_file()


def test_faithful_ranking_beats_random_on_the_example(example: tuple[Path, CliResult, CliResult]) -> None:
    """Deleting each image's top latents by attribution lowers y = cos(image, its class prompt)
    faster than deleting random active latents (smaller area under the deletion curve)."""
    import dataclasses

    from conceptscope_cli.ablate.faithfulness import faithfulness
    from conceptscope_cli.config.sections import AblateConfig
    from conceptscope_cli.project import Project

    project_dir, _, _ = example
    project = Project.open(project_dir)
    config = dataclasses.replace(project.manifest.get(AblateConfig), max_images=30, n_deletions=10,
                                 rankings=["attribution", "activation", "random"])
    result = faithfulness(project, None, "test", config=config)
    areas = {r: result.area(r) for r in ("attribution", "activation", "random")}
    print("deletion areas on the example:", areas)
    assert areas["attribution"] < areas["random"] - 0.05
    assert result.plot_path.is_file()


def test_bias_ablation_on_the_example(example: tuple[Path, CliResult, CliResult]) -> None:
    """Zeroing each planted-bias class's bias concepts versus as many random context latents.

    Measured (seed 0, evidence bias rule): zeroing the bias concepts lowers the class's train
    accuracy by 0.408 (circle), 0.025 (square), 0.000 (triangle), 0.083 (cross), 0.004 (ring);
    one draw of as many random context latents changes none (0.000). What must hold: the bias
    drop is never much below the random drop, and the edit acts (some class's accuracy moves)."""
    import dataclasses

    from conceptscope_cli.ablate.classes import class_ablation
    from conceptscope_cli.config.sections import AblateConfig
    from conceptscope_cli.project import Project

    project_dir, _, _ = example
    project = Project.open(project_dir)
    config = dataclasses.replace(project.manifest.get(AblateConfig), ks=[1], random_repeats=1, batch_size=64)
    result = class_ablation(project, None, "train", config=config)
    contrast = result.bias_vs_random()
    print("bias vs random context drops:", contrast)
    for name in ("circle", "triangle"):
        bias_drop, random_drop = contrast[name]
        assert bias_drop >= random_drop - 0.02
    assert max(bias for bias, _ in contrast.values()) > 0.05  # zeroing latents changes predictions
    assert result.classes["circle"].accuracy["spliced"] == result.classes["circle"].accuracy["unspliced"]


def test_amplifying_a_water_latent_raises_similarity_to_water(example: tuple[Path, CliResult, CliResult]) -> None:
    from conceptscope_cli.ablate.edit import edit
    from conceptscope_cli.dictionary.sparse import LatentMatrix
    from conceptscope_cli.example.tiny_clip import auroc
    from conceptscope_cli.example.world import ground_truth, load_metadata
    from conceptscope_cli.project import Project

    project_dir, _, _ = example
    project = Project.open(project_dir)
    world = project_dir / "data" / "world"
    concept = json.loads((project_dir / "outputs" / "world" / "test" / "concept_dict.json").read_text())
    with LatentMatrix(project.cache.lookup("latents", concept["meta"]["latents_entry"]).path / "latents.h5") as matrix:
        truth = ground_truth(world, "test", "background", "water")[matrix.row_index]
        valid = [int(k) for k in concept["latents"]]
        water = max(valid, key=lambda k: auroc(matrix.column(k), truth))
    picks = [r for r in load_metadata(world, "test") if r["background"] == "grass"][:2]
    result = edit(project, [str(world / "test" / r["file_name"]) for r in picks], [water], scale=2.0, value=None,
                  patches=None, prompts=["a photo of water.", "a photo of grass."],
                  out_dir=project_dir / "outputs" / "edit-test")
    for image in result.images:
        water_prompt = image.prompts[0]
        assert water_prompt.similarity_after > water_prompt.similarity_before, water_prompt
        assert Path(image.figure).is_file()


def test_two_torchrun_processes_reproduce_the_example(example: tuple[Path, CliResult, CliResult], tmp_path: Path) -> None:
    """extract, dict and categorize on 2 gloo ranks give the single-process example's data.

    A second project over the same world, pinned to the example's SAE (`[dict] sae`): cache
    keys differ (other paths), contents must not."""
    import os
    import shutil

    from helpers import assert_same_h5, torchrun

    project_dir, _, _ = example
    # The SAE the example's dictionary was made with (other tests sharing this project's cache may
    # have trained more: SAE-seed twins and replicates).
    meta = json.loads((project_dir / "outputs" / "world" / "train" / "concept_dict.json").read_text())["meta"]
    sae = project_dir / ".cscope" / "cache" / "sae" / meta["sae_entry"] / "sae.safetensors"
    assert sae.is_file(), sae
    twin = tmp_path / "twin"
    twin.mkdir()
    os.symlink(project_dir / "data", twin / "data")
    manifest = (project_dir / "cscope.toml").read_text()
    assert "\n[dict]\n" in manifest
    # source = "cache": the twin extracts the activations under torchrun too (auto would stream images)
    (twin / "cscope.toml").write_text(manifest.replace("\n[dict]\n", f'\n[dict]\nsae = "{sae.parent}"\nsource = "cache"\n'))
    run = torchrun(["categorize"], twin, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr

    def entry(root: Path, kind: str) -> Path:
        """The train split's entry of this kind behind root's concept dictionary."""
        dict_meta = json.loads((root / "outputs" / "world" / "train" / "concept_dict.json").read_text())["meta"]
        return root / ".cscope" / "cache" / kind / dict_meta[f"{kind}_entry"]

    for kind, files in (("activations", ["activations.h5"]), ("latents", ["latents.h5", "stats.h5"])):
        for name in files:
            assert_same_h5(entry(project_dir, kind) / name, entry(twin, kind) / name)
    one, two = project_dir / "outputs" / "world", twin / "outputs" / "world"
    for name in ("train_concept_categorization.json", "train_alignment_scores.json", "train/concept_dict.json",
                 "train/latent_stats.json", "train/valid_latents.json"):
        left, right = json.loads((one / name).read_text()), json.loads((two / name).read_text())
        left.pop("meta"), right.pop("meta")  # entry keys and the SAE's path differ by construction
        assert left == right, name
    shutil.rmtree(twin / ".cscope")


def test_bias_discovery_evaluation_on_the_balanced_test_split(example: tuple[Path, CliResult, CliResult]) -> None:
    """`cscope categorize --evaluate`: precision@k of the planted contexts on the test split
    (REFERENCE §5), written beside the categorization and printed."""
    project_dir, _, _ = example
    result = run_cli(["categorize", "--evaluate"], project_dir, timeout=600)
    assert result.exit_code == 0, result.output
    assert "bias discovery precision@10 on test" in result.stdout
    report = json.loads((project_dir / "outputs" / "world" / "train_bias_discovery.json").read_text())
    print("bias discovery on the example:", report["precision_at_k"], report["per_context"])
    assert report["meta"]["evaluate_split"] == "test" and report["meta"]["k"] == 10
    assert report["pairs"] and all(0.0 <= p["precision"] <= 1.0 for p in report["pairs"])
    assert report["precision_at_k"] >= 0.95, report["per_context"]  # issue 15: stays >= 0.95
    # circle's water latent ranks water images first among the other classes' test images
    water = [p for p in report["pairs"] if p["bias_class"] == "circle"]
    assert water and max(p["precision"] for p in water) >= 0.9, water


def test_world_biases_benchmark_scores_the_example_as_the_acceptance_tests_do(
        example: tuple[Path, CliResult, CliResult]) -> None:
    """benchmarks/world_biases.py score: the figures METHOD quotes for other worlds agree with this
    file's own scoring of the example (per claim, per planted bias, per target) and the SAE's
    ceiling bounds every list's best entry that is a single latent."""
    project_dir, _, _ = example
    rows = load_benchmark("world_biases").score(project_dir, None)
    data, biases, classes = _world({0: project_dir})
    planted = {b["class"]: b for b in biases}
    false_total = 0
    for name in classes:
        row = rows[name]
        targets = _latent_aurocs(project_dir, name, "target", "class_name", name)
        assert row["best_target"] == pytest.approx(max(targets))
        assert row["ceiling_class"] >= max(targets) - 1e-12  # the example's lists hold single latents
        if name in planted:
            b = planted[name]
            scores = _latent_aurocs(project_dir, name, "bias", b["attribute"], b["value"], data)
            assert row["best_claim"] == {f"{b['attribute']}={b['value']}": pytest.approx(max(scores))}
            assert row["false"] == sum(a < 0.8 for a in scores)
        else:
            assert row["false"] == row["claims"] == len(_categorization(project_dir)["classes"][name]["bias"])
        false_total += row["false"]
    summary = rows["summary"]
    assert summary["false"] == false_total and summary["planted"] == len(biases) == 3
    assert summary["planted_found"] == 3  # test_planted_biases_are_found holds at seed 0
    ranking = _categorization(project_dir)["ranking"]
    assert summary["biased_rank_first"] == (max(ranking.index(c) for c in planted)
                                            < min(ranking.index(c) for c in classes if c not in planted))


# --------------------------------------------------------------------------------------------
# Issue 15 acceptance, seeds 0, 1, 2 of [project] seed: ground truth of the world's planted biases
# --------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2)
# The strict xfails below are unmet #15 acceptance items, measured on the example as configured
# (latent-level categorization, base_rate = "typical") under portable numerics at d69aa52; strict,
# so the test fails the day they are met and the mark must go.


@pytest.fixture(scope="module")
def seeds(example: tuple[Path, CliResult, CliResult], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Seed 0 is the example project; seeds 1 and 2 are twins that read the same world (same
    path, so the same dataset fingerprint) and share its cache: only train, dict and
    categorize run again (the activations are reused). The twins run at the same time, one
    process each (the cache serialises writers of one key; each twin's own entries differ
    by seed): on 2 cores with one thread per process that halves this fixture's wall time."""
    from concurrent.futures import ThreadPoolExecutor

    project_dir, _, _ = example
    root = tmp_path_factory.mktemp("seeds")
    out = {0: project_dir}
    manifest = (project_dir / "cscope.toml").read_text()
    assert "\nseed = 0\n" in manifest and 'path = "data/world"' in manifest
    cache = project_dir / ".cscope" / "cache"
    for seed in SEEDS[1:]:
        twin = root / f"seed{seed}"
        twin.mkdir()
        text = manifest.replace("\nseed = 0\n", f'\nseed = {seed}\ncache_dir = "{cache}"\n')
        # every project-relative path of the world (data, vocabulary) points at seed 0's copy
        (twin / "cscope.toml").write_text(text.replace('"data/world', f'"{project_dir / "data" / "world"}'))
        out[seed] = twin
    twins = [out[seed] for seed in SEEDS[1:]]
    with ThreadPoolExecutor(len(twins)) as pool:  # each thread waits on its own `cscope` subprocess
        results = list(pool.map(lambda twin: run_cli(["categorize"], twin, env=PORTABLE, timeout=1200), twins))
    for twin, result in zip(twins, results):
        assert result.exit_code == 0, (twin.name, result.output)
    return out


def _world(seeds: dict[int, Path]) -> tuple[Path, list[dict], list[str]]:
    data = seeds[0] / "data" / "world"
    world = json.loads((data / "world.json").read_text())
    return data, world["config"]["biases"], list(world["config"]["classes"])


def _categorization(project_dir: Path) -> dict:
    return json.loads((project_dir / "outputs" / "world" / "train_concept_categorization.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_every_planted_bias_is_found(seeds: dict[int, Path], seed: int) -> None:
    """Every planted (class, attribute = value) of world.json is detected (AUROC >= 0.9 over the
    split) by a concept of that class's bias list."""
    data, biases, _ = _world(seeds)
    for bias in biases:
        scores = _latent_aurocs(seeds[seed], bias["class"], "bias", bias["attribute"], bias["value"], data)
        print(seed, bias["class"], bias["value"], [round(x, 3) for x in scores])
        assert scores and max(scores) >= 0.9, (seed, bias, scores)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.xfail(
    strict=True, reason="measured (portable numerics, d69aa52): seed 1's best target latents reach AUROC 0.853 for "
    "circles and 0.898 for crosses, and no latent of that SAE detects crosses above 0.898 (benchmarks/world_biases.py "
    "score: the ceiling, docs/METHOD.md)")),
    pytest.param(2, marks=pytest.mark.xfail(
        strict=True, reason="measured (portable numerics, d69aa52): seed 2's circle targets reach AUROC 0.727 (the "
        "SAE's best circle latent, 0.946, is uncertain)")),
])
def test_every_class_has_a_target_that_detects_it(seeds: dict[int, Path], seed: int) -> None:
    _, _, classes = _world(seeds)
    for name in classes:
        scores = _latent_aurocs(seeds[seed], name, "target", "class_name", name, _world(seeds)[0])
        assert scores and max(scores) >= 0.9, (seed, name, scores)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.xfail(strict=True, reason="measured (portable numerics, d69aa52), latent level: square and ring (no "
                   "planted bias) report 16 and 15 bias latents at seed 0 (15 and 13 at seed 1, 12 and 10 at seed 2), and "
                   "of the biased classes' claims 5/17 (circle), 10/15 (triangle), 16/17 (cross) at seed 0 detect no "
                   "planted attribute at AUROC 0.8: latents of this ViT's last block mix class and context; "
                   "docs/METHOD.md §Categorization")
def test_every_reported_bias_is_planted_and_unbiased_classes_report_none(seeds: dict[int, Path], seed: int) -> None:
    """Precision: every reported bias of a class detects one of its planted attributes (AUROC >=
    0.8); classes without a planted bias report no bias; biased classes rank above unbiased ones."""
    data, biases, classes = _world(seeds)
    project = seeds[seed]
    categorization = _categorization(project)
    planted = {b["class"] for b in biases}
    failures = []
    for name in classes:
        reported = categorization["classes"][name]["bias"]
        if name not in planted:
            if reported:
                failures.append((name, [(e["latent"], e["name"], round(e["effect"], 2)) for e in reported]))
            continue
        best = np.max([_latent_aurocs(project, name, "bias", b["attribute"], b["value"], data)
                       for b in biases if b["class"] == name], axis=0)
        failures.extend((name, e["latent"], round(float(a), 3)) for e, a in zip(reported, best) if a < 0.8)
    ranking = categorization["ranking"]
    assert not failures, failures
    assert max(ranking.index(c) for c in planted) < min(ranking.index(c) for c in classes if c not in planted), ranking


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_recorded_similarities_perturbed_by_0005_move_no_default_decision(seeds: dict[int, Path], seed: int) -> None:
    """Issue 15: the example's own per-image similarities (every class), each perturbed by seeded
    uniform noise in [-0.005, 0.005], 10 draws: the default decision (robust estimator, uncertain
    when the bootstrap CI of A' contains the threshold) keeps every class's target / context sets;
    the reference estimator's change (so the test can fail). Measured under portable numerics: robust
    0 changes at seeds 0, 1, 2, reference 15, 18, 17. Before, which seeds kept every set depended on
    the machine (a decision by thresholds has inputs within any perturbation of its boundary,
    docs/METHOD.md §Categorization): 4 of seed 2's draws changed on one machine, 8 of seed 0's on another."""
    from conceptscope_cli.categorize import scores as S

    changed = {"robust": 0, "reference": 0}
    project = seeds[seed]
    meta = _categorization(project)["meta"]["categorize"]
    target, n_boot = float(meta["target_threshold"]), int(meta["bootstrap"])
    for y, path in enumerate(sorted((project / "outputs" / "world" / "train" / "categorize").glob("class_*.json"))):
        sims = json.loads(path.read_text())["similarities"]
        lat = np.asarray(sims["candidates"])
        clean = [np.asarray(sims[k], dtype=np.float64) for k in ("original", "sufficiency", "necessity")]

        def split(values: list[np.ndarray], estimator: str, lat: np.ndarray = lat, y: int = y) -> tuple:
            cats = S.categorize_class(lat, S.alignment(*values, estimator), np.zeros(len(lat)), target, 0.5)
            if estimator == "robust":  # the stage's default decision, with its seed
                ci = S.alignment_bootstrap(*values, estimator=estimator, seed=seed + y, n_boot=n_boot)
                cats = S.mark_uncertain(cats, ci["normalised_low"], ci["normalised_high"])
            return frozenset(cats.target), frozenset(cats.context)

        base = {estimator: split(clean, estimator) for estimator in changed}
        for draw in range(10):
            rng = np.random.default_rng([seed, draw])
            noisy = [v + rng.uniform(-0.005, 0.005, v.shape) for v in clean]
            for estimator in changed:
                changed[estimator] += split(noisy, estimator) != base[estimator]
    print(f"seed {seed}: target/context changes over 5 classes x 10 draws:", changed)
    assert changed["reference"] > 0
    assert changed["robust"] == 0


@pytest.mark.slow
def test_context_only_check_with_the_worlds_object_boxes(example: tuple[Path, CliResult, CliResult],
                                                        tmp_path: Path) -> None:
    """Issue 15: with `object_box_column`, every whole-image bias claim is measured again without
    its object (METHOD §Categorization, "Context-only check"). Same SAE, same candidates, same
    evidence: the check sees exactly the seed-0 claims, keeps those that hold without the object
    and moves the others to `entangled`. Measured at seed 0: 79 claims, 19 kept; square and ring
    29 -> 1; circle keeps water detectors (AUROC 1.00), cross its star (0.99); triangle keeps
    only sand detectors at 0.84 (its best ones fire only next to an object)."""
    project = example[0]
    data, biases, classes = _world({0: project})
    manifest = (project / "cscope.toml").read_text()
    anchor = 'attribute_columns = ["background", "object_color", "object_texture", "co_object"]\n'
    assert anchor in manifest
    text = manifest.replace(anchor, anchor + 'object_box_column = "object_box"\n')
    text = text.replace("\nseed = 0\n", f'\nseed = 0\ncache_dir = "{project / ".cscope" / "cache"}"\n')
    (tmp_path / "cscope.toml").write_text(text.replace('"data/world', f'"{data}'))
    result = run_cli(["categorize"], tmp_path, timeout=1200)
    assert result.exit_code == 0, result.output
    moved = "context-only check (object_box): {} of {} whole-image claims"
    written = (tmp_path / "outputs" / "world" / "train_concept_categorization.json").stat().st_mtime_ns
    again = run_cli(["categorize"], tmp_path, timeout=600)  # unchanged inputs: a no-op, the check included
    assert again.exit_code == 0 and "up to date" in again.output, again.output
    assert (tmp_path / "outputs" / "world" / "train_concept_categorization.json").stat().st_mtime_ns == written
    whole, checked = _categorization(project), _categorization(tmp_path)
    meta = checked["meta"]["context_check"]
    n_claims = sum(len(info["bias"]) for info in whole["classes"].values())
    assert meta["column"] == "object_box" and meta["n_claims"] == n_claims > 0
    assert moved.format(meta["n_entangled"], n_claims) in result.output, result.output
    assert meta["no_box"] == 0 and meta["n_images"] == 5 * 128
    for name, info in checked["classes"].items():
        kept, moved = {e["latent"] for e in info["bias"]}, {e["latent"] for e in info["entangled"]}
        assert kept | moved == {e["latent"] for e in whole["classes"][name]["bias"]} and not kept & moved, name
        for e in info["bias"]:
            c = e["context_only"]
            assert c["survives"] and c["effect"] >= checked["meta"]["evidence"]["min_effect"] and c["effect_low"] > 0
        assert all(not e["context_only"]["survives"] for e in info["entangled"])
        assert info["evidence"]["n_bias"] == len(info["bias"]) and info["evidence"]["n_entangled"] == len(moved)
    unbiased = [c for c in classes if c not in {b["class"] for b in biases}]
    before = sum(len(whole["classes"][c]["bias"]) for c in unbiased)
    after = sum(len(checked["classes"][c]["bias"]) for c in unbiased)
    print("unbiased classes' claims, whole images -> context-only:", before, "->", after, meta)
    assert after <= before / 4
    for bias in biases:
        if bias["class"] == "triangle":
            continue  # measured: no sand detector >= 0.9 survives (the docstring)
        scores = _latent_aurocs(tmp_path, bias["class"], "bias", bias["attribute"], bias["value"], data)
        assert scores and max(scores) >= 0.9, (bias, scores)


def test_concept_groups_on_the_example(example: tuple[Path, CliResult, CliResult]) -> None:
    """Issue 15 item 3 on the example (seed 0 measured: 360 valid latents -> 260 groups; the 73
    latents named "water" -> 55 groups, circle's 16 "water" context latents -> 10 in the old
    latent lists): latents split from one concept share groups, and no group holds both a
    detector of a planted bias attribute and a detector of its class (ground truth, not names).
    The example categorizes latents (`[dict] group_latents = false`, templates/example.toml says
    why), so the dict stage's own grouping is run here on the example's latents."""
    from conceptscope_cli.dictionary.group_file import describe_groups
    from conceptscope_cli.dictionary.groups import DEFAULT_THRESHOLD
    from conceptscope_cli.dictionary.latents import load_stats
    from conceptscope_cli.dictionary.sparse import LatentMatrix
    from conceptscope_cli.example.tiny_clip import auroc
    from conceptscope_cli.example.world import ground_truth
    from conceptscope_cli.project import Project

    project_dir, _, _ = example
    out = project_dir / "outputs" / "world" / "train"
    concept = json.loads((out / "concept_dict.json").read_text())
    valid = sorted(int(k) for k in concept["latents"])
    project = Project.open(project_dir)
    entry = project.cache.lookup("latents", concept["meta"]["latents_entry"]).path
    with LatentMatrix(entry / "latents.h5") as matrix:
        groups = describe_groups(matrix, np.asarray(valid), enabled=True, threshold=DEFAULT_THRESHOLD,
                                 top_positions=load_stats(entry / "stats.h5")["top_positions"], decoder=None,
                                 names={k: concept["latents"][str(k)]["name"] for k in valid})
    assert len(groups) < len(valid)
    of = {m: g.id for g in groups for m in g.members}
    for name in ("water", "sand"):
        named = [k for k in valid if concept["latents"][str(k)]["name"] == name]
        print(f"latents named {name!r}: {len(named)} -> {len({of[k] for k in named})} groups")
        assert len({of[k] for k in named}) < len(named)
    data = project_dir / "data" / "world"
    with LatentMatrix(project.cache.lookup("latents", concept["meta"]["latents_entry"]).path / "latents.h5") as matrix:
        columns = {k: matrix.column(k) for k in valid}
        rows = matrix.row_index
    for class_name, attribute, value in (("circle", "background", "water"), ("cross", "co_object", "star"),
                                         ("triangle", "background", "sand")):
        is_attr = ground_truth(data, "train", attribute, value)[rows]
        is_class = ground_truth(data, "train", "class_name", class_name)[rows]
        attr = {k: auroc(columns[k], is_attr) for k in valid}
        cls = {k: auroc(columns[k], is_class) for k in valid}
        for g in groups:
            pure_attr = [k for k in g.members if attr[k] >= 0.9 and cls[k] < 0.7]
            pure_class = [k for k in g.members if cls[k] >= 0.9 and attr[k] < 0.7]
            assert not (pure_attr and pure_class), (class_name, value, g.members, pure_attr, pure_class)
        best_attr, best_class = max(valid, key=attr.__getitem__), max(valid, key=cls.__getitem__)
        assert of[best_attr] != of[best_class], (class_name, value, best_attr, best_class)


def test_readme_example_figures_are_current(example: tuple[Path, CliResult, CliResult]) -> None:
    """The README's example block is what `python -m conceptscope_cli.pipeline.figures` computes from
    this run: a change of the method fails here until the README is regenerated (`--write`)."""
    from conceptscope_cli.pipeline.figures import example_figures, readme_block, render

    project_dir, _, _ = example
    assert readme_block(Path(__file__).resolve().parents[1] / "README.md") == render(example_figures(project_dir))
