"""`cscope ablate` core: faithfulness curves, class ablation, latent edits, resume after a kill.

One project (the tiny ViT over the generated 3-class images, as in `tiny_project`) is built
per module, with the SAE, dictionary and categorization made once by the real stages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptscope_cli.ablate.classes import class_ablation
from conceptscope_cli.ablate.common import MaskEdit, class_text, image_features, load_batch, open_session
from conceptscope_cli.ablate.edit import edit
from conceptscope_cli.ablate.faithfulness import CURVES, curve_area, faithfulness, rank_latents
from conceptscope_cli.backbone.capture import _batch_first
from conceptscope_cli.backbone.splice import SAESplice
from conceptscope_cli.config.sections import AblateConfig
from conceptscope_cli.progress import NullReporter
from conceptscope_cli.project import Project

FAST = AblateConfig(batch_size=4, n_deletions=6, rankings=["attribution", "activation", "random", "negative_attribution"],
                    ks=[1, 2, 5, 1000], random_repeats=2)


@pytest.fixture(scope="module")
def project_dir(categorized_tiny_project: Path) -> Path:
    return categorized_tiny_project


@pytest.fixture(scope="module")
def session(project_dir: Path):  # noqa: ANN201
    return open_session(Project.open(project_dir), None, device=None, reporter=NullReporter())


@pytest.fixture(scope="module")
def batch(session, project_dir: Path):  # noqa: ANN001, ANN201
    from conceptscope_cli.data.datasets import open_split

    handle = open_split("shapes", session.dataset_cfg, "test", project_dir)
    return load_batch(handle, 0, 6, session.backbone.preprocess)


# ------------------------------------------------------------ pure pieces
def test_curve_area_on_hand_checked_curves() -> None:
    assert curve_area(np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)  # a straight line from 1 to 0
    assert curve_area(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)  # (1+0)/2 + (0+0)/2, over n = 2
    assert curve_area(np.array([0.3])) == pytest.approx(0.3)  # a single point
    areas = curve_area(np.array([[2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]]))  # per row: constant, ramp
    np.testing.assert_allclose(areas, [2.0, 1.5])


def test_rankings_order_latents_and_random_is_seeded_per_image() -> None:
    attribution = np.array([[0.1, -0.5, 0.7, 0.0], [0.0, 0.2, 0.0, 0.3]])
    activation = np.array([[1.0, 3.0, 0.5, 0.0], [0.0, 0.2, 0.0, 0.9]])
    rows = np.array([7, 8])
    np.testing.assert_array_equal(rank_latents("attribution", attribution, activation, rows, 0, 2), [[2, 0], [3, 1]])
    np.testing.assert_array_equal(rank_latents("negative_attribution", attribution, activation, rows, 0, 1), [[1], [0]])
    np.testing.assert_array_equal(rank_latents("activation", attribution, activation, rows, 0, 2), [[1, 0], [3, 1]])
    random = rank_latents("random", attribution, activation, rows, 0, 4)
    assert set(random[0, :3]) == {0, 1, 2} and random[0, 3] == 3  # active latents first
    assert set(random[1, :2]) == {1, 3}
    # the same image gets the same order whatever the batch around it
    alone = rank_latents("random", attribution[1:], activation[1:], rows[1:], 0, 4)
    np.testing.assert_array_equal(alone[0], random[1])


# ------------------------------------------------------------ splice identities
def test_deleting_nothing_with_error_is_the_model_and_deleting_all_without_is_decoder_bias(session, batch) -> None:  # noqa: ANN001
    images = batch.images
    m = int(session.sae.d_sae)
    original = image_features(session, images, spliced=False)
    nothing = image_features(session, images, keep_error=True, edit=MaskEdit(torch.zeros(len(images), m, dtype=torch.bool)))
    torch.testing.assert_close(nothing, original, atol=1e-5, rtol=1e-4)

    everything = image_features(session, images, keep_error=False, edit=MaskEdit(torch.ones(m, dtype=torch.bool)))
    visual = session.model.visual
    b_dec = session.sae.b_dec.detach()

    def bias_only(module, inputs, output):  # noqa: ANN001, ANN202 - every spliced token becomes b_dec
        z = output if _batch_first(visual) else output.transpose(0, 1)
        z = z.clone()
        z[:, :] = b_dec.to(z.dtype)  # the SAE reads all tokens here
        return z if _batch_first(visual) else z.transpose(0, 1)

    assert session.tokens == "all"
    handle = visual.transformer.resblocks[session.layer].register_forward_hook(bias_only)
    try:
        with torch.no_grad():
            reference = torch.nn.functional.normalize(session.model.encode_image(images).float(), dim=-1)
    finally:
        handle.remove()
    torch.testing.assert_close(everything, reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(everything, original, atol=1e-3)


# ------------------------------------------------------------ faithfulness
def test_faithfulness_writes_documented_curves(project_dir: Path, session, batch) -> None:  # noqa: ANN001
    result = faithfulness(Project.open(project_dir), config=FAST)
    n, rankings = 6, FAST.rankings
    out = project_dir / "outputs" / "shapes" / "test" / "ablate" / "faithfulness"
    assert result.out_dir == out and result.split == "test" and result.n_images == 9 and result.steps == list(range(n + 1))
    data = json.loads((out / "curves.json").read_text())
    images = data["images"]
    assert len(images["row_index"]) == 9 and images["row_index"] == sorted(images["row_index"])
    unspliced = np.asarray(images["unspliced"])
    for ranking in rankings:
        for curve in CURVES:
            values = np.asarray(images["curves"][ranking][curve])
            assert values.shape == (9, n + 1)
            summary = data["rankings"][ranking][curve]
            assert set(summary) == {"mean", "std", "ci95", "area", "area_std", "area_ci95"}
            np.testing.assert_allclose(summary["mean"], values.mean(0), rtol=1e-12)
            assert summary["area"] == pytest.approx(curve_area(values.mean(0)))  # area is linear: mean of areas
            assert result.area(ranking, curve) == pytest.approx(summary["area"])
        # deletion starts at the unchanged model (error kept); insertion from b_dec + error
        np.testing.assert_allclose(np.asarray(images["curves"][ranking]["deletion"])[:, 0], unspliced, atol=1e-5)
        np.testing.assert_allclose(np.asarray(images["curves"][ranking]["insertion"])[:, 0],
                                   np.asarray(images["curves"][rankings[0]]["insertion"])[:, 0], atol=1e-6)
    # the first image of the batch matches a direct cosine with its class's text feature
    text = class_text(session.backbone, ["red", "green", "blue"], FAST.prompt_templates)
    direct = (image_features(session, batch.images[:1], spliced=False) * text[int(batch.labels[0])]).sum()
    assert unspliced[0] == pytest.approx(float(direct), abs=1e-5)
    # gradient x activation tells which latents raise y: deleting them lowers it, the opposite raises it
    assert result.area("attribution") < result.area("random") < result.area("negative_attribution")
    assert result.area("attribution", "insertion") > result.area("negative_attribution", "insertion")
    csv = (out / "curves.csv").read_text().splitlines()
    assert csv[0] == "ranking,curve,step,mean,std,ci95_low,ci95_high,n_images,area"
    assert len(csv) == 1 + len(rankings) * 2 * (n + 1)
    from PIL import Image

    assert Image.open(out / "faithfulness.png").size[0] > 800
    assert sorted(p.name for p in (out / "parts").glob("batch-*.json")) == ["batch-000000.json", "batch-000001.json", "batch-000002.json"]


# ------------------------------------------------------------ class ablation
def test_class_ablation_tables_and_references(project_dir: Path) -> None:
    result = class_ablation(Project.open(project_dir), config=FAST)
    m = 128
    assert result.ks == [1, 2, 5, m] and result.rank_split == "train" and result.n_images == 9
    data = json.loads(result.json_path.read_text())
    assert set(data) == {"meta", "ks", "conditions", "overall", "classes"}
    expected = ["unspliced", "spliced", "reconstruction", *[f"keep_top{k}" for k in result.ks],
                *[f"zero_top{k}" for k in result.ks], "zero_target", "zero_context", "zero_bias", "zero_random_context"]
    assert data["conditions"] == expected == result.conditions
    categorized = json.loads((project_dir / "outputs" / "shapes" / "train_concept_categorization.json").read_text())["classes"]
    for name, info in data["classes"].items():
        assert {"class", "n_images", "accuracy", "probability", "accuracy_drop", "probability_drop", "top_latents",
                "groups", "random_context", "n_bias"} <= set(info)
        assert info["n_images"] == 3 and set(info["accuracy"]) == set(expected)
        # error kept and nothing removed (or every latent kept): the model is unchanged
        for same in ("spliced", f"keep_top{m}"):
            assert info["accuracy"][same] == info["accuracy"]["unspliced"]
            assert info["probability"][same] == pytest.approx(info["probability"]["unspliced"], abs=1e-5)
        assert info["groups"]["bias"] == [e["latent"] for e in categorized[name]["bias"]]
        context = {e["latent"] for e in categorized[name]["context"]} - set(info["groups"]["bias"])
        for draw in info["random_context"]:
            assert set(draw) <= context and len(draw) == min(len(context), info["n_bias"])
    # The edits act (measured, seed 0: |change| 0.03-0.17 for zero_top128, 0.04-0.13 for keep_top1):
    # zeroing every latent leaves decoder bias + error, keeping one latent drops the rest; both move
    # every class's probability.
    for name, info in data["classes"].items():
        p = info["probability"]
        assert abs(p[f"zero_top{m}"] - p["spliced"]) > 0.01, (name, p)
        assert abs(p["keep_top1"] - p[f"keep_top{m}"]) > 0.01, (name, p)
    pairs = result.bias_vs_random()
    assert set(pairs) == {n for n, c in result.classes.items() if c.n_bias}
    for name, (bias, _random) in pairs.items():
        assert bias == pytest.approx(result.classes[name].accuracy_drop("zero_bias"))
    csv = result.csv_path.read_text().splitlines()
    assert csv[0] == "class,condition,k,n_images,accuracy,probability,accuracy_drop,probability_drop"
    assert len(csv) == 1 + 4 * len(expected) and result.plot_path.is_file()
    # the class's own ranking comes from the dictionary statistics of the rank split
    from conceptscope_cli.dictionary.latents import load_stats

    entry = json.loads((project_dir / "outputs" / "shapes" / "train" / "concept_dict.json").read_text())["meta"]["latents_entry"]
    stats = load_stats(Project.open(project_dir).cache.lookup("latents", entry).path / "stats.h5")
    assert data["classes"]["green"]["top_latents"][:5] == np.argsort(-stats["class_mean"][1], kind="stable")[:5].tolist()


# ------------------------------------------------------------ edits
def test_edit_of_an_inactive_latent_to_zero_changes_nothing(project_dir: Path, session, tmp_path: Path) -> None:  # noqa: ANN001
    image = project_dir.parent / "images" / "test" / "00001.png"
    latent = _inactive_latent(session, image)
    result = edit(Project.open(project_dir), [str(image)], [latent], scale=0.0, value=None, patches=None,
                  prompts=["red", "green", "blue"], out_dir=tmp_path / "edit")
    assert result.values == [0.0]
    for row in result.images[0].prompts:
        assert row.similarity_after == pytest.approx(row.similarity_before, abs=1e-5)
    assert result.images[0].prediction_before == result.images[0].prediction_after
    assert result.images[0].figure.is_file() and result.json_path.is_file()


def test_edit_moves_similarity_along_the_decoder_direction(project_dir: Path, session, tmp_path: Path) -> None:  # noqa: ANN001
    """Setting an inactive latent k to a small v on every token changes z′ by v·W_dec[k] per
    token, so to first order Δcos_p = v Σ_t ∂cos_p/∂z′_t · W_dec[k]."""
    from conceptscope_cli.attribute.inputs import open_image
    from conceptscope_cli.backbone.views import model_view

    image = project_dir.parent / "images" / "test" / "00001.png"
    prompts = ["red", "green", "blue"]
    latent, v = _inactive_latent(session, image), 0.05
    view = model_view(session.backbone.preprocess)
    x = view.normalize(view.pixels(open_image(image)))[None]
    text = session.backbone.encode_text(prompts)
    predicted = []
    for p in range(len(prompts)):
        splice = SAESplice(session.model.visual, session.sae, session.layer, tokens=session.tokens, retain_grad=True)
        with torch.enable_grad(), splice:
            features = torch.nn.functional.normalize(session.model.encode_image(x).float(), dim=-1)
            (features @ text[p]).sum().backward()
        grad = splice.output.grad[0]  # (Ts, d)
        predicted.append(float(v * (grad @ session.sae.W_dec[latent].detach()).sum()))
    result = edit(Project.open(project_dir), [str(image)], [latent], scale=None, value=v, patches=None,
                  prompts=prompts, out_dir=tmp_path / "edit")
    actual = [row.similarity_change for row in result.images[0].prompts]
    assert max(abs(a) for a in actual) > 1e-4  # a measurable change
    for a, pred in zip(actual, predicted):
        assert np.sign(a) == np.sign(pred)
        assert a == pytest.approx(pred, rel=0.25, abs=2e-5)

    # on two patches only: the figure outlines them and only those tokens change
    patched = edit(Project.open(project_dir), [str(image)], [latent], scale=None, value=v, patches=[0, 5],
                   prompts=prompts, out_dir=tmp_path / "patched")
    saved = json.loads(patched.json_path.read_text())
    assert saved["meta"]["patches"] == [0, 5] and saved["images"][0]["figure"] == "00001.png"
    changes = [row["similarity_change"] for row in saved["images"][0]["prompts"]]
    assert 0 < max(map(abs, changes)) < max(map(abs, actual))


def _inactive_latent(session, image: Path) -> int:  # noqa: ANN001
    """A latent with f = 0 at every spliced token of the image."""
    from conceptscope_cli.attribute.inputs import open_image
    from conceptscope_cli.backbone.views import model_view

    view = model_view(session.backbone.preprocess)
    x = view.normalize(view.pixels(open_image(image)))[None]
    splice = SAESplice(session.model.visual, session.sae, session.layer, tokens=session.tokens)
    with torch.no_grad(), splice:
        session.model.encode_image(x)
    inactive = torch.nonzero(splice.clean_latents[0].amax(0) <= 0).flatten()
    assert len(inactive), "every latent is active on the image"
    return int(inactive[0])


# ------------------------------------------------------------ resume
RUN = """
import sys
from pathlib import Path
from conceptscope_cli.config.sections import AblateConfig
from conceptscope_cli.ablate.faithfulness import faithfulness
from conceptscope_cli.project import Project
faithfulness(Project.open(Path(sys.argv[1])), config=AblateConfig(batch_size=2, n_deletions=40), out_dir=Path(sys.argv[2]))
"""


@pytest.mark.slow  # kill test
def test_killed_faithfulness_resumes_to_identical_files(project_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "faith"
    cfg = AblateConfig(batch_size=2, n_deletions=40)
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(project_dir), str(out)], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("parts/batch-*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "faithfulness finished before it could be killed"
    done = sorted(p.name for p in out.glob("parts/batch-*.json"))
    assert 1 <= len(done) < 5 and not (out / "curves.json").exists()
    first = (out / "parts" / done[0]).read_bytes()

    faithfulness(Project.open(project_dir), config=cfg, out_dir=out)
    assert (out / "parts" / done[0]).read_bytes() == first  # kept, not recomputed
    names = ["curves.json", "curves.csv", "faithfulness.png"]
    resumed = {name: (out / name).read_bytes() for name in names}

    fresh = tmp_path / "fresh"
    faithfulness(Project.open(project_dir), config=cfg, out_dir=fresh)
    assert {name: (fresh / name).read_bytes() for name in names} == resumed
