"""`cscope export`: the HTML report, class × concept tables and the SAE weights of one split.

Reads what the earlier stages wrote (running them first when they are missing or out of
date, like `make`): the concept dictionary (`<outputs>/<dataset>/<split>/`), the
categorization (`<outputs>/<dataset>/<split>_concept_categorization.json`), the SAE entry,
the image-level latents and the activations (for heatmaps). Output folder: `[export]
out_dir`, default `<outputs>/report/<dataset>/<split>/`:

    report.html                 single-file report (or report/index.html + report/assets/)
    concepts.csv, concepts.json every class × candidate concept with all scores
    sae/saelens/                cfg.json + sae_weights.safetensors (SAELens)
    sae/cscope/                 sae.safetensors + cfg.json (cscope, `load_sae`)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import conceptscope_cli
from conceptscope_cli.act.report import act_fingerprint, act_section
from conceptscope_cli.artifacts import ConceptDict, LatentStats
from conceptscope_cli.cache.store import content_key, write_json_atomic
from conceptscope_cli.config.sections import ExportConfig
from conceptscope_cli.errors import CscopeError, MissingArtifactError
from conceptscope_cli.export import tables
from conceptscope_cli.export.assets import AssetStore, heatmap_overlay
from conceptscope_cli.export.report import RenderedReport, ReportInputs, build_report_data, render_report
from conceptscope_cli.export.weights import export_sae
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project

if TYPE_CHECKING:
    from conceptscope_cli.categorize.stage import CategorizeResult
    from conceptscope_cli.config.sections import DatasetConfig
    from conceptscope_cli.context import RunContext


@dataclass
class ExportedFile:
    kind: str  # html, csv, json, saelens, cscope-sae
    path: Path
    size_bytes: int


@dataclass
class ExportResult:
    out_dir: Path
    files: list[ExportedFile] = field(default_factory=list)
    report_form: str | None = None  # "single" or "folder" when the HTML report was written
    up_to_date: bool = False  # nothing was rewritten: the inputs match the previous export

    def path(self, kind: str) -> Path | None:
        """Path of the file (or folder) of one kind; None when it was not written."""
        for item in self.files:
            if item.kind == kind:
                return item.path
        return None

    @property
    def total_bytes(self) -> int:
        return sum(item.size_bytes for item in self.files)


def export_config(project: Project) -> ExportConfig:
    """The `[export]` section, or the defaults while the section is not registered."""
    try:
        return project.manifest.get(ExportConfig)
    except KeyError:
        return ExportConfig()


def default_out_dir(project: Project, dataset: str, split: str, cfg: ExportConfig) -> Path:
    if cfg.out_dir:
        return project.manifest.resolve_path(cfg.out_dir)
    return project.outputs_dir / "report" / dataset / split


def export_stamp(categorization_stamp: str | None, concept: ConceptDict, cfg: ExportConfig, act: Any) -> str:  # noqa: ANN401
    """What an export depends on (kept in `.export.stamp` beside the files); `act` is
    `act_fingerprint` of the groups / check-model / diff outputs the report shows."""
    return content_key({
        "categorization": categorization_stamp,
        "names": {str(k): name for k, name in concept.names().items()},
        "export": dataclasses.asdict(cfg),
        "act": act,
        "format_version": conceptscope_cli.FORMAT_VERSION,
    })


STAMP_FILE = ".export.stamp"


def stamp_record(stamp: str, result: ExportResult) -> dict[str, Any]:
    """The content of `.export.stamp` (read back by `current_export`): the stamp and every file,
    its path relative to the export folder so that a moved project is still up to date."""
    return {"stamp": stamp, "report_form": result.report_form, "files": [
        {"kind": f.kind, "path": os.path.relpath(f.path, result.out_dir), "size_bytes": f.size_bytes}
        for f in result.files]}


def current_export(target: Path, stamp: str) -> ExportResult | None:
    """The export already in `target` when its stamp matches and every file is there."""
    stamp_file = target / STAMP_FILE
    if not stamp_file.is_file():
        return None
    previous = json.loads(stamp_file.read_text())
    files = [ExportedFile(f["kind"], target / f["path"], f["size_bytes"]) for f in previous.get("files", [])]
    if previous.get("stamp") == stamp and files and all(f.path.exists() for f in files):
        return ExportResult(target, files, previous.get("report_form"), up_to_date=True)
    return None


def export_settings(project: Project, config: ExportConfig | None, formats: list[str] | None) -> ExportConfig:
    """`[export]` (or `config`), with `formats` overriding its formats; an invalid section is refused."""
    cfg = config or export_config(project)
    if formats is not None:
        cfg = dataclasses.replace(cfg, formats=list(formats))
    try:
        cfg.validate()
    except ValueError as exc:
        raise CscopeError(f"[export]: {exc}") from None
    return cfg


def export(
    project: Project,
    dataset: str | None = None,
    split: str | None = None,
    *,
    formats: list[str] | None = None,
    out_dir: Path | None = None,
    device: str | None = None,
    config: ExportConfig | None = None,
    reporter: Reporter | None = None,
    ctx: RunContext | None = None,
) -> ExportResult:
    """Export one split. `formats`, `out_dir` override `[export]` (None: the manifest's value);
    `config` replaces the whole section (tests, library use). `cscope run` passes its resolved `ctx`
    (dataset, split, device; the names are then ignored). The tables, the SAE folders and the
    report are written by `_write_tables`, `_write_sae` and `_write_report`."""
    from conceptscope_cli.categorize.stage import categorize
    from conceptscope_cli.context import run_context

    reporter = reporter or NullReporter()
    cfg = export_settings(project, config, formats)
    if ctx is not None:
        dataset, split, device = ctx.dataset, ctx.split, ctx.device_name
    name, dataset_cfg = project.dataset(dataset)
    split_name = project.split(dataset_cfg, split)
    target = Path(out_dir) if out_dir is not None else default_out_dir(project, name, split_name, cfg)
    target.mkdir(parents=True, exist_ok=True)

    if ctx is not None:
        categorized = categorize(project, ctx=ctx, reporter=reporter)
    else:
        categorized = categorize(project, name, split_name, device=device, reporter=reporter)
        ctx = run_context(project, name, split_name, device=device)  # categorize resolved it: the memo's
    concept = ConceptDict.load(categorized.out_dir)
    sae_dir = concept.sae_dir(project.cache)  # refused (exit 3) when gone, even for an up-to-date export
    stamp = export_stamp(categorized.categorization["meta"].get("stamp"), concept, cfg,
                         act_fingerprint(project.outputs_dir, name))
    current = current_export(target, stamp)
    if current is not None:
        return current
    (target / STAMP_FILE).unlink(missing_ok=True)

    result = ExportResult(target)
    result.files += _write_tables(categorized.categorization, concept, cfg, target)
    # Latents made straight from the images have no activation entry: their own record tells the same.
    meta = concept.meta
    activations = project.cache.lookup("activations", meta["activations_entry"]) or \
        project.cache.lookup("latents", meta["latents_entry"])
    if activations is None:
        raise MissingArtifactError("the activations behind this dictionary are no longer in the cache",
                                   command="cscope dict", hint="run `cscope dict` again")
    if "saelens" in cfg.formats:
        result.files += _write_sae(project, ctx, sae_dir, concept.meta, dataset_cfg, target)
    if "html" in cfg.formats:
        report = _write_report(project, ctx, cfg, categorized, concept, sae_dir, activations.record, target,
                               reporter)
        result.report_form = report.form
        result.files.append(ExportedFile("html", report.path, report.size_bytes))
    write_json_atomic(target / STAMP_FILE, stamp_record(stamp, result))
    return result


def _write_tables(categorization: dict[str, Any], concept: ConceptDict, cfg: ExportConfig,
                  target: Path) -> list[ExportedFile]:
    """concepts.csv / concepts.json (the formats asked for) of every class × candidate concept."""
    kinds = [kind for kind in ("csv", "json") if kind in cfg.formats]
    if not kinds:
        return []
    rows = tables.concept_rows(categorization, {str(k): name for k, name in concept.names().items()})
    files = []
    for kind in kinds:
        path = target / f"concepts.{kind}"
        (tables.write_csv if kind == "csv" else tables.write_json)(rows, path)
        files.append(ExportedFile(kind, path, path.stat().st_size))
    return files


def _write_sae(project: Project, ctx: RunContext, sae_dir: Path, meta: dict[str, Any], dataset_cfg: DatasetConfig,
               target: Path) -> list[ExportedFile]:
    """The SAE in SAELens' layout and in cscope's (`sae/saelens/`, `sae/cscope/`)."""
    folders = export_sae(sae_dir, target / "sae", context_size=_context_size(project, ctx, meta),
                         dataset_path=_dataset_path(project, sae_dir, dataset_cfg))
    return [ExportedFile(kind, folders[key], sum(p.stat().st_size for p in folders[key].iterdir()))
            for kind, key in (("saelens", "saelens"), ("cscope-sae", "cscope"))]


def _write_report(project: Project, ctx: RunContext, cfg: ExportConfig, categorized: CategorizeResult,
                  concept: ConceptDict, sae_dir: Path, activations_record: dict[str, Any], target: Path,
                  reporter: Reporter) -> RenderedReport:
    """The HTML report (single file or folder, `render_report`) from every stage's outputs."""
    from conceptscope_cli.dictionary.latents import load_stats

    name, split_name = ctx.dataset, ctx.split

    meta, split_dir = concept.meta, categorized.out_dir
    latents = project.cache.lookup("latents", meta["latents_entry"])
    if latents is None:
        raise MissingArtifactError("the image-level latents behind this dictionary are no longer in the cache",
                                   command="cscope dict", hint="run `cscope dict` again")
    stats = load_stats(latents.path / "stats.h5")
    inputs = ReportInputs(
        meta=_overview(project, cfg, name, split_name, meta, sae_dir, activations_record),
        categorization=categorized.categorization, concepts=concept.to_json()["latents"],
        latent_stats=LatentStats.load(split_dir).latents, reference_dir=split_dir,
        class_mean=stats.get("class_mean"), class_frequency=stats.get("class_frequency"),
        act=act_section(project.outputs_dir, name),
    )
    images = ProjectImages(project, ctx, meta, latents.path,
                           sae_dir, stats, cfg)
    try:
        data, store = build_report_data(inputs, cfg, images, reporter)
    finally:
        images.close()
    return render_report(data, store, target, cfg)


def _context_size(project: Project, ctx: RunContext, meta: dict[str, Any]) -> int:
    """Tokens per image at the SAE's layer: from the token cache, or from the backbone's patch grid."""
    from conceptscope_cli.extract.store import ActivationReader

    entry = project.cache.lookup("activations", meta["activations_entry"])
    if entry is not None:
        return ActivationReader(entry.path).n_tokens
    from conceptscope_cli.backbone.capture import select_tokens
    from conceptscope_cli.config.sections import BackboneConfig
    from conceptscope_cli.session import ModelSession

    grid = ModelSession(project, ctx).grid  # from the config: no weights read
    return len(select_tokens(1 + grid[0] * grid[1], project.manifest.get(BackboneConfig).tokens))


def _dataset_path(project: Project, sae_dir: Path, fallback: Any) -> str | None:
    """Where the SAE's training activations came from (Hub id or folder), for SAELens' dataset_path."""
    from conceptscope_cli.config.sections import DatasetConfig
    from conceptscope_cli.sae.checkpoint import read_cfg_json

    cfg = read_cfg_json(sae_dir / "cfg.json")
    trained_on = (cfg.get("provenance") or {}).get("dataset")
    configured = project.manifest.named(DatasetConfig).get(trained_on) if trained_on else None
    source = configured or fallback
    if source.source == "hf":
        return source.path
    return str(project.manifest.resolve_path(source.path))


def _overview(project: Project, cfg: ExportConfig, dataset: str, split: str, meta: dict[str, Any], sae_dir: Path,
              activations_record: dict[str, Any]) -> dict[str, Any]:
    """Facts for the report's overview: data, backbone, layer and the SAE's quality."""
    from conceptscope_cli.sae.checkpoint import read_cfg_json, read_eval_metrics

    sae_cfg = read_cfg_json(sae_dir / "cfg.json")
    metrics = read_eval_metrics(sae_dir, sae_cfg)
    summary = activations_record.get("summary", {})
    return {
        "title": cfg.title or project.settings.name,
        "project": project.settings.name,
        "dataset": dataset,
        "split": split,
        "backbone": summary.get("model") or (sae_cfg.get("provenance") or {}).get("backbone"),
        "layer": summary.get("layer"),
        "layer_index": summary.get("layer_index"),
        "tokens": summary.get("tokens"),
        "n_images": meta.get("n_images"),
        "class_names": meta.get("class_names", []),
        "sae": {
            "architecture": sae_cfg.get("architecture"),
            "d_in": sae_cfg.get("d_in"),
            "d_sae": sae_cfg.get("d_sae"),
            "k": sae_cfg.get("k") if sae_cfg.get("architecture") != "relu" else None,
            "fvu": metrics.get("fvu"),
            "l0": metrics.get("l0"),
            "dead_fraction": metrics.get("dead_fraction"),
        },
        "cscope_version": conceptscope_cli.__version__,
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


class ProjectImages:
    """Report images from a project: top images with heatmaps, and class examples.

    Heatmaps are the SAE latent over the patch tokens of the cached activations, drawn on the
    crop the model saw; class examples are plain crops ranked by the image-level latent.
    """

    def __init__(self, project: Project, ctx: RunContext, meta: dict[str, Any], latents_path: Path, sae_dir: Path,
                 stats: dict[str, np.ndarray], cfg: ExportConfig) -> None:
        from conceptscope_cli.dictionary.sparse import LatentMatrix
        from conceptscope_cli.session import ModelSession

        self.cfg = cfg
        self.device = ctx.device
        self.matrix = LatentMatrix(latents_path / "latents.h5")
        self.top_positions = stats["top_positions"]
        self.top_values = stats["top_values"]
        # The crop and the patch grid come from the model's config: CLIP's weights are loaded only when
        # the dictionary has no token cache and the few images shown are re-run (dict source "images").
        session = ModelSession(project, ctx, sae_dir, meta)
        self.sae = session.sae
        self.view = session.view
        self.grid: tuple[int, int] = session.grid
        self.split = session.split
        self.reader = session.reader

    def close(self) -> None:
        self.matrix.close()

    def concept_images(self, latents: list[int], n: int, store: AssetStore) -> dict[int, list[tuple[str, int, float]]]:
        from conceptscope_cli.dictionary.reference import fetch_images, patch_maps

        chosen: dict[int, list[tuple[int, float]]] = {}
        for k in latents:
            pairs = zip(self.top_positions[k][:n], self.top_values[k][:n]) if k < len(self.top_positions) else []
            chosen[k] = [(int(p), float(v)) for p, v in pairs if v > 0]
        missing = [(k, p) for k, items in chosen.items() for p, _ in items if store.get(f"heat/{p}/{k}") is None]
        if missing:
            positions = np.array([p for _, p in missing], dtype=np.int64)
            owners = np.array([k for k, _ in missing], dtype=np.int64)
            maps = patch_maps(self.reader, self.sae, positions, owners, self.grid, self.device)
            rows = [int(self.reader.row_index[p]) for p in positions]
            images = fetch_images(self.split, rows)
            crops: dict[int, Any] = {}
            for (k, p), row, patch_map in zip(missing, rows, maps):
                if row not in crops:
                    crops[row] = self.view.pixels(images[row])
                overlay = heatmap_overlay(crops[row], patch_map, self.cfg.heatmap_opacity)
                store.add(f"heat/{p}/{k}", overlay, max_size=self.cfg.thumbnail_size)
        labels = self.reader.labels
        return {k: [(store.ref(f"heat/{p}/{k}"), int(labels[p]), v) for p, v in items] for k, items in chosen.items()}

    def class_examples(self, label: int, latents: list[int], n: int,
                       store: AssetStore) -> dict[int, tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
        from conceptscope_cli.dictionary.reference import fetch_images

        positions = self.matrix.class_positions(label)
        if not len(positions) or not latents:
            return {}
        values = sparse_columns(self.matrix, positions, latents)  # (P, L)
        picks: dict[int, tuple[list[int], list[int]]] = {}
        for j, k in enumerate(latents):
            column = values[:, j]
            high = [int(i) for i in np.argsort(-column, kind="stable")[:n] if column[i] > 0]
            taken = set(high)
            low = [int(i) for i in np.argsort(column, kind="stable") if int(i) not in taken][:n]
            picks[k] = (high, low)
        needed = sorted({int(positions[i]) for high, low in picks.values() for i in high + low
                         if store.get(f"crop/{int(positions[i])}") is None})
        if needed:
            rows = {p: int(self.reader.row_index[p]) for p in needed}
            images = fetch_images(self.split, list(rows.values()))
            for p in needed:
                store.add(f"crop/{p}", self.view.to_crop(images[rows[p]]), max_size=self.cfg.thumbnail_size)
        out = {}
        for j, k in enumerate(latents):
            high, low = picks[k]
            out[k] = ([(store.ref(f"crop/{int(positions[i])}"), float(values[i, j])) for i in high],
                      [(store.ref(f"crop/{int(positions[i])}"), float(values[i, j])) for i in low])
        return out


def sparse_columns(matrix: Any, positions: np.ndarray, latents: list[int]) -> np.ndarray:
    """Values of some latents at some rows of a `LatentMatrix`, (len(positions), len(latents)).

    Reads each run of consecutive positions as one slice of the CSR arrays and never
    densifies a whole row (m can be 50k latents), so a class of an ImageNet-size split costs
    a few reads.
    """
    positions = np.asarray(positions, dtype=np.int64)
    wanted = np.asarray(latents, dtype=np.int64)
    order = np.argsort(wanted)
    sorted_wanted = wanted[order]
    out = np.zeros((len(positions), len(wanted)), dtype=np.float32)
    if not len(positions) or not len(wanted):
        return out
    sort = np.argsort(positions, kind="stable")
    sorted_pos = positions[sort]
    breaks = np.flatnonzero(np.diff(sorted_pos) != 1) + 1
    start = 0
    for stop in [*map(int, breaks), len(sorted_pos)]:
        first, last = int(sorted_pos[start]), int(sorted_pos[stop - 1])
        lo, hi = int(matrix.indptr[first]), int(matrix.indptr[last + 1])
        if hi > lo:
            indices = matrix.file["indices"][lo:hi].astype(np.int64)
            values = matrix.file["values"][lo:hi].astype(np.float32)
            row_of = np.repeat(np.arange(last - first + 1), np.diff(matrix.indptr[first:last + 2]))
            slot = np.searchsorted(sorted_wanted, indices).clip(0, len(sorted_wanted) - 1)
            hit = sorted_wanted[slot] == indices
            out[sort[start + row_of[hit]], order[slot[hit]]] = values[hit]
        start = stop
    return out
