"""`cscope ablate classes`: class-wise latent ablation (PatchSAE, METHOD §7) and the
bias test of `cscope categorize`'s output.

Zero-shot classification over the C classes, logits = CLIP logit scale · cos(image, t_c)
with t_c the class's text feature averaged over the prompt templates. Every image of the
measured split is classified

    unspliced               the backbone alone
    spliced                 SAE spliced in, nothing removed (= unspliced when keep_error)
    reconstruction          SAE reconstruction only (no error term), nothing removed
    keep_top{k} / zero_top{k}
                            only its class's top-k latents kept / those zeroed (at every
                            spliced token; the error term per `keep_error`)
    zero_target, zero_context, zero_bias
                            its class's target / context / bias concepts (categorize) zeroed
    zero_random_context     as many random non-bias context latents of its class as it has
                            bias concepts zeroed (seeded by (seed, class, repeat); the mean
                            over `random_repeats` draws)

Each image gets the latents of its *own* class, so every condition is one forward pass per
batch. A class's top-k are ordered by the dictionary statistics of `rank_split` (default the
dataset's first split, not the measured one). Per class: accuracy and mean probability of the
true class under each condition, and drops relative to `spliced`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptscope_cli.ablate.common import (
    MaskEdit,
    PartStore,
    Session,
    ablate_config,
    batch_ranges,
    class_text,
    eval_split,
    image_features,
    iter_todo,
    load_batch,
    open_session,
    settings_json,
    split_rows,
    stamp_of,
    write_csv,
)
from conceptscope_cli.ablate.plot import Bars, Panel, Series, render
from conceptscope_cli.attribute.core import image_text_scores
from conceptscope_cli.cache.store import write_json_atomic
from conceptscope_cli.config.sections import AblateConfig
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project

GROUPS = ("target", "context", "bias")
SETTINGS = ("max_images", "batch_size", "prompt_templates", "keep_error", "ks", "class_ranking", "concept_groups",
            "random_repeats", "rank_split")


@dataclass
class ClassAblation:
    """One class. accuracy / probability: condition -> value over the class's images (NaN without images)."""

    name: str
    index: int
    n_images: int
    accuracy: dict[str, float]
    probability: dict[str, float]  # mean softmax probability of the true class
    top_latents: list[int]  # the class's latents by the ranking statistic (first max(ks))
    groups: dict[str, list[int]]  # target / context / bias from categorize (empty without concept_groups)
    random_context: list[list[int]]  # the random draws, one per repeat

    def accuracy_drop(self, condition: str) -> float:
        return self.accuracy["spliced"] - self.accuracy[condition]

    def probability_drop(self, condition: str) -> float:
        return self.probability["spliced"] - self.probability[condition]

    @property
    def n_bias(self) -> int:
        return len(self.groups.get("bias", []))


@dataclass
class ClassAblationResult:
    dataset: str
    split: str
    rank_split: str
    n_images: int
    ks: list[int]
    conditions: list[str]
    overall: dict[str, dict[str, float]]  # condition -> {accuracy, probability, mean_class_accuracy}
    classes: dict[str, ClassAblation]
    out_dir: Path
    json_path: Path
    csv_path: Path
    plot_path: Path
    skipped: list[tuple[int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def bias_vs_random(self) -> dict[str, tuple[float, float]]:
        """class -> (accuracy drop with its bias concepts zeroed, with random context zeroed),
        for classes that have bias concepts."""
        return {name: (c.accuracy_drop("zero_bias"), c.accuracy_drop("zero_random_context"))
                for name, c in self.classes.items() if c.n_bias and "zero_bias" in c.accuracy}


def class_orders(stats: dict[str, np.ndarray], statistic: str, n_classes: int, k: int) -> np.ndarray:
    """Each class's first k latents by a (C, m) statistic, strongest first -> (n_classes, k).

    Classes with no row in the statistics (absent from the rank split) get index order."""
    table = stats[statistic]
    m = table.shape[1]
    rows = np.zeros((n_classes, m))
    rows[:min(n_classes, len(table))] = table[:n_classes]
    return np.argsort(-rows, axis=1, kind="stable")[:, :k]


def random_context(context: list[int], bias: list[int], seed: int, label: int, repeats: int) -> list[list[int]]:
    """`repeats` draws of len(bias) latents from the class's non-bias context latents
    (all of them when there are fewer), seeded by (seed, class, repeat)."""
    pool = np.array(sorted(set(context) - set(bias)), dtype=np.int64)
    size = min(len(bias), len(pool))
    return [sorted(int(x) for x in np.random.default_rng([seed, label, r]).choice(pool, size, replace=False))
            for r in range(repeats)]


def _mask(lists: list[list[int]], labels: np.ndarray, m: int) -> torch.Tensor:
    """Per image, its class's latent list -> (B, m) bool."""
    mask = torch.zeros(len(labels), m, dtype=torch.bool)
    for b, c in enumerate(labels):
        ids = lists[int(c)]
        if len(ids):
            mask[b, torch.as_tensor(ids, dtype=torch.long)] = True
    return mask


def ablation_batch(
    session: Session, images: torch.Tensor, labels: np.ndarray, text: torch.Tensor, conditions: dict[str, tuple[list[list[int]], bool] | None],
    keep_error: bool,
) -> dict[str, dict[str, list]]:
    """{condition: {"pred": (B,), "prob": (B,)}}; conditions: name -> (per-class latent
    lists, keep) or None for the three references (named unspliced / spliced / reconstruction)."""
    m = int(session.sae.d_sae)
    out = {}
    for name, spec in conditions.items():
        if name == "unspliced":
            features = image_features(session, images, spliced=False)
        elif name == "spliced":
            features = image_features(session, images, keep_error=keep_error)
        elif name == "reconstruction":
            features = image_features(session, images, keep_error=False)
        else:
            assert spec is not None
            lists, keep = spec
            features = image_features(session, images, keep_error=keep_error, edit=MaskEdit(_mask(lists, labels, m), keep=keep))
        _, prob = image_text_scores(features, text, session.logit_scale)
        prob = prob.double().cpu()
        out[name] = {"pred": prob.argmax(1).tolist(),
                     "prob": prob[torch.arange(len(labels)), torch.as_tensor(labels, dtype=torch.long)].tolist()}
    return out


def class_ablation(
    project: Project,
    dataset: str | None = None,
    split: str | None = None,
    *,
    config: AblateConfig | None = None,
    device: str | None = None,
    out_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> ClassAblationResult:
    """Per-class zero-shot accuracy under class-wise latent ablations (see the module doc).

    Builds the dictionary of `rank_split` (and categorizes it when `concept_groups`) first;
    both are no-ops when up to date. Writes `<outputs>/<dataset>/<split>/ablate/classes/`
    (or `out_dir`): parts/, class_ablation.json, class_ablation.csv, class_ablation.png.
    """
    from conceptscope_cli.data.datasets import open_split
    from conceptscope_cli.dictionary.latents import load_stats
    from conceptscope_cli.dictionary.stage import build_dictionary, split_outputs

    reporter = reporter or NullReporter()
    cfg = ablate_config(project, config)
    session = open_session(project, dataset, device=device, reporter=reporter)
    split_name = eval_split(session.dataset_cfg, split, cfg)
    rank_split = cfg.rank_split or session.dataset_cfg.splits[0]
    if rank_split not in session.dataset_cfg.splits:
        raise CscopeError(f"[ablate] rank_split {rank_split!r} is not a split of {session.dataset!r}")
    handle = open_split(session.dataset, session.dataset_cfg, split_name, project.root, project.cache)
    class_names = handle.class_names or []
    if not class_names:
        raise CscopeError(f"dataset {session.dataset!r} has no class names", hint=f"set class_names in [datasets.{session.dataset}]")
    n_classes, m = len(class_names), int(session.sae.d_sae)

    dictionary = build_dictionary(project, session.dataset, rank_split, device=device, reporter=reporter)
    stats = load_stats(dictionary.latents_entry.path / "stats.h5")
    ks = sorted({min(k, m) for k in cfg.ks})
    orders = class_orders(stats, cfg.class_ranking, n_classes, max(ks))
    groups: dict[str, list[list[int]]] = {}
    draws: list[list[list[int]]] = [[] for _ in range(n_classes)]
    notes: list[str] = []
    if cfg.concept_groups:
        from conceptscope_cli.categorize.stage import categorize

        categorized = categorize(project, session.dataset, rank_split, device=device, reporter=reporter).categorization["classes"]
        for group in GROUPS:
            groups[group] = [[int(e["latent"]) for e in categorized.get(name, {}).get(group, [])] for name in class_names]
        draws = [random_context(groups["context"][c], groups["bias"][c], project.settings.seed, c, cfg.random_repeats)
                 for c in range(n_classes)]
        short = [class_names[c] for c in range(n_classes) if draws[c] and len(draws[c][0]) < len(groups["bias"][c])]
        if short:
            notes.append(f"fewer non-bias context latents than bias concepts in {', '.join(short)}: random draws are smaller")

    conditions: dict[str, tuple[list[list[int]], bool] | None] = {"unspliced": None, "spliced": None, "reconstruction": None}
    for k in ks:
        conditions[f"keep_top{k}"] = ([orders[c, :k].tolist() for c in range(n_classes)], True)
    for k in ks:
        conditions[f"zero_top{k}"] = ([orders[c, :k].tolist() for c in range(n_classes)], False)
    for group in groups:
        conditions[f"zero_{group}"] = (groups[group], False)
    for r in range(cfg.random_repeats if groups else 0):
        conditions[f"zero_random_context.{r}"] = ([draws[c][r] for c in range(n_classes)], False)

    out = Path(out_dir) if out_dir is not None else split_outputs(project, session.dataset, split_name) / "ablate" / "classes"
    n_rows = split_rows(handle, cfg)
    ranges = batch_ranges(n_rows, cfg.batch_size)
    meta = {**session.meta(), "split": split_name, "rank_split": rank_split, "split_fingerprint": handle.fingerprint,
            "class_names": class_names, "latents_entry": dictionary.latents_entry.key,
            "settings": settings_json(cfg, SETTINGS), "conditions": list(conditions),
            # which latents each condition removes, hashed (the lists are in the per-class results)
            "latents_hash": stamp_of({name: [list(map(int, ids)) for ids in spec[0]] for name, spec in conditions.items() if spec})}
    stamp = stamp_of(meta)
    store = PartStore(out, stamp)
    text = class_text(session.backbone, class_names, cfg.prompt_templates)

    reporter.task(f"class ablation {session.dataset}/{split_name}", n_rows)
    for index, start, stop in iter_todo(store, ranges, reporter):
        batch = load_batch(handle, start, stop, session.backbone.preprocess)
        part: dict[str, Any] = {"rows": [], "labels": [], "failures": [[int(r), e] for r, e in batch.failures], "conditions": {}}
        if batch.images is not None:
            keep = (batch.labels >= 0) & (batch.labels < n_classes)
            part["failures"] += [[int(r), "no class label"] for r in batch.row_index[~keep]]
            if keep.any():
                images = batch.images[torch.as_tensor(keep)].to(session.device)
                labels = batch.labels[keep]
                part["conditions"] = ablation_batch(session, images, labels, text, conditions, cfg.keep_error)
                part["rows"], part["labels"] = batch.row_index[keep].tolist(), labels.tolist()
        store.write(index, part)

    return _assemble(store.load(len(ranges)), meta, stamp, cfg, out, session.dataset, split_name, rank_split, ks,
                     list(conditions), orders, groups, draws, notes)


def _assemble(
    parts: list[dict[str, Any]], meta: dict[str, Any], stamp: str, cfg: AblateConfig, out: Path, dataset: str, split: str,
    rank_split: str, ks: list[int], raw_conditions: list[str], orders: np.ndarray, groups: dict[str, list[list[int]]],
    draws: list[list[list[int]]], notes: list[str],
) -> ClassAblationResult:
    class_names: list[str] = meta["class_names"]
    labels = np.asarray([c for p in parts for c in p["labels"]], dtype=np.int64)
    skipped = [(int(r), str(e)) for p in parts for r, e in p["failures"]]
    repeats = [c for c in raw_conditions if c.startswith("zero_random_context.")]
    conditions = [c for c in raw_conditions if c not in repeats] + (["zero_random_context"] if repeats else [])
    correct: dict[str, np.ndarray] = {}
    prob: dict[str, np.ndarray] = {}
    for name in raw_conditions:
        pred = np.asarray([v for p in parts if p["rows"] for v in p["conditions"][name]["pred"]], dtype=np.int64)
        correct[name] = (pred == labels).astype(np.float64)
        prob[name] = np.asarray([v for p in parts if p["rows"] for v in p["conditions"][name]["prob"]], dtype=np.float64)
    if repeats:  # the random baseline is the mean over its draws
        correct["zero_random_context"] = np.mean([correct[r] for r in repeats], axis=0)
        prob["zero_random_context"] = np.mean([prob[r] for r in repeats], axis=0)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if len(values) else float("nan")

    classes = {}
    for c, name in enumerate(class_names):
        sel = labels == c
        classes[name] = ClassAblation(
            name=name, index=c, n_images=int(sel.sum()),
            accuracy={k: mean(correct[k][sel]) for k in conditions},
            probability={k: mean(prob[k][sel]) for k in conditions},
            top_latents=orders[c].tolist(),
            groups={g: groups[g][c] for g in groups}, random_context=draws[c],
        )
    overall = {k: {"accuracy": mean(correct[k]), "probability": mean(prob[k]),
                   "mean_class_accuracy": float(np.nanmean([classes[n].accuracy[k] for n in class_names]))
                   if any(classes[n].n_images for n in class_names) else float("nan")}
               for k in conditions}
    if skipped:
        notes = [*notes, f"{len(skipped)} rows skipped (undecodable or unlabelled)"]

    def class_json(item: ClassAblation) -> dict[str, Any]:
        return {
            "class": item.index, "n_images": item.n_images, "accuracy": item.accuracy, "probability": item.probability,
            "accuracy_drop": {k: item.accuracy_drop(k) for k in conditions},
            "probability_drop": {k: item.probability_drop(k) for k in conditions},
            "top_latents": item.top_latents, "groups": item.groups, "random_context": item.random_context,
            "n_bias": item.n_bias,
        }

    data = {"meta": {**meta, "stamp": stamp, "n_images": int(len(labels)), "skipped": [list(s) for s in skipped],
                     "notes": notes, "summary_conditions": conditions},
            "ks": ks, "conditions": conditions, "overall": overall,
            "classes": {name: class_json(item) for name, item in classes.items()}}
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, plot_path = out / "class_ablation.json", out / "class_ablation.csv", out / "class_ablation.png"
    write_json_atomic(json_path, data)
    rows = []
    for name, item in [("(all)", None), *classes.items()]:
        for k in conditions:
            acc = overall[k]["accuracy"] if item is None else item.accuracy[k]
            p = overall[k]["probability"] if item is None else item.probability[k]
            base_acc = overall["spliced"]["accuracy"] if item is None else item.accuracy["spliced"]
            base_p = overall["spliced"]["probability"] if item is None else item.probability["spliced"]
            n = len(labels) if item is None else item.n_images
            rows.append([name, k, _k_of(k), n, acc, p, base_acc - acc, base_p - p])
    write_csv(csv_path, ["class", "condition", "k", "n_images", "accuracy", "probability", "accuracy_drop", "probability_drop"], rows)
    _plot(classes, overall, ks, conditions, f"{dataset}/{split}").save(plot_path)
    return ClassAblationResult(dataset, split, rank_split, int(len(labels)), ks, conditions, overall, classes, out,
                               json_path, csv_path, plot_path, skipped, notes)


def _k_of(condition: str) -> int | None:
    for prefix in ("keep_top", "zero_top"):
        if condition.startswith(prefix):
            return int(condition[len(prefix):])
    return None


def _plot(classes: dict[str, ClassAblation], overall: dict[str, dict[str, float]], ks: list[int], conditions: list[str], title: str):  # noqa: ANN202
    x = [float(i) for i in range(len(ks))]
    ticks = [(float(i), str(k)) for i, k in enumerate(ks)]
    flat = lambda key: [overall[key]["mean_class_accuracy"]] * len(ks)  # noqa: E731
    series = [
        Series("keep top-k", x, [overall[f"keep_top{k}"]["mean_class_accuracy"] for k in ks]),
        Series("zero top-k", x, [overall[f"zero_top{k}"]["mean_class_accuracy"] for k in ks]),
        Series("unspliced", x, flat("unspliced"), dashed=True),
        Series("spliced, nothing removed", x, flat("spliced"), dashed=True),
    ]
    panels: list[Panel | Bars] = [Panel("class's own top-k latents", "k", "mean per-class accuracy", series, ticks)]
    if "zero_bias" in conditions:
        names = list(classes)
        panels.append(Bars("accuracy drop per class (vs spliced)", "accuracy drop", names, {
            "bias concepts zeroed": [classes[n].accuracy_drop("zero_bias") for n in names],
            "random context zeroed": [classes[n].accuracy_drop("zero_random_context") for n in names],
            "target concepts zeroed": [classes[n].accuracy_drop("zero_target") for n in names],
        }))
    return render(panels, f"class ablation {title}")
