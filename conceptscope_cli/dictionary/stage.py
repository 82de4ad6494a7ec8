"""`cscope dict`: the concept dictionary of one split.

1. image-level latents of every image (cache entry `latents/<key>`: CSR `latents.h5` +
   `stats.h5`), from the full token cache (extracted first when missing) or straight from the
   images in one streaming pass (`[dict] source`; no token cache);
2. valid latents (ConceptScope's rule, thresholds from `[dict]`);
3. reference tiles (top images masked by the latent's patch map, on the model's crop);
4. names (clip: offline; openai: a VLM; none).
Outputs go to `<outputs>/<dataset>/<split>/` (conceptscope_cli/FORMATS.md, "Concept dictionary").
A stamp of the inputs makes an unchanged re-run a no-op.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import conceptscope_cli
from conceptscope_cli import checks, numerics
from conceptscope_cli.artifacts import ConceptDict, ConceptEntry, LatentStats, ValidLatents
from conceptscope_cli.cache.disk import check_disk, latents_bytes
from conceptscope_cli.cache.store import CacheEntry, PendingEntry, content_key
from conceptscope_cli.config.sections import BOX_KEYS, BackboneConfig, DictConfig, ExtractConfig
from conceptscope_cli.distributed import build_entry, on_main
from conceptscope_cli.errors import CscopeError, MissingArtifactError
from conceptscope_cli.extract.activations import activation_key, extract_activations
from conceptscope_cli.extract.store import ActivationReader
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project

if TYPE_CHECKING:
    from conceptscope_cli.context import RunContext
    from conceptscope_cli.session import ModelSession

KIND = "latents"


@dataclass
class DictResult:
    out_dir: Path
    up_to_date: bool
    n_valid: int
    n_latents: int
    unnamed: list[int]
    latents_entry: CacheEntry


def split_outputs(project: Project, dataset: str, split: str) -> Path:
    return project.outputs_dir / dataset / split


def resolve_sae(project: Project, dataset: str, *, device: str | None, reporter: Reporter) -> tuple[Path, str, dict[str, Any]]:
    """(SAE folder, fingerprint, provenance) from `[dict] sae` or from `cscope train`'s entry."""
    from conceptscope_cli.sae.checkpoint import sae_fingerprint
    from conceptscope_cli.train.stage import train_stage

    configured = project.manifest.get(DictConfig).sae
    if configured:
        folder = project.manifest.resolve_path(configured)
        for name in ("sae.safetensors", "cfg.json"):
            if not (folder / name).is_file():
                raise MissingArtifactError(f"[dict] sae: no {name} in {folder}", command="cscope train --import PATH",
                                           hint="import one with `cscope train --import PATH`, or remove [dict] sae "
                                                "to train one")
        return folder, sae_fingerprint(folder), {"sae": str(folder)}
    # The SAE is trained on the dataset's first split, whichever split is being described.
    result = train_stage(project, dataset, None, device=device, reporter=reporter)
    return result.path, "cache:" + result.entry.key, {"sae_entry": result.entry.key}


def latents_inputs(cfg: DictConfig, activations_key: str, sae_key: str) -> dict[str, Any]:
    """What the image-level latents entry is keyed by."""
    return {"activations": activations_key, "sae": sae_key, "value_dtype": cfg.value_dtype}


def dict_stamp(project: Project, cfg: DictConfig, dataset_cfg: Any, latents_key: str) -> str:  # noqa: ANN401
    """The stamp that makes an unchanged `cscope dict` a no-op (stored in `.dict.stamp`)."""
    vocabulary_path = project.manifest.resolve_path(cfg.vocabulary) if cfg.vocabulary else None
    return content_key({
        "latents": latents_key,
        # Where the latents came from does not change them (same entry key): not part of the stamp.
        "dict": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "source"},
        # Class names etc. are part of the outputs; the object boxes are not (categorize reads them).
        "dataset": {k: v for k, v in dataclasses.asdict(dataset_cfg).items() if k not in BOX_KEYS},
        "vocabulary_sha256": hashlib.sha256(vocabulary_path.read_bytes()).hexdigest() if vocabulary_path else None,
        "openai": dataclasses.asdict(_openai_config(project)) if cfg.namer == "openai" else None,
        "format_version": conceptscope_cli.FORMAT_VERSION,
    })


def dict_is_current(out_dir: Path, stamp: str) -> bool:
    stamp_file = out_dir / ".dict.stamp"
    return (stamp_file.is_file() and stamp_file.read_text() == stamp and ConceptDict.path(out_dir).is_file()
            and (out_dir / "concept_groups.json").is_file())


def latents_entry(
    project: Project, ctx: RunContext, activations: CacheEntry, sae_dir: Path, sae_key: str, *, reporter: Reporter
) -> CacheEntry:
    """Image-level latents (+ statistics) of an activation entry under one SAE, cached; the SAE is
    opened on `ctx`'s device through the one loader (no backbone: the activations are cached)."""
    from conceptscope_cli.dictionary import latents as L
    from conceptscope_cli.session import ModelSession

    device = ctx.device

    cfg = project.manifest.get(DictConfig)
    inputs = latents_inputs(cfg, activations.key, sae_key)
    key = content_key(inputs)
    existing = project.cache.lookup(KIND, key)
    if existing:
        return existing
    reader = ActivationReader(activations.path)

    def build(pending: PendingEntry) -> int:
        """Every rank encodes its share of the activation shards into CSR parts."""
        sae = ModelSession(project, ctx, sae_dir).sae
        if sae.W_enc.shape[0] != reader.d_model:
            raise CscopeError(f"SAE input width {sae.W_enc.shape[0]} does not match the activations' {reader.d_model}")
        L.compute_latent_parts(reader, sae, pending.path, device=device, value_dtype=cfg.value_dtype,
                               chunk_images=cfg.chunk_images, reporter=reporter)
        return int(sae.W_enc.shape[1])

    def finish(pending: PendingEntry, n_latents: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0: parts → one `latents.h5`, then the statistics in one streaming pass."""
        n_classes = int(reader.labels.max()) + 1 if reader.n_images and reader.labels.max() >= 0 else 1
        result = L.finish_latents(reader, pending.path, n_latents, n_classes=n_classes, value_dtype=cfg.value_dtype,
                                  reporter=reporter)
        summary = {**activations.record["summary"], "d_sae": n_latents}
        stats = {"n_images": result.n_images, "nnz": result.nnz,
                 "mean_active_per_image": result.nnz / max(result.n_images, 1)}
        return summary, stats

    entry, _ = build_entry(project.cache, KIND, key, inputs, build, finish)
    return entry


def full_token_entry(project: Project, dataset: str, split: str) -> CacheEntry | None:
    """A complete cache entry holding every token of every image: the full-token entry, or the
    training sample when `tokens_per_image` kept every token (K >= the patch count)."""
    key, _, _ = activation_key(project, dataset, split, full_tokens=True)
    entry = project.cache.lookup("activations", key)
    if entry is not None:
        return entry
    sample_key, _, _ = activation_key(project, dataset, split)
    sample = project.cache.lookup("activations", sample_key)
    return sample if sample is not None and sample.record["stats"].get("all_tokens") else None


def latents_source(project: Project, dataset: str, split: str) -> str:
    """"cache" or "images" for `[dict] source` ("auto": a complete full-token cache entry if any)."""
    source = project.manifest.get(DictConfig).source
    if source != "auto":
        return source
    return "cache" if full_token_entry(project, dataset, split) is not None else "images"


def latents_from_images(project: Project, ctx: RunContext, sae_dir: Path, sae_key: str, *,
                        reporter: Reporter) -> tuple[str, CacheEntry]:
    """(full-token activation key, latents entry) of `ctx`'s split computed straight from the images.

    The entry's key is the one the cache source gives (same activations, same SAE): both
    describe the same latents, so `auto` reuses whichever was made first."""
    from conceptscope_cli.dictionary import latents as L
    from conceptscope_cli.extract.images import ImageTokens
    from conceptscope_cli.session import ModelSession

    dataset, split_name = ctx.dataset, ctx.split
    cfg = project.manifest.get(DictConfig)
    extract_cfg = project.manifest.get(ExtractConfig)
    backbone_cfg = project.manifest.get(BackboneConfig)
    activations_key, _, split = activation_key(project, dataset, split_name, full_tokens=True)
    inputs = latents_inputs(cfg, activations_key, sae_key)
    key = content_key(inputs)
    existing = project.cache.lookup(KIND, key)
    if existing:
        return activations_key, existing
    total = split.num_rows
    if extract_cfg.limit is not None:
        total = extract_cfg.limit if total is None else min(total, extract_cfg.limit)
    if total is None:
        raise CscopeError(f'[dict] source = "images" needs a split of known length; {dataset}/{split_name} is streamed',
                          hint='set [extract] limit, or [dict] source = "cache"')
    resolved = project.resolved_backbone()

    def build(pending: PendingEntry) -> tuple[int, list[int], int]:
        session = ModelSession(project, ctx, sae_dir)  # every rank: its own device (the run context's)
        backbone = session.backbone
        tokens = ImageTokens(backbone, backbone_cfg)
        sae = session.sae
        if sae.W_enc.shape[0] != backbone.d_model:
            raise CscopeError(f"SAE input width {sae.W_enc.shape[0]} does not match the backbone's {backbone.d_model}")
        missing = L.missing_part_rows(pending.path, int(total), extract_cfg.shard_size)
        if missing:
            m = int(sae.W_enc.shape[1])
            per_image = L.probe_active_per_image(split, tokens, sae, min(int(total), extract_cfg.batch_size))
            expected = latents_bytes(missing, per_image, m, len(split.class_names or []) or 1, cfg.value_dtype,
                                     n_parts=-(-missing // extract_cfg.shard_size))
            check_disk(f"dict {dataset}/{split_name} from images ({missing} images, ~{per_image:.0f} active latents "
                       f"each of {m})", expected, project.cache.root, force=project.force_disk, log=reporter.log)
        indices = L.compute_latent_parts_from_images(
            split, tokens, sae, pending.path, n_rows=int(total), shard_size=extract_cfg.shard_size,
            batch_size=extract_cfg.batch_size, num_workers=project.settings.num_workers, value_dtype=cfg.value_dtype,
            reporter=reporter)
        return int(sae.W_enc.shape[1]), indices, tokens.layer

    def finish(pending: PendingEntry, built: tuple[int, list[int], int]) -> tuple[dict[str, Any], dict[str, Any]]:
        n_latents, indices, layer = built
        skipped = L.skipped_in_parts(pending.path, indices)
        result = L.finish_latents(None, pending.path, n_latents, n_classes=None, value_dtype=cfg.value_dtype,
                                  reporter=reporter, indices=indices)
        summary = {"model": resolved.description, "layer": backbone_cfg.layer, "layer_index": layer,
                   "tokens": backbone_cfg.tokens, "dataset": dataset, "split": split_name, "d_sae": n_latents}
        stats = {"n_images": result.n_images, "nnz": result.nnz, "source": "images",
                 "mean_active_per_image": result.nnz / max(result.n_images, 1), "n_skipped": len(skipped),
                 "skipped": [{"row_index": r, "error": e} for r, e in skipped]}
        return summary, stats

    entry, _ = build_entry(project.cache, KIND, key, inputs, build, finish)
    return activations_key, entry


def build_dictionary(
    project: Project,
    dataset_name: str | None = None,
    split_name: str | None = None,
    *,
    device: str | None = None,
    reporter: Reporter | None = None,
    ctx: RunContext | None = None,
) -> DictResult:
    """The concept dictionary of a split. The CLI and `cscope run` pass the resolved `ctx`; library
    callers may name dataset, split and device instead (resolved by `run_context`, ignored with `ctx`)."""
    from conceptscope_cli.context import run_context

    reporter = reporter or NullReporter()
    cfg = project.manifest.get(DictConfig)
    if ctx is None:
        ctx = run_context(project, dataset_name, split_name, device=device)
    name, split, device = ctx.dataset, ctx.split, ctx.device_name
    if project.manifest.get(BackboneConfig).tokens == "cls":
        raise CscopeError("cscope dict needs patch tokens, but [backbone] tokens = \"cls\"", hint='use tokens = "all"')
    api_key = None
    if cfg.namer == "openai":  # fail before any work when the key is missing
        from conceptscope_cli.dictionary.openai_namer import resolve_api_key

        api_key = resolve_api_key(_openai_config(project), project.root)

    sae_dir, sae_key, sae_provenance = resolve_sae(project, name, device=device, reporter=reporter)
    source = latents_source(project, name, split)
    if source == "cache":
        activations = full_token_entry(project, name, split) or extract_activations(
            project, name, split, device=device, reporter=reporter, full_tokens=True).entry
        activations_key = activations.key
        latents = latents_entry(project, ctx, activations, sae_dir, sae_key, reporter=reporter)
    else:
        activations_key, latents = latents_from_images(project, ctx, sae_dir, sae_key, reporter=reporter)
    # Valid latents, tiles and names are small next to the latents: rank 0 makes them.
    return on_main(lambda: _describe(project, cfg, ctx, activations_key, latents, sae_dir, sae_provenance, api_key,
                                     reporter))


@dataclass
class Description:
    """What the dictionary says about a split's latents from their statistics alone (no files, no model)."""

    valid: np.ndarray  # (v,) valid latent ids, ascending
    n_latents: int  # m
    n_noisy: int  # latents whose mean activation when active is above the noisy threshold
    n_strong: int  # latents with at least min_strong_images strong images
    thresholds: dict[str, float]  # noisy_threshold, strong_value (and the scale s under "relative")
    latent_stats: dict[str, dict[str, Any]]  # str(latent) -> its row of latent_stats.json, valid latents only


def describe_latents(stats: dict[str, np.ndarray], cfg: DictConfig, class_names: list[str]) -> Description:
    """Valid latents (ConceptScope's rule with `[dict]`'s thresholds, `dictionary/valid.py`) and the
    summary of each: `stats` as `load_stats` returns it (mean, mean_when_active, frequency (m, taus),
    top_values (m, K), class_mean / class_frequency (C, m), top_label_entropy (m,))."""
    from conceptscope_cli.dictionary.latents import select_valid_latents
    from conceptscope_cli.dictionary.valid import valid_thresholds

    thresholds = valid_thresholds(cfg, stats["top_values"])
    valid, reasons = select_valid_latents(stats, noisy_threshold=thresholds["noisy_threshold"],
                                          min_strong_images=cfg.min_strong_images,
                                          strong_value=thresholds["strong_value"])
    return Description(valid=valid, n_latents=len(stats["mean"]), n_noisy=int(reasons["noisy"].sum()),
                       n_strong=int(reasons["strong"].sum()), thresholds=thresholds,
                       latent_stats={str(int(k)): _latent_stats(stats, int(k), class_names) for k in valid})


def concept_entries(valid: np.ndarray, names: dict[int, dict[str, Any]], tiles: dict[int, dict[str, Any]],
                    out_dir: Path, namer: str) -> dict[int, ConceptEntry]:
    """concept_dict.json's "latents": each valid latent's name (and its scores) and reference tile."""
    return {
        int(k): ConceptEntry(
            name=names.get(int(k), {}).get("name"),
            score=names.get(int(k), {}).get("score"),
            clarity=names.get(int(k), {}).get("clarity"),
            source=namer,
            error=names.get(int(k), {}).get("error"),
            reference_image=str(tiles[int(k)]["path"].relative_to(out_dir)) if int(k) in tiles else None,
            reference_rows=tiles.get(int(k), {}).get("rows", []),
        )
        for k in valid
    }


def _current_result(out_dir: Path, cfg: DictConfig, latents: CacheEntry, where: str) -> DictResult:
    """The finished dictionary of an unchanged re-run (its warnings shown again)."""
    concept = ConceptDict.load(out_dir)
    stored = ValidLatents.load(out_dir)
    if stored.thresholds is not None:
        checks.report(checks.check_valid_latents(
            len(stored.valid_latents), concept.n_latents, stored.n_noisy, concept.n_latents - stored.n_strong,
            stored.thresholds["rule"], {k: v for k, v in stored.thresholds.items() if k != "rule"}, where))
    return DictResult(out_dir, True, len(concept.latents), concept.n_latents,
                      [k for k, v in concept.latents.items() if v.name is None and cfg.namer != "none"], latents)


def _describe(project: Project, cfg: DictConfig, ctx: RunContext, activations_key: str, latents: CacheEntry,
              sae_dir: Path, sae_provenance: dict[str, Any], api_key: str | None, reporter: Reporter) -> DictResult:
    """Rank 0: the split's dictionary files from its latents entry (the math is `describe_latents`)."""
    from conceptscope_cli.dictionary.group_file import write_dictionary_groups
    from conceptscope_cli.dictionary.latents import load_stats
    from conceptscope_cli.dictionary.reference import write_reference_tiles
    from conceptscope_cli.session import ModelSession

    name, split, where = ctx.dataset, ctx.split, f"{ctx.dataset}/{ctx.split}"
    out_dir = split_outputs(project, name, split)
    stamp = dict_stamp(project, cfg, ctx.dataset_cfg, latents.key)
    if dict_is_current(out_dir, stamp):
        return _current_result(out_dir, cfg, latents, where)

    session = ModelSession(project, ctx, sae_dir)
    stats = load_stats(latents.path / "stats.h5")
    class_names = session.split.class_names or []
    described = describe_latents(stats, cfg, class_names)
    valid = described.valid
    meta = {
        "dataset": name,
        "split": split,
        "n_latents": described.n_latents,
        "n_images": int(latents.record["stats"]["n_images"]),
        "class_names": class_names,
        "latents_entry": latents.key,
        # The full-token entry these latents describe; it may not exist (latents from images).
        "activations_entry": activations_key,
        **sae_provenance,
        "settings": dataclasses.asdict(cfg),
        "numerics": numerics.in_effect(),  # CSCOPE_NUMERICS: which code paths computed these figures
        "cscope_version": conceptscope_cli.__version__,
    }
    ValidLatents(meta, [int(k) for k in valid], described.n_noisy, described.n_strong,
                 {"rule": cfg.valid_rule, **described.thresholds}).save(out_dir)
    checks.report(checks.check_valid_latents(len(valid), described.n_latents, described.n_noisy,
                                             described.n_latents - described.n_strong, cfg.valid_rule,
                                             described.thresholds, where))
    LatentStats(meta, list(map(float, _taus())), described.latent_stats).save(out_dir)

    # Patch maps of the top images: read from the token cache, or recomputed for just those images.
    session.meta = meta
    reporter.task("dict: reference tiles", len(valid), unit="latents")
    tiles = write_reference_tiles(
        out_dir / "reference", valid, stats["top_positions"], stats["top_values"], reader=session.reader,
        sae=session.sae, split=session.split, view=session.view, grid=session.grid, device=ctx.device,
        n_images=cfg.reference_images,
    )
    reporter.advance(len(valid))
    names = _name(project, cfg, valid, stats, session, tiles, out_dir, api_key, reporter)
    unnamed = [k for k, n in names.items() if n.get("name") is None and cfg.namer != "none"]
    concept = ConceptDict(meta, concept_entries(valid, names, tiles, out_dir, cfg.namer))
    concept.save(out_dir)
    write_dictionary_groups(out_dir, meta, latents.path / "latents.h5", valid, stats["top_positions"],
                            session.sae.W_dec.detach().cpu().numpy(),
                            concept.names(),
                            enabled=cfg.group_latents, threshold=cfg.group_threshold)
    if not unnamed:  # a run with failed names is not up to date: the next run retries them
        (out_dir / ".dict.stamp").write_text(stamp)
    return DictResult(out_dir, False, len(valid), described.n_latents, unnamed, latents)


def _taus() -> tuple[float, ...]:
    from conceptscope_cli.dictionary.latents import TAUS

    return TAUS


def _latent_stats(stats: dict[str, np.ndarray], k: int, class_names: list[str]) -> dict[str, Any]:
    class_mean = stats["class_mean"][:, k]
    order = np.argsort(-class_mean)[:5]
    return {
        "frequency": [float(x) for x in stats["frequency"][k]],
        "mean": float(stats["mean"][k]),
        "mean_when_active": float(stats["mean_when_active"][k]),
        "top_label_entropy": float(stats["top_label_entropy"][k]),
        "max_value": float(stats["top_values"][k][0]),
        "top_classes": [
            {"label": int(c), "name": class_names[c] if c < len(class_names) else str(c),
             "mean": float(class_mean[c]), "frequency": float(stats["class_frequency"][c, k])}
            for c in order if class_mean[c] > 0
        ],
    }


def _openai_config(project: Project):  # noqa: ANN202
    from conceptscope_cli.config.sections import OpenAINamerConfig

    return project.manifest.get(OpenAINamerConfig)


def _name(project: Project, cfg: DictConfig, valid: np.ndarray, stats: dict[str, np.ndarray], session: ModelSession,
          tiles: dict[int, dict[str, Any]], out_dir: Path, api_key: str | None,
          reporter: Reporter) -> dict[int, dict[str, Any]]:
    """{latent: {"name", "score", "clarity", "error"}} by the configured namer."""
    if cfg.namer == "none" or len(valid) == 0:
        return {}
    if cfg.namer == "openai":
        from conceptscope_cli.dictionary.openai_namer import name_latents_openai

        if api_key is None:  # build_dictionary resolves it before any work
            raise ValueError("the openai namer needs the API key resolved")
        reporter.task("dict: naming (openai)", len(tiles), unit="latents")
        results = name_latents_openai(
            {k: v["path"] for k, v in tiles.items()}, _openai_config(project), api_key, out_dir / "openai_answers.jsonl",
            on_progress=reporter.advance,
        )
        return {k: {"name": r.name, "score": None, "clarity": None, "error": r.error} for k, r in results.items()}

    from conceptscope_cli.dictionary.clip_namer import embed_images, name_latents_clip, vocabulary_from
    from conceptscope_cli.dictionary.reference import fetch_images

    vocabulary = vocabulary_from(project.manifest.resolve_path(cfg.vocabulary) if cfg.vocabulary else None)
    reader, backbone = session.reader, session.backbone
    latent_rows = {
        int(k): [int(reader.row_index[p]) for p, v in zip(stats["top_positions"][k][:cfg.naming_images],
                                                           stats["top_values"][k][:cfg.naming_images]) if v > 0]
        for k in valid
    }
    all_rows = sorted({r for rows in latent_rows.values() for r in rows})
    reporter.task("dict: naming (clip)", len(all_rows), unit="images")
    images = fetch_images(session.split, all_rows)
    embeddings = embed_images(backbone.model, backbone.preprocess, [images[r] for r in all_rows], backbone.device)
    reporter.advance(len(all_rows))
    row_embeddings = {r: embeddings[i] for i, r in enumerate(all_rows)}
    text = session.encode_text([cfg.prompt_template.format(w) for w in vocabulary])
    empty = session.encode_text([""])[0]
    names = name_latents_clip(latent_rows, row_embeddings, vocabulary, text, empty)
    return {k: {"name": n.name, "score": n.score, "clarity": n.clarity, "error": None, "runner_up": n.runner_up}
            for k, n in names.items()}
