"""groups / check-model / diff: the math against hand-computed values, the claims adapter, the
user-model errors and the diff gate on constructed categorizations (fast, no model runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptscope_cli.act import stats as A
from conceptscope_cli.act.claims import read_claims
from conceptscope_cli.errors import CscopeError
from helpers import run_main


def test_youden_cut_hand_values() -> None:
    # sorted desc: 3p 3p 2p 1n 1p 0n 0n -> cuts after each distinct value:
    # >3: (0, 0); >=3: tpr 2/4, fpr 0; >=2: 3/4, 0 (J .75); >=1: 4/4, 1/3 (J .667); >=0: 1, 1
    values = np.array([0, 0, 1, 1, 2, 3, 3.0])
    positive = np.array([0, 0, 0, 1, 1, 1, 1], bool)
    cut = A.youden_cut(values, positive)
    assert cut.threshold == pytest.approx(1.5) and cut.j == pytest.approx(0.75)
    assert cut.tpr == pytest.approx(0.75) and cut.fpr == 0.0
    # scale-free: any increasing transform moves the threshold with the values, not the cut
    scaled = A.youden_cut(values * 7 + 2, positive)
    assert scaled.threshold == pytest.approx(1.5 * 7 + 2) and scaled.j == pytest.approx(cut.j)
    # no separation at all: nothing is present
    flat = A.youden_cut(np.array([1.0, 1, 1]), np.array([1, 0, 1], bool))
    assert flat.j == 0.0 and not (np.array([1.0, 1, 1]) > flat.threshold).any()


def test_balancing_weights_hand_values_and_exact_group_sums() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    groups = np.array([0, 0, 1, 2, 2, 2, 3])
    w = A.balancing_weights(labels, groups)
    # class 0: 3 images, 2 groups of sizes 2 and 1 -> 3/(2*2), 3/(2*1); class 1: 4/(2*3), 4/(2*1)
    assert np.allclose(w, [0.75, 0.75, 1.5, 2 / 3, 2 / 3, 2 / 3, 2.0])
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 500)
    groups = 2 * labels + (rng.random(500) < 0.2)
    w = A.balancing_weights(labels, groups)
    for y in range(4):
        sums = [w[groups == g].sum() for g in np.unique(groups[labels == y])]
        assert np.allclose(sums, sums[0]) and np.isclose(sum(sums), (labels == y).sum())


def test_balanced_subset_equal_groups_within_class_and_seeded() -> None:
    labels = np.array([0] * 10 + [1] * 6)
    groups = np.array([0] * 7 + [1] * 3 + [2] * 2 + [3] * 4)
    subset = A.balanced_subset(labels, groups, seed=0)
    assert np.bincount(groups[subset], minlength=4).tolist() == [3, 3, 2, 2]
    assert np.array_equal(subset, A.balanced_subset(labels, groups, seed=0))
    assert not np.array_equal(subset, A.balanced_subset(labels, groups, seed=5))


def test_bootstrap_gap_matches_the_normal_approximation() -> None:
    perfect = A.bootstrap_gap(np.ones(20), np.zeros(10), n_boot=2000, seed=0)
    assert (perfect.gap, perfect.low, perfect.high) == (1.0, 1.0, 1.0) and perfect.excludes_zero
    a = np.r_[np.ones(400), np.zeros(100)]  # 0.8
    b = np.r_[np.ones(300), np.zeros(200)]  # 0.6
    gap = A.bootstrap_gap(a, b, n_boot=20000, seed=0)
    half = 1.959964 * np.sqrt(0.8 * 0.2 / 500 + 0.6 * 0.4 / 500)  # = 0.0554
    assert gap.gap == pytest.approx(0.2)
    assert gap.low == pytest.approx(0.2 - half, abs=0.004) and gap.high == pytest.approx(0.2 + half, abs=0.004)
    same = A.bootstrap_gap(a, a, n_boot=5000, seed=0)
    assert same.low < 0 < same.high and not same.excludes_zero
    empty = A.bootstrap_gap(a, np.zeros(0), n_boot=100, seed=0)
    assert empty.gap is None and not empty.excludes_zero


def test_effect_size_and_its_standard_error_by_hand() -> None:
    values = np.array([1.0, 3.0, 0.0, 0.0, 2.0, 0.0])
    in_class = np.array([1, 1, 0, 0, 0, 0], bool)
    # class mean 2, var 1; rest mean 0.5, var 0.75 -> d = 1.5 / sqrt(0.875)
    assert A.effect_size(values, in_class) == pytest.approx(1.5 / np.sqrt(0.875))
    assert A.effect_se(1.0, 10, 40) == pytest.approx(np.sqrt(50 / 400 + 1 / 100))
    assert A.z_of(0.95) == pytest.approx(1.959964, abs=1e-5)


def test_read_claims_today_and_with_concept_groups() -> None:
    cat = {"meta": {"class_names": ["a", "b"]}, "classes": {
        "a": {"class": 0, "bias": [{"latent": 7, "name": "water", "effect_size": 1.2}]},
        "b": {"class": 1, "bias": [{"concept": "g3", "members": [9, 4], "name": "sand", "effect": 0.8,
                                    "ci": [0.5, 1.1], "q": 0.01},
                                   {"latent": 5, "group": 8, "members": [5, 2], "effect": 0.4, "effect_low": 0.2,
                                    "effect_high": 0.6, "q_value": 0.02}]}}}
    first, second, third = read_claims(cat)
    assert (first.key, first.members, first.effect, first.ci) == ("a/7", (7,), 1.2, None)
    assert (second.key, second.members, second.ci, second.q) == ("b/g3", (4, 9), (0.5, 1.1), 0.01)
    assert (third.key, third.members, third.ci, third.q) == ("b/g8", (2, 5), (0.2, 0.6), 0.02)


def test_diff_status_rules() -> None:
    from conceptscope_cli.act.diff import status_of

    assert status_of(True, True, 0.1, 0.5) == "grew"
    assert status_of(True, True, -0.5, -0.1) == "shrank"
    assert status_of(True, True, -0.1, 0.1) == "unchanged"
    assert status_of(False, True, 0.2, 0.9) == "appeared"
    assert status_of(False, True, -0.2, 0.9) == "unchanged"  # crossed the rule without a real change
    assert status_of(True, False, -0.9, -0.2) == "vanished"


def _categorization(path: Path, effects: dict[str, float], sae: str = "k1") -> Path:
    classes = {name: {"class": i, "n_images": 100, "bias": [] if effect is None else [
        {"latent": 10 + i, "name": f"c{i}", "effect": effect, "ci": [effect - 0.2, effect + 0.2]}]}
        for i, (name, effect) in enumerate(effects.items())}
    path.write_text(json.dumps({"meta": {"class_names": list(effects), "sae_entry": sae, "stamp": "s"}, "classes": classes}))
    return path


def test_diff_gate_on_constructed_categorizations(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def cli(args: list[str]):  # noqa: ANN202 - CliResult
        # in-process (run_main): the gate's exit codes and messages are the subject, not the process
        return run_main(args, tmp_path, capsys, monkeypatch)

    a = _categorization(tmp_path / "a.json", {"x": 0.5, "y": 1.0})
    grown = _categorization(tmp_path / "b.json", {"x": 1.5, "y": 1.0})
    same = cli(["diff", str(a), str(a), "--fail-on", "appeared,grew", "--out", str(tmp_path / "d0.json")])
    assert same.exit_code == 0, same.output
    assert json.loads((tmp_path / "d0.json").read_text())["counts"]["unchanged"] == 2
    grew = cli(["diff", str(a), str(grown), "--fail-on", "grew", "--out", str(tmp_path / "d1.json")])
    assert grew.exit_code == 4, grew.output
    assert "matched --fail-on grew" in grew.stderr and "Traceback" not in grew.output
    rows = json.loads((tmp_path / "d1.json").read_text())["biases"]
    assert [r["status"] for r in rows] == ["grew", "unchanged"]
    assert rows[0]["change"]["delta"] == pytest.approx(1.0)
    # appeared only gates --fail-on appeared
    ok = cli(["diff", str(a), str(grown), "--fail-on", "appeared", "--out", str(tmp_path / "d2.json")])
    assert ok.exit_code == 0, ok.output
    other = _categorization(tmp_path / "c.json", {"x": 0.5, "y": 1.0}, sae="k2")
    refused = cli(["diff", str(a), str(other)])
    assert refused.exit_code == 1 and "different SAEs" in refused.stderr and "Traceback" not in refused.output


def test_user_model_errors_are_named(tmp_path: Path) -> None:
    from conceptscope_cli.act import models as M

    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(CscopeError, match="is not a TorchScript file"):
        M.load_torchscript(junk)
    with pytest.raises(CscopeError, match="could not import 'no_such_pkg.mod'"):
        M.load_entry_point("no_such_pkg.mod:make", tmp_path)
    with pytest.raises(CscopeError, match="bad entry point"):
        M.load_entry_point("just_a_module", tmp_path)
    (tmp_path / "usermodels.py").write_text("import torch\ndef make():\n    return torch.nn.Flatten()\n"
                                            "def not_a_module():\n    return 3\n")
    with pytest.raises(CscopeError, match="not a torch.nn.Module"):
        M.load_entry_point("usermodels:not_a_module", tmp_path)
    flat = M.ImageClassifier("entrypoint", "entry point usermodels:make", M.load_entry_point("usermodels:make", tmp_path),
                             lambda im: im)
    with pytest.raises(CscopeError, match=r"gives 48 class scores, the dataset has 5 classes"):
        M.logits_of(flat, torch.zeros(2, 3, 4, 4), 5)
    squeeze = M.ImageClassifier("torchscript", "m", torch.nn.Flatten(0), lambda im: im)
    with pytest.raises(CscopeError, match="expected logits of shape"):
        M.logits_of(squeeze, torch.zeros(2, 3, 4, 4), 5)
    with pytest.raises(CscopeError, match="declare the model's preprocessing completely"):
        M.declared_preprocess(32, None, None)


def test_probe_learns_a_separable_problem() -> None:
    from conceptscope_cli.act.models import probe_logits, train_probe

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[np.arange(300), y] += 4.0
    probe = train_probe(x, y, 3, seed=0)
    assert (probe_logits(probe, x).argmax(1) == y).mean() > 0.95
    assert probe["l2"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    again = train_probe(x, y, 3, seed=0)
    assert np.array_equal(probe["W"], again["W"])


def test_cliffs_delta_by_hand() -> None:
    # class [3, 2] vs rest [2, 1, 0]: 3 beats all three, 2 beats 1 and 0 and ties 2 -> U = 3 + 2.5 = 5.5 of 6
    values = np.array([3.0, 2.0, 2.0, 1.0, 0.0])
    in_class = np.array([1, 1, 0, 0, 0], bool)
    d, se = A.cliffs_delta(values, in_class)
    assert d == pytest.approx(2 * 5.5 / 6 - 1)
    s = (5.5 + 0.5) / 7
    q1, q2 = s / (2 - s), 2 * s * s / (1 + s)
    assert se == pytest.approx(2 * np.sqrt((s * (1 - s) + (q1 - s * s) + 2 * (q2 - s * s)) / 6))
    perfect, perfect_se = A.cliffs_delta(np.array([5.0, 4, 1, 0]), np.array([1, 1, 0, 0], bool))
    assert perfect == 1.0 and perfect_se > 0


def test_a_lifted_claim_needs_its_group_over_represented() -> None:
    from conceptscope_cli.act.claims import BiasClaim
    from conceptscope_cli.act.concepts import confirmed_groups

    labels = np.array([0] * 50 + [1] * 50)
    rng = np.random.default_rng(0)
    over = np.r_[rng.random(50) + 1.0, rng.random(50)]  # higher in class 0
    flat = rng.random(100)  # the group is not a class-0 thing
    latent_a = BiasClaim("a", 0, "7", (7,), "x", None, None, None)
    latent_b = BiasClaim("a", 0, "9", (9,), "y", None, None, None)
    kept = BiasClaim("a", 0, "g1", (7, 8), "x", None, None, None)
    dropped = BiasClaim("a", 0, "g2", (9, 10), "y", None, None, None)
    values = {"a/g1": over, "a/g2": flat}
    out = confirmed_groups([kept, dropped], [latent_a, latent_b], values, labels)
    assert [c.key for c in out] == ["a/g1", "a/9"]


def _latents(path: Path, dense: np.ndarray, labels: np.ndarray):
    from conceptscope_cli.dictionary.sparse import CSRWriter, LatentMatrix

    writer = CSRWriter(path, dense.shape[1])
    for start in range(0, len(dense), 7):  # several CSR blocks
        writer.append(dense[start:start + 7].astype(np.float32), labels[start:start + 7],
                      np.arange(start, min(start + 7, len(dense))))
    writer.close()
    return LatentMatrix(path)


def _split_concept(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three classes; a context c present on 80% of class 0 and 20% elsewhere. Latent 0 detects c
    with a class-dependent offset (+2.5 on every class-2 image, above its present values elsewhere), latent 1 detects c with the opposite
    offset (+1 on class 1), latent 2 is noise, latent 3 never fires. No single latent has one cut
    agreeing with c on every class; their sum has."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    context = rng.random(n) < np.where(labels == 0, 0.8, 0.2)
    dense = np.zeros((n, 4))
    dense[:, 0] = context * (2 + 0.2 * rng.random(n)) + (labels == 2) * 2.5 + 0.1 * rng.random(n)
    dense[:, 1] = context * (2 + 0.2 * rng.random(n)) + (labels == 1) * 2.5 + 0.1 * rng.random(n)
    dense[:, 2] = rng.random(n)
    return dense, labels, context


def test_neighbour_bounds_are_the_dictionary_estimator(tmp_path: Path) -> None:
    from conceptscope_cli.act.concepts import neighbour_bounds
    from conceptscope_cli.dictionary import groups as G

    dense, labels, _ = _split_concept()
    with _latents(tmp_path / "l.h5", dense, labels) as matrix:
        bounds = neighbour_bounds(matrix, np.array([0, 2]), np.array([0, 1, 2, 3]))
        corr, dof = G.within_class_correlation(G.gram_statistics(matrix, np.array([0, 1, 2, 3])))
    np.testing.assert_allclose(bounds, G.fisher_lower_bound(corr[[0, 2]], dof), atol=1e-6)


def test_a_claim_stands_for_the_latents_firing_with_it(tmp_path: Path) -> None:
    """The claim on latent 0 becomes the concept {0, 1} (latent 1 co-fires within classes, the noise
    latent does not); its presence agrees with the context on every class, latent 0's alone does not."""
    from conceptscope_cli.act.claims import BiasClaim
    from conceptscope_cli.act.concepts import claim_concepts

    dense, labels, context = _split_concept()
    claim = BiasClaim("a", 0, "0", (0,), "c", None, None, None)
    noise = BiasClaim("a", 0, "2", (2,), "n", None, None, None)
    with _latents(tmp_path / "l.h5", dense, labels) as matrix:
        claims, values = claim_concepts(matrix, [claim, noise], np.array([0, 1, 2, 3]), 0.3)
        alone, _ = claim_concepts(matrix, [claim], None, 0.3)
        group, _ = claim_concepts(matrix, [BiasClaim("a", 0, "g7", (1,), "c", None, None, None)],
                                  np.array([0, 1, 2, 3]), 0.3)
    assert [(c.key, c.members) for c in claims] == [("a/n0", (0, 1)), ("a/2", (2,))]
    assert [c.key for c in alone] == ["a/0"]
    assert claims[0].label_text == "a ← c #0+1"
    assert [(c.key, c.members, c.listed, c.label_text) for c in group] == [("a/ng7", (0, 1), (1,), "a ← c #g7+1")]

    def worst_class_agreement(key: str) -> float:
        present = values[key] > A.youden_cut(values[key], labels == 0).threshold
        return min(float((present[labels == y] == context[labels == y]).mean()) for y in range(3))

    assert worst_class_agreement("a/n0") >= 0.95 > 0.85 > worst_class_agreement("a/0")


def _diff_side(root: Path, split: str, ctx2_rate: float, claims: list[int], seed: int) -> Path:
    """One side of a constructed diff: 3 classes x 200 images, latents.h5, concept_groups.json (4 valid
    latents, no grouping) and a categorization claiming `claims` for class 'a'. Latent 0 fires on
    class a ∧ ctx1 only (ctx1 on 30% of a, 70% elsewhere: a conjunction, a real bias of a), latent 1 on
    ctx1 anywhere (within class a it co-fires with 0, but ctx1 is rarer in a: no bias), latents 2 and 3
    split ctx2 between them (ctx2 on `ctx2_rate` of a, 20% elsewhere)."""
    from conceptscope_cli.dictionary import groups as G
    from conceptscope_cli.dictionary.group_file import write_concept_groups

    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], 200)
    ctx1 = rng.random(600) < np.where(labels == 0, 0.3, 0.7)
    ctx2 = rng.random(600) < np.where(labels == 0, ctx2_rate, 0.2)
    noise = 0.1 * rng.random((600, 4))
    dense = np.stack([(ctx1 & (labels == 0)) * (1 + noise[:, 0]), ctx1 * (1 + noise[:, 1]),
                      ctx2 * (1 + noise[:, 2]), ctx2 * (0.5 + noise[:, 3])], 1)
    (root / split).mkdir(parents=True)
    _latents(root / f"latents-{split}.h5", dense, labels).close()
    (root / f"latents-{split}").mkdir()
    (root / f"latents-{split}.h5").rename(root / f"latents-{split}" / "latents.h5")
    write_concept_groups(root / split, {"grouping": {"enabled": False, "threshold": 0.3}},
                         [G.ConceptGroup(k, (k,), (1.0,), 1.0, 1.0, f"c{k}") for k in range(4)])
    path = root / f"{split}_concept_categorization.json"
    path.write_text(json.dumps({"meta": {"class_names": ["a", "b", "c"], "sae_entry": "k", "split": split,
                                         "latents_entry": f"latents-{split}", "stamp": split},
                                "classes": {"a": {"class": 0, "bias": [{"latent": k, "name": f"c{k}"} for k in claims]},
                                            "b": {"class": 1, "bias": []}, "c": {"class": 2, "bias": []}}}))
    return path


def test_diff_compares_the_claims_groups_makes(tmp_path: Path) -> None:
    """diff widens each side's single-latent claims and re-checks the widening on that side's latents, as
    `cscope groups` does: latent 2's split concept becomes {2, 3} (and vanishes when ctx2 is balanced);
    latent 0 stays alone, since its neighbourhood {0, 1} is no bias of class a (its δ < 0)."""
    from types import SimpleNamespace

    from conceptscope_cli.act.diff import diff_categorizations

    a = _diff_side(tmp_path, "a", 0.8, [0, 2], seed=0)
    b = _diff_side(tmp_path, "b", 0.2, [0], seed=1)
    project = SimpleNamespace(cache=SimpleNamespace(lookup=lambda kind, key: SimpleNamespace(path=tmp_path / key)))
    report = diff_categorizations(project, str(a), str(b))  # type: ignore[arg-type]
    rows = {r["concept"]: r for r in report["biases"]}
    assert set(rows) == {"0", "n2"}, rows
    assert rows["0"]["members"] == [0] and rows["0"]["status"] == "unchanged"
    assert rows["0"]["a"]["effect"] == pytest.approx(0.3, abs=0.1) and rows["0"]["a"]["source"] == "latents"
    assert rows["n2"]["members"] == [2, 3] and rows["n2"]["status"] == "vanished"
    assert rows["n2"]["a"]["effect"] == pytest.approx(0.6, abs=0.1) and abs(rows["n2"]["b"]["effect"]) < 0.15
