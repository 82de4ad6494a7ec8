"""`cscope ablate faithfulness`: deletion and insertion curves (attributing-clip, METHOD §6).

For an image x with label c, y = cos(CLIP_img(x), t_c), t_c the class's text feature
(prompts averaged over the templates). With the SAE spliced after block L,

    z′ = Σ_{k ∉ D} f_k W_dec[k] + b_dec + e          e = z − ẑ (detached; 0 when keep_error = false)

Each image's latents are ordered by a score (attribution R_k = f_k ∂y/∂f_k from
`conceptscope_cli.attribute`, mean activation, seeded random order among its active
latents, ...), and

    deletion  y_del[i] = y with D = the top-i latents               i = 0..n
    insertion y_ins[i] = y with D = every latent except the top-i    i = 0..n

so deletion starts from the unchanged model (keep_error: y_del[0] = y exactly) and
insertion starts from b_dec + e alone (every latent removed) and adds the top-i back.
Both curves keep the same error term, so they share their endpoints once n covers every
active latent. Area under a curve: trapezoid over the fraction i/n ∈ [0, 1] (`curve_area`);
a faithful ranking has a small deletion area and a large insertion area.
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
    ids_mask,
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
from conceptscope_cli.cache.store import write_json_atomic
from conceptscope_cli.config.sections import AblateConfig
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project

CURVES = ("deletion", "insertion")
SETTINGS = ("max_images", "batch_size", "prompt_templates", "keep_error", "n_deletions", "rankings")


@dataclass
class CurveSummary:
    """One ranking's curve over the images. Arrays have n + 1 entries (i = 0..n)."""

    mean: list[float]
    std: list[float]
    ci95: list[float]  # half-width of the 95% normal interval of the mean
    area: float  # mean over images of the per-image area (= area of the mean curve)
    area_std: float
    area_ci95: float


@dataclass
class FaithfulnessResult:
    dataset: str
    split: str
    n_images: int
    steps: list[int]  # 0..n
    rankings: dict[str, dict[str, CurveSummary]]  # ranking -> "deletion" | "insertion" -> summary
    out_dir: Path
    json_path: Path
    csv_path: Path
    plot_path: Path
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row_index, error) of undecodable images
    notes: list[str] = field(default_factory=list)

    def area(self, ranking: str, curve: str = "deletion") -> float:
        return self.rankings[ranking][curve].area


def curve_area(y: np.ndarray) -> np.ndarray:
    """Area under curves sampled at i = 0..n, trapezoid over x = i/n ∈ [0, 1].

    y: (..., n + 1) -> (...). A single point (n = 0) has area y[0].
    """
    y = np.asarray(y, dtype=np.float64)
    n = y.shape[-1] - 1
    if n == 0:
        return y[..., 0]
    return (y[..., 1:] + y[..., :-1]).sum(-1) / (2.0 * n)


def rank_latents(
    ranking: str, attribution: np.ndarray, activation: np.ndarray, rows: np.ndarray, seed: int, n: int
) -> np.ndarray:
    """Each image's first n latents by a score, strongest first.

    attribution, activation: (B, m); rows: (B,) dataset row indices (seed the random order,
    so it does not depend on batching). Returns ids (B, n). Ties keep index order.
    """
    if ranking == "attribution":
        return np.argsort(-attribution, axis=1, kind="stable")[:, :n]
    if ranking == "negative_attribution":
        return np.argsort(attribution, axis=1, kind="stable")[:, :n]
    if ranking == "activation":
        return np.argsort(-activation, axis=1, kind="stable")[:, :n]
    if ranking == "random":
        out = []
        for row, act in zip(rows, activation):
            rng = np.random.default_rng([seed, int(row)])
            active = np.flatnonzero(act > 0)
            # a random order of the active latents; inactive ones (f = 0, deleting them does
            # nothing) come after, in index order
            order = np.concatenate([rng.permutation(active), np.flatnonzero(act <= 0)])
            out.append(order[:n])
        return np.stack(out) if out else np.zeros((0, n), dtype=np.int64)
    raise ValueError(f"unknown ranking {ranking!r}")


def image_scores(session: Session, images: torch.Tensor, labels: np.ndarray, text: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(attribution R (B, m) of y = cos(image, own class), mean activation (B, m)).

    `attribute_batch` scores one prompt set for the whole batch, so images are grouped by
    label: each group is attributed against its own class's text feature only.
    """
    from conceptscope_cli.attribute.core import attribute_batch

    m = int(session.sae.d_sae)
    attribution = np.zeros((len(labels), m))
    activation = np.zeros((len(labels), m))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        scores = attribute_batch(session.model, session.sae, images[idx], text[int(c):int(c) + 1], layer=session.layer,
                                 tokens=session.tokens, objective="cosine", logit_scale=session.logit_scale, top_k=1)
        attribution[idx] = scores.attribution[:, 0].double().cpu().numpy()
        activation[idx] = scores.activation.double().cpu().numpy()
    return attribution, activation


def own_class_cosine(features: torch.Tensor, text: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """cos(image b, t_{label b}) (B,); features and text normalised."""
    own = text[torch.as_tensor(labels, dtype=torch.long, device=text.device)]
    return (features * own.to(features.dtype)).sum(-1).double().cpu().numpy()


def faithfulness_batch(
    session: Session, images: torch.Tensor, labels: np.ndarray, rows: np.ndarray, text: torch.Tensor,
    cfg: AblateConfig,
) -> dict[str, Any]:
    """Curves of one batch: {ranking: {"deletion"|"insertion": (B, n + 1)}} plus reference values (B,)."""
    m = int(session.sae.d_sae)
    n = min(cfg.n_deletions, m)
    seed = session.project.settings.seed
    attribution, activation = image_scores(session, images, labels, text)
    y = lambda **kw: own_class_cosine(image_features(session, images, **kw), text, labels)  # noqa: E731
    out: dict[str, Any] = {
        "unspliced": y(spliced=False),
        "reconstruction": y(keep_error=False),  # SAE only, nothing removed
        "bias_only": y(keep_error=False, edit=MaskEdit(torch.ones(m, dtype=torch.bool))),  # b_dec alone
        "n_active": (activation > 0).sum(1),
        "curves": {},
    }
    for ranking in cfg.rankings:
        ids = rank_latents(ranking, attribution, activation, rows, seed, n)
        curves = {name: np.zeros((len(labels), n + 1)) for name in CURVES}
        for i in range(n + 1):
            mask = ids_mask(ids[:, :i], m)
            curves["deletion"][:, i] = y(keep_error=cfg.keep_error, edit=MaskEdit(mask))
            curves["insertion"][:, i] = y(keep_error=cfg.keep_error, edit=MaskEdit(mask, keep=True))
        out["curves"][ranking] = {name: values.tolist() for name, values in curves.items()}
        out.setdefault("order", {})[ranking] = ids[:, :min(n, 10)].tolist()  # the first latents deleted, for inspection
    for key in ("unspliced", "reconstruction", "bias_only", "n_active"):
        out[key] = np.asarray(out[key]).tolist()
    return out


def summarise(values: np.ndarray) -> CurveSummary:
    """values (N, n + 1) -> mean / std / 95% CI per step, and the area statistics."""
    count = values.shape[0]
    ddof = 1 if count > 1 else 0
    std = values.std(0, ddof=ddof) if count else np.zeros(values.shape[1])
    areas = curve_area(values)
    area_std = float(areas.std(ddof=ddof)) if count else 0.0
    return CurveSummary(
        mean=values.mean(0).tolist() if count else [float("nan")] * values.shape[1],
        std=std.tolist(), ci95=(1.96 * std / np.sqrt(max(count, 1))).tolist(),
        area=float(areas.mean()) if count else float("nan"), area_std=area_std,
        area_ci95=1.96 * area_std / float(np.sqrt(max(count, 1))),
    )


def faithfulness(
    project: Project,
    dataset: str | None = None,
    split: str | None = None,
    *,
    config: AblateConfig | None = None,
    device: str | None = None,
    out_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> FaithfulnessResult:
    """Deletion / insertion curves of every image of a split, per ranking.

    Writes `<outputs>/<dataset>/<split>/ablate/faithfulness/` (or `out_dir`): parts/ (one
    file per batch, the unit of resume), curves.json, curves.csv, faithfulness.png.
    config: overrides the manifest's [ablate] section.
    """
    from conceptscope_cli.data.datasets import open_split
    from conceptscope_cli.dictionary.stage import split_outputs

    reporter = reporter or NullReporter()
    cfg = ablate_config(project, config)
    session = open_session(project, dataset, device=device, reporter=reporter)
    split_name = eval_split(session.dataset_cfg, split, cfg)
    handle = open_split(session.dataset, session.dataset_cfg, split_name, project.root, project.cache)
    class_names = handle.class_names or []
    if not class_names:
        raise CscopeError(f"dataset {session.dataset!r} has no class names", hint=f"set class_names in [datasets.{session.dataset}]")
    out = Path(out_dir) if out_dir is not None else split_outputs(project, session.dataset, split_name) / "ablate" / "faithfulness"
    n_rows = split_rows(handle, cfg)
    ranges = batch_ranges(n_rows, cfg.batch_size)
    meta = {**session.meta(), "split": split_name, "split_fingerprint": handle.fingerprint, "class_names": class_names,
            "settings": settings_json(cfg, SETTINGS)}
    stamp = stamp_of(meta)
    store = PartStore(out, stamp)
    text = class_text(session.backbone, class_names, cfg.prompt_templates)

    reporter.task(f"faithfulness {session.dataset}/{split_name}", n_rows)
    for index, start, stop in iter_todo(store, ranges, reporter):
        batch = load_batch(handle, start, stop, session.backbone.preprocess)
        part: dict[str, Any] = {"rows": [], "labels": [], "failures": [[int(r), e] for r, e in batch.failures]}
        if batch.images is not None:
            keep = (batch.labels >= 0) & (batch.labels < len(class_names))
            part["failures"] += [[int(r), "no class label"] for r in batch.row_index[~keep]]
            if keep.any():
                images = batch.images[torch.as_tensor(keep)].to(session.device)
                labels, rows = batch.labels[keep], batch.row_index[keep]
                part.update(faithfulness_batch(session, images, labels, rows, text, cfg))
                part["rows"], part["labels"] = rows.tolist(), labels.tolist()
        store.write(index, part)
    return _assemble(store.load(len(ranges)), meta, stamp, cfg, out, session.dataset, split_name, min(cfg.n_deletions, int(session.sae.d_sae)))


def _assemble(parts: list[dict[str, Any]], meta: dict[str, Any], stamp: str, cfg: AblateConfig, out: Path,
              dataset: str, split: str, n: int) -> FaithfulnessResult:
    """Final files from the parts alone, so a resumed run writes the same bytes."""
    rows = [r for p in parts for r in p["rows"]]
    labels = [c for p in parts for c in p["labels"]]
    skipped = [(int(r), str(e)) for p in parts for r, e in p["failures"]]
    steps = list(range(n + 1))
    per_image: dict[str, dict[str, np.ndarray]] = {}
    summaries: dict[str, dict[str, CurveSummary]] = {}
    for ranking in cfg.rankings:
        per_image[ranking] = {}
        summaries[ranking] = {}
        for curve in CURVES:
            chunks = [np.asarray(p["curves"][ranking][curve], dtype=np.float64) for p in parts if p["rows"]]
            values = np.concatenate(chunks) if chunks else np.zeros((0, n + 1))
            per_image[ranking][curve] = values
            summaries[ranking][curve] = summarise(values)
    reference = {key: [v for p in parts if p["rows"] for v in p[key]] for key in ("unspliced", "reconstruction", "bias_only", "n_active")}
    notes = []
    n_active = np.asarray(reference["n_active"])
    if len(n_active) and (n_active < n).any():
        notes.append(f"{int((n_active < n).sum())} of {len(n_active)} images have fewer than {n} active latents: "
                     "their curves are flat after the last active one")
    if skipped:
        notes.append(f"{len(skipped)} rows skipped (undecodable or unlabelled)")
    data = {
        "meta": {**meta, "stamp": stamp, "n_images": len(rows), "skipped": [list(s) for s in skipped], "notes": notes,
                 "band": cfg.band, "y": "cosine(image, own class text feature)"},
        "steps": steps,
        "rankings": {r: {c: vars(s) for c, s in curves.items()} for r, curves in summaries.items()},
        "images": {
            "row_index": rows, "label": labels, **reference,
            "order": {r: [ids for p in parts if p["rows"] for ids in p["order"][r]] for r in cfg.rankings},
            "curves": {r: {c: per_image[r][c].tolist() for c in CURVES} for r in cfg.rankings},
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, plot_path = out / "curves.json", out / "curves.csv", out / "faithfulness.png"
    write_json_atomic(json_path, data)
    table = []
    for r in cfg.rankings:
        for c in CURVES:
            s = summaries[r][c]
            for i in steps:
                table.append([r, c, i, s.mean[i], s.std[i], s.mean[i] - s.ci95[i], s.mean[i] + s.ci95[i], len(rows), s.area])
    write_csv(csv_path, ["ranking", "curve", "step", "mean", "std", "ci95_low", "ci95_high", "n_images", "area"], table)
    _plot(summaries, steps, cfg, len(rows), f"{dataset}/{split}").save(plot_path)
    return FaithfulnessResult(dataset, split, len(rows), steps, summaries, out, json_path, csv_path, plot_path, skipped, notes)


def _plot(summaries: dict[str, dict[str, CurveSummary]], steps: list[int], cfg: AblateConfig, n_images: int, title: str):  # noqa: ANN202
    band = "95% CI" if cfg.band == "ci95" else "± 1 std"
    stride = max(1, len(steps) // 10)
    ticks = [(float(i), str(i)) for i in steps[::stride]]
    panels: list[Panel | Bars] = []
    for curve, x_label in (("deletion", "top latents removed"), ("insertion", "top latents inserted")):
        series = []
        for ranking, by_curve in summaries.items():
            s = by_curve[curve]
            width = s.ci95 if cfg.band == "ci95" else s.std
            series.append(Series(f"{ranking} (area {s.area:.3f})", [float(i) for i in steps], s.mean,
                                 [a - w for a, w in zip(s.mean, width)], [a + w for a, w in zip(s.mean, width)],
                                 dashed=ranking == "random"))
        panels.append(Panel(curve, x_label, "cosine with own class", series, ticks))
    return render(panels, f"faithfulness {title}: {n_images} images, band {band}")
