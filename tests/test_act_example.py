"""Issue 18 acceptance on the embedded example: `cscope groups`, `cscope check-model` and
`cscope diff` measured against the world's ground truth (planted biases: circle-water,
cross-star, triangle-sand in train; a balanced test split). Shares the session `example` run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import CliResult, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("portable_numerics")]

PLANTED = [("circle", "background", "water"), ("cross", "co_object", "star"), ("triangle", "background", "sand")]
Example = tuple[Path, CliResult, CliResult]


_GROUPED: set[tuple[Path, str]] = set()


def _groups(project: Path, split: str) -> tuple[dict, object]:
    """`cscope groups --split SPLIT` (once per session: a re-run is a no-op), then its outputs."""
    import pandas as pd

    folder = project / "outputs" / "world" / split / "groups"
    if (project, split) not in _GROUPED:
        _GROUPED.add((project, split))
        result = run_cli(["groups", "--split", split], project, timeout=600)
        assert result.exit_code == 0, result.output
        assert "y∧c aligned" in result.stdout and "balanced subset" in result.stdout
    return json.loads((folder / "groups.json").read_text()), pd.read_parquet(folder / "groups.parquet")


def _truth(project: Path, split: str, attribute: str, value: str, row_index: np.ndarray) -> np.ndarray:
    from conceptscope_cli.example.world import ground_truth

    return ground_truth(project / "data" / "world", split, attribute, value)[row_index]


def _agreement(frame, key: str, truth: np.ndarray) -> list[float]:
    present = frame[f"{key}:present"].to_numpy()
    labels = frame["label"].to_numpy()
    return [float((present[labels == y] == truth[labels == y]).mean()) for y in np.unique(labels)]


@pytest.mark.parametrize("class_name, attribute, value", PLANTED)
def test_concept_present_agrees_with_the_world(example: Example, class_name: str, attribute: str, value: str) -> None:
    """For each planted bias, some claim of the class has 'concept present' equal to the true attribute on
    ≥ 90% of every class's train images. A claim on one latent stands for the latents firing with it
    (act/concepts.py); seed 0 under portable numerics (helpers.PORTABLE: the same bits on any x86-64 CPU
    with AVX2), measured (minimum over the five classes): water 0.992 (#209+11), sand 1.000 (#267+7),
    star 0.900, at the bar (#3 alone; rings: 216 of 240, its latent fires on some star-free rings).
    Before portable numerics the star claim was machine-dependent: 0.900 on one machine, 0.879 on another."""
    project, _, _ = example
    summary, frame = _groups(project, "train")
    truth = _truth(project, "train", attribute, value, frame["row_index"].to_numpy())
    scores = {c["key"]: _agreement(frame, c["key"], truth) for c in summary["claims"] if c["class"] == class_name}
    print(f"{class_name}-{value}: per-class agreement", {k: [round(v, 3) for v in s] for k, s in scores.items()})
    assert scores and max(min(s) for s in scores.values()) >= 0.9


def test_group_files_round_trip_and_weights_balance_exactly(example: Example) -> None:
    import pandas as pd

    project, _, _ = example
    summary, frame = _groups(project, "train")
    folder = project / "outputs" / "world" / "train" / "groups"
    from_csv = pd.read_csv(folder / "groups.csv")
    assert list(from_csv.columns) == list(frame.columns) and len(from_csv) == len(frame) == 1200
    for column in frame.columns:
        if frame[column].dtype.kind == "f":
            assert np.array_equal(from_csv[column].to_numpy(), frame[column].to_numpy()), column
        else:
            assert from_csv[column].astype(str).tolist() == frame[column].astype(str).tolist(), column
    labels = frame["label"].to_numpy()
    for claim in summary["claims"]:
        key = claim["key"]
        group, weight, present = (frame[f"{key}:{c}"].to_numpy() for c in ("group", "weight", "present"))
        assert np.array_equal(group, 2 * labels + present)
        assert claim["roles"]["aligned"] == int(((labels == claim["label"]) & present).sum())
        for y in np.unique(labels):
            sums = [weight[(labels == y) & (group == g)].sum() for g in np.unique(group[labels == y])]
            assert np.allclose(sums, sums[0]) and np.isclose(sum(sums), (labels == y).sum())
    manifest = pd.read_csv(folder / "manifest.csv")
    assert list(manifest.columns) == ["path", "label", "group", "weight"]
    assert manifest["path"].map(lambda p: Path(p).is_file()).all()
    assert np.array_equal(manifest["label"].to_numpy(), labels)
    for y in np.unique(labels):
        mine = manifest[manifest["label"] == y]
        sums = mine.groupby("group")["weight"].sum().to_numpy()
        assert np.allclose(sums, sums[0])
    subset = pd.read_csv(folder / "balanced_subset.csv")
    counts = subset.groupby(["label", "group"]).size()
    for y in subset["label"].unique():
        assert counts[y].nunique() == 1  # every group of a class equally represented
    assert sum(g["n"] for g in summary["manifest"]["groups"].values()) == 1200


def _check(project: Path, *args: str) -> dict:
    result = run_cli(["check-model", *args], project, timeout=900)
    assert result.exit_code == 0, result.output
    assert "verdict" in result.stdout
    path = Path(result.stdout.split("wrote")[-1].split()[0])
    return json.loads(path.read_text())


def _planted_claims(project: Path) -> dict[str, list[str]]:
    """Claims of each planted class whose concept detects the planted attribute (AUROC ≥ 0.9 over train),
    the best detector first."""
    from conceptscope_cli.example.tiny_clip import auroc

    summary, frame = _groups(project, "train")
    found = {}
    for class_name, attribute, value in PLANTED:
        truth = _truth(project, "train", attribute, value, frame["row_index"].to_numpy())
        scores = {c["key"]: auroc(frame[f"{c['key']}:activation"].to_numpy(), truth)
                  for c in summary["claims"] if c["class"] == class_name}
        found[class_name] = sorted((k for k, v in scores.items() if v >= 0.9), key=lambda k: -scores[k])
    return found


def test_probe_on_the_example_learns_the_shape(example: Example) -> None:
    """Why the example's probe hardly leans on its planted biases: 12-15% of train's circles, crosses and
    triangles are counter-examples and the large shapes are linearly decodable from the mean-pooled
    features, so the probe learns the shape. Seed 0 measured: hold-out 0.983, balanced test 0.972;
    aligned vs conflicting accuracy water 1.000 (20) vs 0.988 (80), sand 1.000 (20) vs 0.975 (80),
    star 1.000 (26) vs 0.892 (74), gap +0.108 [+0.014, +0.243] at level 0.9994 ("relies on it", but
    8 errors from "no evidence"; the robust case is `test_probe_leans_on_a_shortcut_the_zero_shot_does_not`)."""
    project, _, _ = example
    report = _check(project, "--model", "probe")
    assert report["meta"]["split"] == "test" and report["meta"]["model"]["kind"] == "probe"
    assert report["accuracy"] >= 0.95 and min(report["meta"]["model"]["holdout_accuracy"].values()) >= 0.95
    planted = {k for keys in _planted_claims(project).values() for k in keys}
    print("probe gaps of the planted claims:", {b["claim"]: (b["gap"]["gap"], b["gap"]["low"], b["verdict"])
                                                for b in report["biases"] if b["claim"] in planted})
    assert planted and not [b for b in report["biases"] if b["claim"] in planted and b["verdict"] == "better without it"]


SHORTCUT = {"circle": "water", "square": "grass", "triangle": "sand", "cross": "sky", "ring": "brick"}


def _shortcut_project(example_project: Path, root: Path) -> Path:
    """A constructed case: the example world's train images whose background is their class's
    (circle-water, square-grass, triangle-sand, cross-sky, ring-brick: the background alone predicts
    the label, 529 images), the balanced test split unchanged, the example's SAE pinned."""
    import shutil

    from conceptscope_cli.project import Project

    categorization = json.loads((example_project / "outputs" / "world" / "train_concept_categorization.json").read_text())
    sae = Project.open(example_project).cache.lookup("sae", categorization["meta"]["sae_entry"])
    assert sae is not None
    project = root / "shortcut"
    world, source = project / "data" / "world", example_project / "data" / "world"
    (world / "train").mkdir(parents=True)
    shutil.copytree(source / "test", world / "test")
    for name in ("vocabulary.txt", "world.json"):
        shutil.copy(source / name, world / name)
    rows = [json.loads(line) for line in (source / "train" / "metadata.jsonl").read_text().splitlines() if line]
    kept = [r for r in rows if SHORTCUT[r["class_name"]] == r["background"]]
    for r in kept:
        shutil.copy(source / "train" / r["file_name"], world / "train" / r["file_name"])
    (world / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    manifest = (example_project / "cscope.toml").read_text()
    assert "\n[dict]\n" in manifest
    (project / "cscope.toml").write_text(manifest.replace("\n[dict]\n", f"\n[dict]\nsae = {json.dumps(str(sae.path))}\n", 1))
    return project


def test_probe_leans_on_a_shortcut_the_zero_shot_does_not(example: Example, tmp_path: Path) -> None:
    """Constructed case: on a train split where the background predicts the label, the probe cscope trains
    leans on it (balanced test: aligned-minus-conflicting gap with a simultaneous CI far above 0), the
    zero-shot tiny CLIP (trained on an unbiased world) on none of the same groups. Seed 0 measured:
    probe accuracy 0.454; cross <- sky 1.000 (20) vs 0.062 (80), +0.938 [+0.834, +1.000]; ring <- brick
    +0.938 [+0.709, +1.000]; square <- grass +0.812 [+0.637, +0.938]; zero-shot accuracy 0.982, no gap."""
    from conceptscope_cli.example.tiny_clip import auroc

    project = _shortcut_project(example[0], tmp_path)
    categorized = run_cli(["categorize"], project, timeout=900)
    assert categorized.exit_code == 0, categorized.output
    probe, zeroshot = _check(project, "--model", "probe"), _check(project, "--model", "zeroshot")
    summary, frame = _groups(project, "test")
    rows = frame["row_index"].to_numpy()
    shortcut = set()  # claims whose concept is the class's shortcut background (AUROC >= 0.9 on test)
    for claim in summary["claims"]:
        truth = _truth(project, "test", "background", SHORTCUT[claim["class"]], rows)
        if auroc(frame[f"{claim['key']}:activation"].to_numpy(), truth) >= 0.9:
            shortcut.add(claim["key"])
    gaps = {b["claim"]: b["gap"] for b in probe["biases"] if b["claim"] in shortcut}
    print("probe gaps of the shortcut claims:", {k: (round(g["gap"], 3), round(g["low"], 3)) for k, g in gaps.items()})
    assert probe["accuracy"] < 0.7 < 0.95 < zeroshot["accuracy"]
    leaning = {k.split("/")[0] for k, g in gaps.items() if g["low"] is not None and g["low"] >= 0.5}
    assert len(leaning) >= 3, gaps  # measured: cross, ring, square (lower bounds 0.64-0.83)
    for bias in zeroshot["biases"]:
        assert bias["verdict"] in ("no evidence", "n/a (empty group)"), (bias["claim"], bias["gap"])


def test_zero_shot_of_the_unbiased_tiny_clip_shows_no_gap(example: Example) -> None:
    project, _, _ = example
    report = _check(project, "--model", "zeroshot")
    assert report["accuracy"] > 0.9
    for bias in report["biases"]:
        gap = bias["gap"]
        if gap["gap"] is None:  # a group without images: no gap, no verdict
            assert bias["verdict"] == "n/a (empty group)" and 0 in (gap["n_aligned"], gap["n_conflicting"])
            continue
        assert gap["low"] <= 0 <= gap["high"], bias["claim"]
        assert bias["verdict"] == "no evidence"


CONSTANT = """
import torch


class Constant(torch.nn.Module):
    def __init__(self, label: int, n: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.tensor(label), n).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + 0 * x.mean()


def circle():
    model = Constant(0, 5)
    import torchvision.transforms as T
    model.preprocess = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])
    return model


def three_classes():
    return Constant(0, 3)
"""


def test_user_models_torchscript_and_entry_point(example: Example, tmp_path: Path) -> None:
    """Constant classifiers make every group's accuracy known: 1 on the predicted class's images, 0 elsewhere."""
    import torch

    project, _, _ = example
    (project / "my_models.py").write_text(CONSTANT)
    import importlib.util

    spec = importlib.util.spec_from_file_location("my_models", project / "my_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    torch.jit.save(torch.jit.script(module.Constant(1, 5)), str(tmp_path / "square.pt"))

    scripted = _check(project, "--model-file", str(tmp_path / "square.pt"), "--image-size", "32",
                      "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25")
    entry = _check(project, "--entry-point", "my_models:circle")
    for report, predicted in ((scripted, "square"), (entry, "circle")):
        assert report["accuracy"] == pytest.approx(0.2)  # 100 of 500 balanced test images
        for bias in report["biases"]:
            for name, group in bias["groups"].items():
                assert group["accuracy"] == (1.0 if name.split("∧")[0] == predicted else 0.0), (name, group)

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00 definitely not torchscript")
    for args, message in (
        (["--model-file", str(bad)], "is not a TorchScript file"),
        (["--entry-point", "nowhere.at_all:make"], "could not import 'nowhere.at_all'"),
        (["--entry-point", "my_models:three_classes"], "gives 3 class scores, the dataset has 5 classes"),
    ):
        result = run_cli(["check-model", *args], project, timeout=600)
        assert result.exit_code == 1 and message in result.stderr, result.output
        assert "Traceback" not in result.output


def test_diff_train_vs_balanced_test_reports_the_planted_biases_gone(example: Example) -> None:
    """`cscope diff train test`: categorized with the same SAE, the planted biases are gone or weaker."""
    project, _, _ = example
    categorized = run_cli(["categorize", "--split", "test"], project, timeout=900)
    assert categorized.exit_code == 0, categorized.output
    out = project / "outputs" / "diff-train-test.json"
    result = run_cli(["diff", "train", "test", "--out", str(out)], project, timeout=600)
    assert result.exit_code == 0, result.output
    rows = {f"{r['class']}/{r['concept']}": r for r in json.loads(out.read_text())["biases"]}
    planted = _planted_claims(project)
    print("train -> test:", {k: rows[k]["status"] for keys in planted.values() for k in keys})
    # A planted bias whose class lists no concept detecting it (AUROC >= 0.9) cannot be followed (today: sand).
    assert any(planted.values()), planted
    for keys in planted.values():
        # the claim whose concept is the planted attribute (its best detector); seed 0 measured with the earlier
        # recipe: water g217 shrank (-0.58 [-0.83, -0.33]), star g1 vanished (-0.69), sand g27 vanished (-0.77);
        # today: water g62 shrank, g291 vanished, star g1 vanished. Latents that fire on triangle ∧ sand keep
        # separating triangles on the balanced split and stay unchanged.
        if not keys:
            continue
        best = rows[keys[0]]
        assert best["status"] in ("vanished", "shrank"), best
        assert best["change"]["high"] < 0


def test_diff_of_a_categorization_with_itself_is_empty(example: Example) -> None:
    project, _, _ = example
    out = project / "outputs" / "diff-self.json"
    result = run_cli(["diff", "train", "world/train", "--fail-on", "appeared,vanished,grew,shrank", "--out", str(out)],
                     project, timeout=600)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["counts"]["unchanged"] == len(report["biases"]) > 0
    assert all(r["change"]["delta"] == 0 for r in report["biases"])


def test_readme_quick_tour_is_current(example: Example) -> None:
    """The README's quick tour block is `python -m conceptscope_cli.pipeline.tour DIR` on this example run:
    a change of groups / check-model / diff fails here until the README is regenerated with `--write`."""
    from conceptscope_cli.pipeline.figures import readme_block
    from conceptscope_cli.pipeline.tour import BEGIN, END, render, tour_figures

    project, _, _ = example
    block = render(tour_figures(project))
    assert readme_block(Path(__file__).resolve().parents[1] / "README.md", BEGIN, END) == block, (
        "README quick tour is stale: run `python -m conceptscope_cli.pipeline.tour DIR --write` on a one-thread "
        "example run (OMP_NUM_THREADS=1)")
