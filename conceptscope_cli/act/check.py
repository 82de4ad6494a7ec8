"""`cscope check-model`: does a classifier lean on the biases found in the data?

On the bias groups of an evaluation split (default `[categorize] evaluate_split`), per bias
claim (y, c): accuracy on y ∧ c (aligned) and y ∧ ¬c (conflicting), the gap
acc(aligned) − acc(conflicting) with a stratified bootstrap interval, and the same for the
other classes' images (acc(y' ∧ ¬c) − acc(y' ∧ c): a model that leans on c mistakes them
for y when c is there). The intervals are Bonferroni-simultaneous over the K claims checked
(level 1 − α/K), so "relies on it" (the gap's interval lies above 0) keeps a family-wise
error of at most α however many claims the categorization lists. Worst-group accuracy is
taken over the manifest groups of `cscope groups` (class × its strongest claim's concept).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import conceptscope_cli
from conceptscope_cli.act import models as M
from conceptscope_cli.act import stats as A
from conceptscope_cli.act.groups import GroupsResult, compute_groups, group_name, roles
from conceptscope_cli.cache.store import CacheEntry, content_key, write_json_atomic
from conceptscope_cli.config.sections import CategorizeConfig
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project

if TYPE_CHECKING:
    from conceptscope_cli.session import ModelSession

N_BOOT = 20000
PROBE_KIND = "probe"


def verdict(gap: A.Gap) -> str:
    if gap.gap is None:
        return "n/a (empty group)"
    if gap.low is not None and gap.low > 0:
        return "relies on it"
    if gap.high is not None and gap.high < 0:
        return "better without it"
    return "no evidence"


def evaluate_predictions(groups: GroupsResult, predictions: np.ndarray, *, seed: int, confidence: float = 0.95,
                         n_boot: int = N_BOOT) -> dict[str, Any]:
    """Per-claim gaps, group accuracies and worst-group accuracy of predictions (N,) over the groups' images."""
    correct = (np.asarray(predictions) == groups.labels).astype(np.float64)
    k = max(len(groups.claims), 1)
    level = 1 - (1 - confidence) / k
    biases = []
    for i, item in enumerate(groups.claims):
        r = roles(item.group, item.claim.label)
        own = A.bootstrap_gap(correct[r["aligned"]], correct[r["conflicting"]], n_boot=n_boot, seed=(seed, i, 0),
                              confidence=level)
        other = A.bootstrap_gap(correct[r["other_without"]], correct[r["other_with"]], n_boot=n_boot,
                                seed=(seed, i, 1), confidence=level)
        biases.append({"claim": item.claim.key, "label": item.claim.label_text, "class": item.claim.class_name,
                       "concept": item.claim.concept, "members": list(item.claim.members), "name": item.claim.name,
                       "gap": _gap_json(own), "other_gap": _gap_json(other), "verdict": verdict(own),
                       "other_verdict": verdict(other),
                       "groups": {group_name(int(g), groups.class_names, item.claim):
                                  {"n": int((item.group == g).sum()), "accuracy": float(correct[item.group == g].mean())}
                                  for g in np.unique(item.group)}})
    group_acc = {}
    for g in np.unique(groups.manifest_groups):
        mask = groups.manifest_groups == g
        y = int(g) // 2
        claim = next((c.claim for c in groups.claims if c.claim.label == y), None)
        group_acc[group_name(int(g), groups.class_names, claim)] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean())}
    worst = min(group_acc.items(), key=lambda kv: (kv[1]["accuracy"], -kv[1]["n"])) if group_acc else ("-", {"n": 0, "accuracy": float("nan")})
    return {"accuracy": float(correct.mean()) if correct.size else float("nan"),
            "confidence": confidence, "simultaneous_level": level, "n_boot": n_boot,
            "worst_group": {"group": worst[0], **worst[1]}, "groups": group_acc, "biases": biases}


def _gap_json(gap: A.Gap) -> dict[str, Any]:
    return {"gap": gap.gap, "low": gap.low, "high": gap.high, "accuracy_aligned": gap.accuracy_a,
            "accuracy_conflicting": gap.accuracy_b, "n_aligned": gap.n_a, "n_conflicting": gap.n_b}


# ----------------------------------------------------------------- predictions per model kind


def _activations(project: Project, latents: CacheEntry, dataset: str, split: str, reporter: Reporter) -> CacheEntry:
    """The cached activations of a split: those the latents were encoded from, or (when dict
    streamed the images and kept no token cache) the split's default token-sample entry."""
    from conceptscope_cli.extract.activations import extract_activations

    key = latents.record.get("inputs", {}).get("activations")
    entry = project.cache.lookup("activations", key) if key else None
    if entry is not None:
        return entry
    return extract_activations(project, dataset, split, reporter=reporter).entry


def probe_entry(project: Project, activations: CacheEntry, n_classes: int, reporter: Reporter) -> CacheEntry:
    """The linear probe trained on an activation entry's mean-pooled features (a cache entry)."""
    from safetensors.numpy import save_file

    from conceptscope_cli.distributed import build_entry
    from conceptscope_cli.extract.store import ActivationReader

    seed = project.settings.seed
    inputs = {"activations": activations.key, "n_classes": n_classes, "seed": seed, "l2_grid": list(M.PROBE_L2),
              "features": "mean over cached tokens", "solver": "lbfgs-200"}
    key = content_key(inputs)

    def build(pending: Any) -> dict[str, Any]:
        reporter.task("check-model: training the linear probe", 1)
        x, y, _ = M.mean_features(ActivationReader(activations.path))
        keep = (y >= 0) & (y < n_classes)
        probe = M.train_probe(x[keep], y[keep], n_classes, seed)
        save_file({k: probe[k] for k in ("W", "b", "mean", "std")}, str(pending.path / "probe.safetensors"))
        reporter.advance(1)
        return probe

    def finish(pending: Any, probe: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        summary = {**activations.record.get("summary", {}), "probe": f"linear, l2 {probe['l2']}"}
        return summary, {"l2": probe["l2"], "holdout_accuracy": {str(k): v for k, v in probe["holdout_accuracy"].items()},
                         "train_accuracy": probe["train_accuracy"]}

    entry, _ = build_entry(project.cache, PROBE_KIND, key, inputs, build, finish)
    return entry


def probe_predictions(project: Project, groups: GroupsResult, n_classes: int, reporter: Reporter) -> tuple[np.ndarray, dict[str, Any]]:
    from safetensors.numpy import load_file

    from conceptscope_cli.extract.store import ActivationReader

    train = _activations(project, groups.entries[groups.claims_split], groups.dataset, groups.claims_split, reporter)
    entry = probe_entry(project, train, n_classes, reporter)
    probe = load_file(str(entry.path / "probe.safetensors"))
    evaluated = _activations(project, groups.entries[groups.split], groups.dataset, groups.split, reporter)
    x, _, rows = M.mean_features(ActivationReader(evaluated.path))
    predicted = dict(zip(rows.tolist(), M.probe_logits(probe, x).argmax(1).tolist()))
    missing = [int(r) for r in groups.row_index if int(r) not in predicted]
    if missing:
        raise CscopeError(f"{len(missing)} grouped image(s) have no cached activations, e.g. row {missing[0]}",
                          hint="run `cscope extract` for this split")
    stats = entry.record["stats"]
    return np.array([predicted[int(r)] for r in groups.row_index]), {
        "kind": "probe", "description": f"linear probe on {groups.claims_split}'s mean-pooled layer activations",
        "cache_entry": entry.key, "trained_on": groups.claims_split, **stats}


def image_predictions(project: Project, groups: GroupsResult, classifier: M.ImageClassifier, device: torch.device,
                      reporter: Reporter, batch_size: int = 64) -> np.ndarray:
    """argmax logits for every grouped image, decoding the split's images with the model's preprocessing."""
    from conceptscope_cli.data.datasets import decoded_loader, open_split

    _, dataset_cfg = project.dataset(groups.dataset)
    handle = open_split(groups.dataset, dataset_cfg, groups.split, project.root, project.cache)
    wanted = {int(r) for r in groups.row_index}
    predicted: dict[int, int] = {}
    n_classes = len(groups.class_names)
    classifier.module.to(device).eval()
    reporter.task(f"check-model: {classifier.kind} on {groups.dataset}/{groups.split}", len(wanted), unit="images")
    stop = int(groups.row_index.max()) + 1 if len(groups.row_index) else 0
    loader = decoded_loader(handle, 0, stop, classifier.preprocess, batch_size=batch_size,
                            num_workers=project.settings.num_workers)
    for batch in loader:
        if batch.images is None:
            continue
        logits = M.logits_of(classifier, batch.images.to(device), n_classes)
        for r, p in zip(batch.row_index.tolist(), logits.argmax(1).tolist()):
            if r in wanted:
                predicted[r] = p
        reporter.advance(len(batch.row_index))
    missing = wanted - predicted.keys()
    if missing:
        raise CscopeError(f"{len(missing)} grouped image(s) could not be decoded for the model, e.g. row {min(missing)}")
    return np.array([predicted[int(r)] for r in groups.row_index])


def build_classifier(session: ModelSession, kind: str, class_names: list[str], *,
                     model_file: Path | None, entry_point: str | None, preprocess: M.Preprocess | None) -> M.ImageClassifier:
    """The classifier to check; the backbone (zero-shot, or a user model's default preprocessing) is
    opened through the one loader, and only when needed."""
    from conceptscope_cli.ablate.common import class_text

    project = session.project

    def backbone_preprocess() -> M.Preprocess:
        return session.backbone.preprocess

    if kind == "zeroshot":
        backbone = session.backbone
        templates = project.manifest.get(CategorizeConfig).prompt_templates
        text = class_text(backbone, class_names, templates)
        return M.ImageClassifier("zeroshot", f"zero-shot {backbone.resolved.description} with prompts {templates}",
                                 M.ZeroShot(backbone.model, text, session.logit_scale), backbone.preprocess)
    if model_file is not None:
        module = M.load_torchscript(model_file)
        return M.ImageClassifier("torchscript", f"TorchScript model {model_file.name}", module,
                                 preprocess or backbone_preprocess())
    assert entry_point is not None
    module = M.load_entry_point(entry_point, project.root)
    own = getattr(module, "preprocess", None)
    return M.ImageClassifier("entrypoint", f"entry point {entry_point}", module,
                             own if callable(own) else preprocess or backbone_preprocess())


def check_model(
    project: Project,
    dataset_name: str | None = None,
    split_name: str | None = None,
    *,
    model: str = "probe",
    model_file: Path | None = None,
    entry_point: str | None = None,
    preprocess: M.Preprocess | None = None,
    claims_split: str | None = None,
    confidence: float = 0.95,
    device: str | None = None,
    reporter: Reporter | None = None,
) -> tuple[dict[str, Any], Path]:
    """Evaluate one classifier on the bias groups of the evaluation split; writes `check/<model>.json`."""
    from conceptscope_cli.context import run_context
    from conceptscope_cli.session import ModelSession

    reporter = reporter or NullReporter()
    if sum(x is not None for x in (model_file, entry_point)) > 1:
        raise CscopeError("give one user model: --model-file or --entry-point")
    kind = "user" if model_file is not None or entry_point is not None else model
    if kind not in ("probe", "zeroshot", "user"):
        raise CscopeError(f"unknown model {model!r}", hint="--model probe | zeroshot, or --model-file / --entry-point")
    name, dataset_cfg = project.dataset(dataset_name)
    split = split_name or project.manifest.get(CategorizeConfig).evaluate_split or project.split(dataset_cfg, claims_split)
    groups = compute_groups(project, name, split, claims_split=claims_split, device=device, reporter=reporter)
    n_classes = len(groups.class_names)
    if kind == "probe":
        predictions, model_meta = probe_predictions(project, groups, n_classes, reporter)
    else:
        session = ModelSession(project, run_context(project, name, split, device=device))
        classifier = build_classifier(session, kind, groups.class_names, model_file=model_file,
                                      entry_point=entry_point, preprocess=preprocess)
        predictions = image_predictions(project, groups, classifier, session.device, reporter)
        model_meta = {"kind": classifier.kind, "description": classifier.description}
    seed = project.settings.seed
    report = evaluate_predictions(groups, predictions, seed=seed, confidence=confidence)
    report["meta"] = {"dataset": name, "split": split, "claims_split": groups.claims_split, "model": model_meta,
                      "n_images": int(len(groups.labels)), "class_names": groups.class_names, "seed": seed,
                      "latents_entries": {k: v.key for k, v in groups.entries.items()},
                      "cscope_version": conceptscope_cli.__version__}
    stem = {"probe": "probe", "zeroshot": "zeroshot"}.get(kind) or (
        f"user-{model_file.stem}" if model_file is not None else "user-" + str(entry_point).replace(":", "-"))
    path = project.outputs_dir / name / split / "check" / f"{stem}.json"
    write_json_atomic(path, report)
    return report, path


__all__ = ["check_model", "evaluate_predictions", "verdict", "dataclasses"]
