"""`cscope categorize`: target, context and bias concepts of every class (METHOD §4).

For each class: concept strength from the sparse latents, candidate latents, a seeded
image sample, patch masks on the model's own crop, CLIP similarities of the original,
sufficiency and necessity images, alignment, normalised alignment, target/context split
and the bias rule. Each class's result is written as soon as it is done
(`<outputs>/<dataset>/<split>/categorize/class_XXXXX.json`), so an interrupted run resumes
at the next class; the two summary files are assembled at the end.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

import conceptscope_cli
from conceptscope_cli import checks, numerics
from conceptscope_cli import masks as M
from conceptscope_cli.artifacts import AlignmentScores, Categorization, ConceptDict
from conceptscope_cli.cache.store import content_key, write_json_atomic
from conceptscope_cli.categorize import concepts as C
from conceptscope_cli.categorize import evidence as E
from conceptscope_cli.categorize import scores as S
from conceptscope_cli.categorize.context_run import ClassesEdit, context_checker
from conceptscope_cli.config.sections import CategorizeConfig
from conceptscope_cli.devices import host_to_device, release_free_memory
from conceptscope_cli.distributed import collectively, current, on_main
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project

if TYPE_CHECKING:
    from conceptscope_cli.context import RunContext

# `[categorize]` keys that only the assembly (the evidence rule) reads.
ASSEMBLY_KEYS = ("bias_rule", "fdr", "min_effect", "base_rate", "context_check", "context_samples")


@dataclass
class CategorizeResult:
    out_dir: Path
    up_to_date: bool
    categorization: dict[str, Any]


def categorization_paths(out_dir: Path, split: str) -> tuple[Path, Path, Path]:
    """(per-class folder, alignment scores, categorization) of one split's dictionary folder."""
    return (out_dir / "categorize", AlignmentScores.path(out_dir.parent, split),
            Categorization.path(out_dir.parent, split))


# Settings that only the bias-discovery evaluation, the batching or the replicates read: not in the stamp.
NOT_IN_STAMP = ("context_columns", "context_classes", "evaluate_split", "precision_k", "batch_size",
                "replicates", "replicate_match")  # replicates only add fields afterwards


def categorize_inputs(project: Project, cfg: CategorizeConfig, latents_key: str, concept: ConceptDict,
                      out_dir: Path, boxes: dict[str, str] | None = None) -> dict[str, Any]:
    """What a categorization depends on; its content key is the stamp in the outputs' meta.
    `out_dir` is the split's dictionary folder (its concept groups are part of the inputs);
    `boxes` where the dataset's objects are (`DatasetConfig.region_settings`: boxes or masks), read
    by the context-only check (their values are in the dataset fingerprint behind `latents_key`)."""
    return {
        "latents": latents_key,
        "dictionary": content_key(concept.meta["settings"]),
        "categorize": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_STAMP},
        "seed": project.settings.seed,
        "class_names": concept.meta["class_names"],
        # Candidates are concept groups (METHOD §Concept groups): a regrouping changes every class.
        "concept_groups": content_key({"groups": C.groups_key(C.concept_groups(out_dir, concept))}),
        "format_version": conceptscope_cli.FORMAT_VERSION,
        **({"object_boxes": boxes} if boxes else {}),
    }


def categorize_stamp(project: Project, cfg: CategorizeConfig, latents_key: str, concept: ConceptDict,
                     out_dir: Path, boxes: dict[str, str] | None = None) -> str:
    return content_key(categorize_inputs(project, cfg, latents_key, concept, out_dir, boxes))


def require_class_names(project: Project, ctx: RunContext) -> None:
    """Refuse, before any stage runs, a split whose classes have no names: categorization prompts
    CLIP with each class's name, and finding that out after extract, train and dict wastes them."""
    from conceptscope_cli.config.manifest import value_error
    from conceptscope_cli.data.datasets import open_split

    handle = open_split(ctx.dataset, ctx.dataset_cfg, ctx.split, project.root, project.cache)
    if not handle.class_names:
        column = ctx.dataset_cfg.label_column
        where = f"its label column {column!r} holds integers" if handle.labels and column else "it has no labels"
        raise value_error(
            ctx.dataset_cfg, "class_names",
            f"dataset {ctx.dataset!r} has no class names ({where}); categorize prompts CLIP with each class's name",
            hint=f'set class_names in [datasets.{ctx.dataset}], label i naming class_names[i] (e.g. class_names = '
                 '["cat", "dog"]), or point label_column at a column of names')


def categorize(
    project: Project,
    dataset_name: str | None = None,
    split_name: str | None = None,
    *,
    device: str | None = None,
    reporter: Reporter | None = None,
    ctx: RunContext | None = None,
) -> CategorizeResult:
    """Categorize every class of a split (split across ranks under torchrun; resumable per class).
    The CLI and `cscope run` pass the resolved `ctx`; library callers may name dataset, split and
    device instead (resolved by `run_context`, ignored with `ctx`)."""
    from conceptscope_cli.context import run_context
    from conceptscope_cli.dictionary.stage import build_dictionary

    reporter = reporter or NullReporter()
    cfg = project.manifest.get(CategorizeConfig)
    if ctx is None:
        ctx = run_context(project, dataset_name, split_name, device=device)
    name, split, device = ctx.dataset, ctx.split, ctx.device_name
    require_class_names(project, ctx)
    dictionary = build_dictionary(project, ctx=ctx, reporter=reporter)
    if dictionary.unnamed:
        raise CscopeError(f"{len(dictionary.unnamed)} latents could not be named", hint="run `cscope dict` again first")
    out_dir = dictionary.out_dir
    classes_dir, scores_path, categorization_path = categorization_paths(out_dir, split)
    concept = ConceptDict.load(out_dir)
    meta = concept.meta
    class_names = concept.class_names
    if not class_names:
        raise CscopeError(f"dataset {name!r} has no class names", hint=f"set class_names in [datasets.{name}]")
    inputs = categorize_inputs(project, cfg, dictionary.latents_entry.key, concept, out_dir,
                               ctx.dataset_cfg.region_settings())
    stamp = content_key(inputs)
    # The per-class files do not depend on the keys only the assembly uses: changing the bias rule
    # re-tests, it does not re-run the masked forwards.
    class_stamp = content_key({**inputs, "categorize": {k: v for k, v in inputs["categorize"].items()
                                                        if k not in ASSEMBLY_KEYS}})

    def prepare() -> dict[str, Any] | None:
        """Rank 0: drop stale per-class results; the finished categorization when up to date."""
        for path in (scores_path, categorization_path):  # left by a run killed while assembling (SIGKILL)
            for tmp in path.parent.glob(path.name + ".tmp*"):
                tmp.unlink(missing_ok=True)
        stamp_file = classes_dir / "stamp"
        if stamp_file.is_file() and stamp_file.read_text() != class_stamp:
            for old in classes_dir.glob("class_*.json"):  # settings changed: earlier per-class results are stale
                old.unlink()
        classes_dir.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(class_stamp)
        if categorization_path.is_file() and all((classes_dir / f"class_{y:05d}.json").is_file()
                                                 for y in range(len(class_names))):
            existing = Categorization.read(categorization_path)
            if existing.meta.get("stamp") == stamp:
                return existing.to_json()
        return None

    existing = on_main(prepare)
    if existing is not None:
        result = CategorizeResult(out_dir, True, existing)
    else:
        collectively(lambda: _categorize_classes(project, ctx, cfg, meta, concept, classes_dir,
                                                 dictionary.latents_entry.path, out_dir, reporter))
        checker = context_checker(project, ctx, cfg, concept, meta, reporter)
        result = on_main(lambda: _assemble(out_dir, split, classes_dir, scores_path, categorization_path, concept,
                                           meta, class_names, stamp, cfg, project.settings.seed,
                                           dictionary.latents_entry.path, checker))
    checks.report(checks.check_categories(result.categorization["classes"], f"{name}/{split}"))
    # Stability across SAE seeds (METHOD §Replicates): fields added to the finished categorization.
    from conceptscope_cli.categorize.replicates import add_replicates

    updated, changed = add_replicates(project, name, split, categorization_path, device=device, reporter=reporter)
    return CategorizeResult(out_dir, result.up_to_date and not changed, updated)


# --------------------------------------------------------------- one class: the math
@dataclass(frozen=True)
class ClassSimilarities:
    """Class similarity (max over the class's prompts of the cosine) of each sampled image:
    original (S,), and sufficiency / necessity (c, S) for each of the c candidates' masked images."""

    original: np.ndarray
    sufficiency: np.ndarray
    necessity: np.ndarray


def class_similarities(pixels: torch.Tensor, maps: torch.Tensor, text: torch.Tensor,
                       embed: Callable[[torch.Tensor], torch.Tensor], gamma_sufficiency: float,
                       gamma_necessity: float, *, original: torch.Tensor | None = None) -> ClassSimilarities:
    """Similarities of the original, sufficiency and necessity images (METHOD §4).

    pixels (S, 3, H, W) unnormalised crops the model saw; maps (S, c, gh, gw) each candidate's
    patch map per image; text (P, e) the class's prompt embeddings; embed: crops (n, 3, H, W) ->
    L2-normalised embeddings (n, e). A candidate's masks come from its patch maps, upsampled to
    the crop (`masks.patch_maps_to_masks`), and keep (sufficiency) or remove (necessity) its patches.
    `original`: the embeddings of `pixels` when the caller has them already (n, e)."""
    n, size = len(pixels), (int(pixels.shape[2]), int(pixels.shape[3]))
    similarity = np.asarray(S.class_similarity(embed(pixels) if original is None else original, text))
    sufficiency = np.zeros((maps.shape[1], n))
    necessity = np.zeros((maps.shape[1], n))
    for c in range(maps.shape[1]):
        mask = M.patch_maps_to_masks(maps[:, c], size)  # (S, H, W), on the crop the model saw
        suff, nec = M.masked_variants(pixels, mask, gamma_sufficiency, gamma_necessity)
        sims = np.asarray(S.class_similarity(embed(torch.cat([suff, nec])), text))
        sufficiency[c], necessity[c] = sims[:n], sims[n:]
    return ClassSimilarities(similarity, sufficiency, necessity)


def concept_patch_maps(features: torch.Tensor, members: list[tuple[int, ...]], grid: tuple[int, int]) -> torch.Tensor:
    """(S, c, gh, gw) on CPU: each candidate concept's patch map, the sum of its members' latent
    maps (a concept's activation is the sum of its members'). features (S, gh·gw, m): the SAE
    latents of the sampled images' patch tokens, row-major over the grid; members: c tuples of latent ids."""
    maps = [features[:, :, torch.as_tensor(ids, device=features.device)].sum(-1) for ids in members]
    return torch.stack(maps, dim=1).reshape(len(features), len(members), *grid).cpu()


@dataclass(frozen=True)
class ClassStrengths:
    """Per-concept tables of one split's concept statistics, (C, G) each: the three flavours of
    `[categorize] strength` ("mean" is ConceptScope's f(c, y)), and the presence frequencies."""

    mean: np.ndarray
    relative: np.ndarray
    effect: np.ndarray
    class_frequency: np.ndarray
    frequency: np.ndarray  # (G,) the split-wide frequency of each concept (first tau)

    @classmethod
    def of(cls, stats: dict[str, np.ndarray]) -> ClassStrengths:
        return cls(stats["class_mean"], S.relative_strength(stats["class_mean"], stats["mean"]),
                   S.effect_size(stats["class_mean"], stats["class_std"], stats["class_count"]),
                   stats["class_frequency"], stats["frequency"][:, 0])

    def row(self, y: int) -> dict[str, np.ndarray]:
        """(G,) rows of class y; a class absent from the statistics' split has zero strength everywhere."""
        g = self.mean.shape[1]
        return {name: table[y] if y < len(table) else np.zeros(g)
                for name, table in (("mean", self.mean), ("relative", self.relative), ("effect", self.effect))}


def class_candidates(strengths: ClassStrengths, y: int, cfg: CategorizeConfig) -> np.ndarray:
    """(c,) concept columns of class y's candidates: the top `[categorize] candidates` by the
    configured strength (every concept with positive strength for "all")."""
    k = None if cfg.candidates == "all" else int(cfg.candidates)
    ranking = strengths.row(y)[cfg.strength]
    return np.asarray(S.select_candidates(ranking, np.ones(len(ranking), dtype=bool), k), dtype=np.int64)


def score_class(y: int, columns: np.ndarray, sample: np.ndarray, sims: ClassSimilarities, strengths: ClassStrengths,
                space: C.ConceptSpace, cfg: CategorizeConfig, seed: int) -> dict[str, Any]:
    """The alignment scores, their bootstrap CIs and the target / context / bias split of one class's
    candidates (METHOD §4), as class_XXXXX.json's "similarities", "latents" and "categories".

    columns (c,) candidate concept columns; sample (S,) the sampled images' positions; the
    candidates are written under their representative latents' ids."""
    flavours = strengths.row(y)
    ranking = flavours[cfg.strength]  # ranks and drives the bias rule
    candidates = space.representative[columns]
    orig, suff, nec = sims.original, sims.sufficiency, sims.necessity
    reference = S.alignment_scores(orig, suff, nec)
    scores = reference if cfg.alignment == "reference" else S.robust_alignment(orig, suff, nec)
    ci = S.alignment_bootstrap(orig, suff, nec, estimator=cfg.alignment, seed=seed + y, n_boot=cfg.bootstrap,
                               confidence=cfg.confidence)
    cats = S.categorize_class(candidates, scores["alignment"], ranking[columns], cfg.target_threshold,
                              cfg.bias_threshold_sigma)
    if cfg.alignment == "robust":  # the published decision is kept as it is under "reference"
        cats = S.mark_uncertain(cats, ci["normalised_low"], ci["normalised_high"])
    else:
        cats.notes.extend(S.dropped_term_notes(candidates, reference, len(sample)))
    latents = {}
    for i, (latent, col) in enumerate(zip(candidates, columns)):
        latents[str(int(latent))] = {
            "members": [int(x) for x in space.members[col]],
            **{key: (int if key.endswith("_count") else float)(np.asarray(value)[i]) for key, value in scores.items()},
            "reference_alignment": float(reference["alignment"][i]),
            "alignment_low": float(ci["alignment_low"][i]), "alignment_high": float(ci["alignment_high"][i]),
            "normalized_alignment_low": float(ci["normalised_low"][i]),
            "normalized_alignment_high": float(ci["normalised_high"][i]),
            "sim_sufficiency_mean": float(suff[i].mean()),
            "sim_necessity_mean": float(nec[i].mean()),
            "concept_strength": float(flavours["mean"][col]),
            "relative_strength": float(flavours["relative"][col]),
            "effect_size": float(flavours["effect"][col]),
            "class_frequency": float(strengths.class_frequency[y, col]),
            "frequency": float(strengths.frequency[col]),
            "normalized_alignment_score": float(cats.normalised_alignment[i]),
        }
    return {
        "sim_original_mean": float(np.mean(orig)),
        # Per-image similarities: the alignment can be recomputed (and its CI re-drawn) from them.
        "similarities": {"candidates": [int(c) for c in candidates], "sample": [int(p) for p in sample],
                         "original": [float(v) for v in orig],
                         "sufficiency": suff.tolist(), "necessity": nec.tolist()},
        "latents": latents,
        "categories": _categories_json(cats),
    }


# ----------------------------------------------------------- every class: the I/O
def _categorize_classes(project: Project, ctx: RunContext, cfg: CategorizeConfig, meta: dict[str, Any],
                        concept: ConceptDict, classes_dir: Path, latents_path: Path, out_dir: Path,
                        reporter: Reporter) -> None:
    """This rank's classes (a contiguous range), one `class_XXXXX.json` each, skipping finished ones.

    Candidates are concepts (`categorize/concepts.py`): a concept's strength is computed from the
    sum of its members' activations, its patch map is the sum of theirs, and it is written under
    its representative latent's id. The math is `class_similarities` and `score_class`."""
    from conceptscope_cli.dictionary.reference import fetch_images
    from conceptscope_cli.dictionary.tokens import ImageTokenReader
    from conceptscope_cli.session import ModelSession

    class_names: list[str] = meta["class_names"]
    ranks = current()
    mine = ranks.span(len(class_names))
    todo = [y for y in mine if not (classes_dir / f"class_{y:05d}.json").is_file()]
    reporter.task(f"categorize {ctx.dataset}/{ctx.split}{ranks.label}", len(mine), unit="classes")
    reporter.advance(len(mine) - len(todo))
    if not todo:
        return

    space = C.concept_space(latents_path / "latents.h5", C.concept_groups(out_dir, concept), len(class_names))
    strengths = ClassStrengths.of(space.stats)  # (C, G) tables over the concepts' activations
    # The token cache when it exists, else the sampled images' tokens are recomputed (dict source "images")
    # in the forward of the originals that the similarities need anyway.
    session = ModelSession(project, ctx, concept.sae_dir(project.cache), meta)
    session.backbone  # noqa: B018 - the forwards need the model: load it first, so the crop is its own transform's
    reader, sae, grid = session.reader, session.sae, session.grid
    n_patches = grid[0] * grid[1]

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return session.embed_pixels(pixels, cfg.batch_size)

    for y in todo:
        class_name = class_names[y]
        columns = class_candidates(strengths, y, cfg)
        positions = np.flatnonzero(reader.labels == y)
        sample = np.asarray(S.sample_images(positions, cfg.num_samples, ctx.seed, y), dtype=np.int64)
        result: dict[str, Any] = {"class": y, "class_name": class_name, "n_images": int(len(positions)),
                                  "n_sampled": int(len(sample)), "latents": {}, "categories": None}
        if len(columns) and len(sample):
            rows = [int(r) for r in reader.row_index[sample]]
            images = fetch_images(session.split, rows)
            pixels = torch.stack([session.view.pixels(images[r]) for r in rows])  # (S, 3, H, W)
            if isinstance(reader, ImageTokenReader):
                # No token cache: the originals' forward (for their similarities) passes block L,
                # so their tokens are kept on the way instead of a second forward to block L.
                with reader.tokens.recorded() as kept:
                    embedded = embed(pixels)
                acts = torch.cat(kept).to(ctx.device)  # (S, T, d)
            else:
                embedded = embed(pixels)
                acts = host_to_device(reader.read_images(sample), ctx.device).float()  # (S, T, d)
            first_patch = acts.shape[1] - n_patches
            f = sae.encode(acts[:, first_patch:].reshape(-1, acts.shape[-1])).reshape(len(sample), n_patches, -1)
            maps = concept_patch_maps(f, [space.members[c] for c in columns], grid)
            text = session.encode_text([t.format(class_name) for t in cfg.prompt_templates])
            sims = class_similarities(pixels, maps, text, embed, cfg.gamma_sufficiency, cfg.gamma_necessity,
                                      original=embedded)
            result.update(score_class(y, columns, sample, sims, strengths, space, cfg, ctx.seed))
        else:
            result["categories"] = {"target": [], "context": [], "uncertain": [], "bias": [], "thresholds": None,
                                    "note": "no candidate latents" if len(sample) else "no images"}
        write_json_atomic(classes_dir / f"class_{y:05d}.json", result)
        release_free_memory()  # peak RSS bounded by one class's forwards, whatever the number of classes
        reporter.advance(1)


def _assemble(out_dir: Path, split: str, classes_dir: Path, scores_path: Path, categorization_path: Path,
              concept: ConceptDict, meta: dict[str, Any], class_names: list[str], stamp: str,
              cfg: CategorizeConfig, seed: int, latents_path: Path,
              checker: ClassesEdit | None = None) -> CategorizeResult:
    """Rank 0: the per-class files (written by any rank) become the two summary files, with the
    over-representation test of every (class, candidate) pair (BH over all of them) and, with a
    `checker`, the context-only check of every bias claim (METHOD §Categorization)."""
    per_class = [json.loads((classes_dir / f"class_{y:05d}.json").read_text()) for y in range(len(class_names))]
    names = {str(k): name for k, name in concept.names().items()}
    space = C.concept_space(latents_path / "latents.h5", C.concept_groups(out_dir, concept), len(class_names))
    evidence, ci = class_evidence(per_class, latents_path, len(class_names), cfg, seed, space=space)
    run_meta = {**meta, "stamp": stamp, "categorize": dataclasses.asdict(cfg), "seed": seed,
                "numerics": numerics.in_effect(),
                "alignment_estimator": cfg.alignment, "bias_rule": cfg.bias_rule,
                "evidence": {"test": "one-sided Mann-Whitney (tie- and continuity-corrected normal approximation), "
                                     "class vs rest of the split, on image-level activations",
                             "effect": "Cliff's delta = 2 AUROC - 1", "correction": "Benjamini-Hochberg",
                             "n_tests": len(evidence), "fdr": cfg.fdr, "min_effect": cfg.min_effect,
                             "bootstrap": cfg.bootstrap, "confidence": cfg.confidence, "ci_method": ci,
                             "levels": E.DEFAULT_LEVELS, "decades": E.DEFAULT_DECADES,
                             "base_rate": cfg.base_rate if cfg.bias_rule == "evidence" else None}}
    scores = AlignmentScores(run_meta, {
        c["class_name"]: {"class": c["class"], "n_images": c["n_images"], "n_sampled": c["n_sampled"],
                          "latents": {k: {**v, **evidence.get((c["class"], int(k)), {}), "name": names.get(k)}
                                      for k, v in c["latents"].items()}}
        for c in per_class
    })
    classes = {c["class_name"]: _entries(c, names, S.STRENGTH_FIELDS[cfg.strength], evidence, cfg) for c in per_class}
    _annotate_groups(classes, out_dir)
    if checker is not None:
        run_meta["context_check"] = checker(classes)  # moves the claims that fail it to `entangled`
        for info in classes.values():
            _summarise(info, cfg)
    ranking = rank_classes(classes)
    for position, class_name in enumerate(ranking):
        classes[class_name]["evidence"]["rank"] = position + 1
    categorization = Categorization(run_meta, ranking, classes)
    try:
        scores.write(scores_path)
        categorization.write(categorization_path)
    finally:  # a kill between the two writes must not leave a temporary file behind for good
        for path in (scores_path, categorization_path):
            for tmp in path.parent.glob(path.name + ".tmp*"):
                tmp.unlink(missing_ok=True)
    return CategorizeResult(out_dir, False, categorization.to_json())


def _annotate_groups(classes: dict[str, dict[str, Any]], out_dir: Path) -> None:
    """Each entry names its concept group (`concept_groups.json` of `cscope dict`, when present):
    entries of one group are the same concept split over latents. Candidates are still latents."""
    from conceptscope_cli.dictionary.group_file import FILE_NAME, read_concept_groups

    if not (out_dir / FILE_NAME).is_file():
        return
    groups = read_concept_groups(out_dir).groups  # the file's one reader
    members = {g.id: list(g.members) for g in groups}
    group_of = {latent: g.id for g in groups for latent in g.members}
    for info in classes.values():
        for kind in ("target", "context", "uncertain", "bias"):
            for entry in info[kind]:
                g = group_of.get(int(entry["latent"]))
                entry["group"] = g
                entry["group_members"] = members.get(g, [int(entry["latent"])]) if g is not None else None


EVIDENCE_FIELDS = ("effect", "effect_low", "effect_high", "auroc", "p_value", "q_value", "present_class",
                   "present_rest", "n_class", "n_rest", "over_represented", "effect_typical", "n_classes_compared")


def class_evidence(per_class: list[dict[str, Any]], latents_path: Path, n_classes: int, cfg: CategorizeConfig,
                   seed: int, chunk_rows: int | None = None, space: C.ConceptSpace | None = None
                   ) -> tuple[dict[tuple[int, int], dict[str, Any]], str]:
    """(class, latent) -> the over-representation evidence of every candidate of every class
    (METHOD §Categorization): one streaming pass over the split's CSR latents; and the CI method.

    With a concept space, a candidate id is a concept's representative latent and the test runs on
    the concept's activation (the sum of its members). Rows are read in blocks of `chunk_rows`
    (default: about `sparse.STREAM_BLOCK_NNZ` stored values, so memory does not grow with the split)."""
    from conceptscope_cli.dictionary.latents import load_stats
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    pairs = [(int(c["class"]), int(lat)) for c in per_class for lat in c.get("similarities", {}).get("candidates", [])]
    if not pairs:
        return {}, "none"
    unit_of_latent: np.ndarray | None = None
    pair_unit: np.ndarray | None = None
    if space is not None:  # units = concepts: each active with the sum of its members
        unit_of_latent, unit_max = space.assignment, space.stats["top_values"][:, 0].astype(np.float64)
        pair_unit = np.array([space.column_of(p[1]) for p in pairs])
    else:
        unit_max = load_stats(latents_path / "stats.h5")["top_values"][:, 0].astype(np.float64)
    with LatentMatrix(latents_path / "latents.h5") as matrix:
        step = chunk_rows or matrix.block_rows()

        def blocks():  # noqa: ANN202 - a generator of CSR row blocks
            for start in range(0, matrix.n_images, step):
                stop = min(start + step, matrix.n_images)
                indptr, indices, values = matrix.csr_block(start, stop)
                yield indptr, indices, values, matrix.labels[start:stop]

        units = np.arange(matrix.n_latents) if unit_of_latent is None else unit_of_latent
        tested = np.array([p[1] for p in pairs]) if pair_unit is None else pair_unit
        top = np.maximum(unit_max, 1e-30)
        hist = E.activation_histograms(blocks(), units, top, np.array([p[0] for p in pairs]), tested, n_classes)
        # The typical other class as a second base rate: a second O(nnz) pass (METHOD §Categorization).
        typical = cfg.base_rate == "typical" and cfg.bias_rule == "evidence"
        class_auroc = E.class_vs_class_auroc(blocks(), units, top, hist) if typical else None
    return _evidence_fields(pairs, hist, cfg, seed, class_auroc)


def _evidence_fields(pairs: list[tuple[int, int]], hist: Any, cfg: CategorizeConfig, seed: int,
                     class_auroc: np.ndarray | None = None) -> tuple[dict[tuple[int, int], dict[str, Any]], str]:
    ev = E.over_representation(hist, fdr=cfg.fdr, min_effect=cfg.min_effect, seed=seed, n_boot=cfg.bootstrap,
                               confidence=cfg.confidence, class_auroc=class_auroc)
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for i, key in enumerate(pairs):
        out[key] = {"effect": float(ev.delta[i]), "effect_low": float(ev.delta_low[i]),
                    "effect_high": float(ev.delta_high[i]), "auroc": float(ev.auroc[i]),
                    "p_value": float(ev.p_value[i]), "q_value": float(ev.q_value[i]),
                    "present_class": float(ev.present_class[i]), "present_rest": float(ev.present_rest[i]),
                    "n_class": int(ev.n_class[i]), "n_rest": int(ev.n_rest[i]),
                    "over_represented": bool(ev.significant[i])}
        if class_auroc is not None:  # null when no other class has images
            typical = float(ev.delta_typical[i])
            out[key]["effect_typical"] = typical if np.isfinite(typical) else None
            out[key]["n_classes_compared"] = int(ev.n_compared[i])
    return out, ev.ci_method


def rank_classes(classes: dict[str, dict[str, Any]]) -> list[str]:
    """Class names by strength of evidence: classes with a bias first, by the lower CI bound of
    their strongest bias's effect (then its q-value); then classes without, in class order."""
    def key(item: tuple[str, dict[str, Any]]) -> tuple[int, float, float, int]:
        info = item[1]["evidence"]
        if info["n_bias"] == 0:
            return (1, 0.0, 0.0, item[1]["class"])
        return (0, -info["strongest_effect_low"], info["min_q"], item[1]["class"])

    return [name for name, _ in sorted(classes.items(), key=key)]


def _categories_json(cats: Any) -> dict[str, Any]:
    return {
        "target": [int(x) for x in cats.target],
        "context": [int(x) for x in cats.context],
        "uncertain": [int(x) for x in cats.uncertain],
        "bias": [int(x) for x in cats.bias],
        "thresholds": {"target_threshold": float(cats.target_threshold), "bias_sigma": float(cats.bias_sigma),
                       "bias_strength_threshold": None if cats.bias_threshold is None else float(cats.bias_threshold)},
        "notes": list(cats.notes),
    }


def _entries(class_result: dict[str, Any], names: dict[str, str | None], strength_field: str,
             evidence: dict[tuple[int, int], dict[str, Any]], cfg: CategorizeConfig) -> dict[str, Any]:
    """Target / context / uncertain / bias lists with the scores readers need, strongest first (by
    the strength flavour the run used, ``strength_field``; the bias list by effect). Under
    ``bias_rule = "evidence"`` the bias list is the context concepts over-represented in the class."""
    latents = class_result["latents"]
    cats = class_result["categories"]
    y = class_result["class"]

    def entry(latent: int) -> dict[str, Any]:
        info = latents[str(latent)]
        return {"latent": latent, "name": names.get(str(latent)),
                "members": info.get("members", [latent]),  # the concept's latents (representative first)
                "alignment_score": info["alignment"], "normalized_alignment_score": info["normalized_alignment_score"],
                "alignment_ci": [info.get("alignment_low"), info.get("alignment_high")],
                "normalized_alignment_ci": [info.get("normalized_alignment_low"), info.get("normalized_alignment_high")],
                "sufficiency": info["sufficiency"], "necessity": info["necessity"],
                "concept_strength": info["concept_strength"], "relative_strength": info.get("relative_strength"),
                "effect_size": info.get("effect_size"),
                "class_frequency": info["class_frequency"],
                "frequency": info["frequency"],
                **evidence.get((y, latent), {})}

    def ranked(ids: list[int], field: str = strength_field) -> list[dict[str, Any]]:
        return sorted((entry(i) for i in ids), key=lambda e: -(e.get(field) or 0.0))

    if cfg.bias_rule == "evidence":
        bias = ranked([i for i in cats["context"] if evidence.get((y, i), {}).get("over_represented")], "effect")
    else:
        bias = ranked(cats["bias"])
    notes = list(cats.get("notes", [cats["note"]] if "note" in cats else []))
    if cfg.bias_rule == "evidence" and not bias:
        notes.append(f"no evidence of bias at FDR {cfg.fdr:g}")
    return {"class": y, "n_images": class_result["n_images"],
            "target": ranked(cats["target"]), "context": ranked(cats["context"]),
            "uncertain": ranked(cats.get("uncertain", [])), "bias": bias,
            "thresholds": cats["thresholds"], "evidence": _bias_summary(bias, cfg), "notes": notes}


def _bias_summary(bias: list[dict[str, Any]], cfg: CategorizeConfig) -> dict[str, Any]:
    """A class's `evidence` summary: how many biases, the strongest (what the ranking reads)."""
    summary: dict[str, Any] = {"n_bias": len(bias), "fdr": cfg.fdr, "min_effect": cfg.min_effect,
                               "status": "bias" if bias else f"no evidence of bias at FDR {cfg.fdr:g}"}
    if bias:
        strongest = max(bias, key=lambda e: (e.get("effect_low") or -1.0))
        summary.update({"strongest_latent": strongest["latent"], "strongest_effect": strongest.get("effect"),
                        "strongest_effect_low": strongest.get("effect_low") if strongest.get("effect_low") is not None else -1.0,
                        "min_q": min((float(e["q_value"]) if e.get("q_value") is not None else 1.0) for e in bias)})
    return summary


def _summarise(info: dict[str, Any], cfg: CategorizeConfig) -> None:
    """After the context-only check: the class's summary from its remaining biases, and a note
    for the claims it moved to `entangled`."""
    info["evidence"] = {**_bias_summary(info["bias"], cfg), "n_entangled": len(info["entangled"])}
    status = f"no evidence of bias at FDR {cfg.fdr:g}"
    if not info["bias"] and status not in info["notes"]:
        info["notes"].append(status)
    if info["entangled"]:
        shown = ", ".join(f"{e.get('name') or 'latent'} #{e['latent']}" for e in info["entangled"][:5])
        more = f" and {len(info['entangled']) - 5} more" if len(info["entangled"]) > 5 else ""
        info["notes"].append(f"{len(info['entangled'])} concept(s) over-represented on whole images but not without the "
                             f"object (context-only check), listed as entangled, not as bias: {shown}{more}")


def evaluate_bias_discovery(
    project: Project, dataset_name: str | None, split_name: str | None, *, device: str | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Precision@k of bias discovery (METHOD §5) on `[categorize] evaluate_split`.

    Ground truth comes from `[categorize] context_classes`: an evaluation image whose
    `column = value` matches the entry for class c′ carries c′'s context. For every pair
    (c, c′), the images of class c are ranked by each bias latent that categorize found
    for c′ and we take the fraction of the top k that carry c′'s context (max over the
    latents, mean over pairs). An image may carry several contexts (e.g. water and a star).
    """
    from conceptscope_cli.dictionary.stage import build_dictionary

    cfg = project.manifest.get(CategorizeConfig)
    name, dataset_cfg = project.dataset(dataset_name)
    split = project.split(dataset_cfg, split_name)
    eval_split = cfg.evaluate_split or split
    if not cfg.context_classes:
        raise CscopeError("no evaluation ground truth", hint='set [categorize] context_classes = {"column=value" = "class"}')
    result = categorize(project, name, split, device=device, reporter=reporter)
    class_names = result.categorization["meta"]["class_names"]
    bias_of = {class_names.index(c): [e["latent"] for e in v["bias"]] for c, v in result.categorization["classes"].items()}
    # A concept is ranked on the evaluation split by the sum of its members (same SAE, same latent ids).
    members = {int(e["latent"]): [int(x) for x in e.get("members", [e["latent"]])]
               for v in result.categorization["classes"].values() for e in v["bias"]}
    evaluation = build_dictionary(project, name, eval_split, device=device, reporter=reporter)
    return on_main(lambda: _bias_discovery_report(project, cfg, name, split, eval_split, dataset_cfg, class_names,
                                                  bias_of, evaluation, result.out_dir, members))


def _bias_discovery_report(project: Project, cfg: CategorizeConfig, name: str, split: str, eval_split: str,
                           dataset_cfg: Any, class_names: list[str], bias_of: dict[int, list[int]], evaluation: Any,
                           out_dir: Path, members: dict[int, list[int]] | None = None) -> dict[str, Any]:
    from conceptscope_cli.categorize.evaluate import bias_discovery_precision
    from conceptscope_cli.data.datasets import open_split
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    handle = open_split(name, dataset_cfg, eval_split, project.root, project.cache)
    matrix = LatentMatrix(evaluation.latents_entry.path / "latents.h5")
    try:
        rows = [int(r) for r in matrix.row_index]

        def concept_column(latent: int) -> np.ndarray:
            parts = (members or {}).get(int(latent), [int(latent)])
            return np.sum([matrix.column(k) for k in parts], axis=0).astype(np.float32)

        pairs: list[Any] = []
        per_context: dict[str, Any] = {}
        for key, class_name in cfg.context_classes.items():
            if "=" not in key or class_name not in class_names:
                raise CscopeError(f"[categorize] context_classes: bad entry {key!r} = {class_name!r}",
                                  hint='keys are "column=value", values are class names')
            column, value = key.split("=", 1)
            if column not in handle.rows.column_names:
                raise CscopeError(f"[categorize] context_classes: no column {column!r} in {name}/{eval_split}")
            values = np.asarray(handle.rows[column], dtype=object)[rows]
            target = class_names.index(class_name)
            context = np.where(values.astype(str) == value, target, -1)
            outcome = bias_discovery_precision({target: bias_of.get(target, [])}, matrix.labels, context,
                                               concept_column, k=cfg.precision_k)
            per_context[key] = {"class": class_name, "precision": outcome.precision, "pairs": len(outcome.pairs)}
            pairs.extend(
                {"class": class_names[p.class_id], "bias_class": class_name, "context": key, "precision": p.precision,
                 "best_latent": p.best_latent, "k": p.k, "n_images": p.num_images}
                for p in outcome.pairs
            )
    finally:
        matrix.close()
    precisions = [p["precision"] for p in pairs]
    report = {
        "meta": {"dataset": name, "split": split, "evaluate_split": eval_split, "k": cfg.precision_k,
                 "context_classes": cfg.context_classes, "cscope_version": conceptscope_cli.__version__},
        "precision_at_k": float(np.mean(precisions)) if precisions else None,
        "per_context": per_context,
        "pairs": pairs,
    }
    write_json_atomic(out_dir.parent / f"{split}_bias_discovery.json", report)
    return report
