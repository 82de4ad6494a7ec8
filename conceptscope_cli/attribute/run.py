"""`cscope attribute`: which SAE latents make CLIP match an image to a prompt.

Loads the project's backbone and SAE (trained by `cscope train` when missing, or `[dict]
sae`), splices the SAE after its block, and scores every latent by gradient × activation
(see `core`). Writes `attribution.json` (every score) and one PNG per image (heatmaps,
names and reference tiles from the concept dictionary when `cscope dict` has run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import conceptscope_cli
from conceptscope_cli.artifacts import ConceptDict
from conceptscope_cli.attribute.core import BatchAttribution, Objective, attribute_batch, concat_batches
from conceptscope_cli.attribute.inputs import expand_image_args, figure_names, open_image
from conceptscope_cli.attribute.render import FigureRow, FigureSection, render_figure
from conceptscope_cli.cache.store import write_json_atomic
from conceptscope_cli.config.sections import BackboneConfig
from conceptscope_cli.devices import host_to_device
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project

JSON_NAME = "attribution.json"


@dataclass
class LatentScore:
    """One latent on one image (for one prompt, when attribution is set).

    share: attribution / Σ_j max(R_j, 0), the part of the total positive attribution it
    carries (negative for latents that lower y).
    """

    latent: int
    name: str | None
    attribution: float | None
    activation: float
    share: float | None
    reference: Path | None = None


@dataclass
class PromptScores:
    prompt: str
    similarity: float  # cos(image, prompt)
    probability: float  # softmax over the prompts with CLIP's logit scale
    objective: float  # the attributed y (similarity or probability)
    top: list[LatentScore]  # R > 0, largest first (at most top_k)
    bottom: list[LatentScore]  # R < 0, most negative first (at most top_k)
    total: float  # Σ_k R_k
    total_positive: float  # Σ_k max(R_k, 0)
    error_term: float  # ∂y/∂z · (z − ẑ): what the SAE does not explain
    bias_term: float  # ∂y/∂z · b_dec
    layer_input: float  # ∂y/∂z · z; equals total + error_term + bias_term

    @property
    def completeness_gap(self) -> float:
        return self.total + self.error_term + self.bias_term - self.layer_input


@dataclass
class ImageScores:
    image: Path
    figure: Path | None
    prompts: list[PromptScores]
    most_active: list[LatentScore]  # by mean activation over the spliced tokens


@dataclass
class AttributionResult:
    images: list[ImageScores]
    prompts: list[str]
    objective: str
    layer: int  # block index the SAE is spliced after
    token_selection: str  # tokens that go through the SAE
    sae_path: Path
    n_latents: int
    dictionary: Path | None  # concept_dict.json the names come from
    json_path: Path
    out_dir: Path
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------- dictionary
def load_concept_names(
    project: Project, dataset: str, split: str, sae_provenance: dict[str, Any], n_latents: int
) -> tuple[dict[int, tuple[str | None, Path | None]], Path | None, str | None]:
    """({latent: (name, reference tile)}, concept_dict.json, note) from `cscope dict`'s output,
    empty when it has not run or was built with another SAE."""
    from conceptscope_cli.dictionary.stage import split_outputs

    folder = split_outputs(project, dataset, split)
    path = ConceptDict.path(folder)
    if not path.is_file():
        return {}, None, f"no concept dictionary for {dataset}/{split}: latents are unnamed (run `cscope dict`)"
    try:
        concept = ConceptDict.read(path)
    except CscopeError as exc:
        return {}, None, f"{path} is unreadable ({exc.message}): latents are unnamed"
    meta = concept.meta
    same_sae = meta.get("n_latents") == n_latents and all(meta.get(k) == v for k, v in sae_provenance.items())
    if not same_sae:
        return {}, None, f"{path} was built with another SAE: latents are unnamed (re-run `cscope dict`)"
    return {k: (e.name, folder / e.reference_image if e.reference_image else None)
            for k, e in concept.latents.items()}, path, None


# ------------------------------------------------------------------- main
def attribute(
    project: Project,
    images: list[str],
    prompts: list[str],
    *,
    top_k: int = 10,
    out_dir: Path | None = None,
    device: str | None = None,
    objective: Objective = "cosine",
    dataset: str | None = None,
    split: str | None = None,
    batch_size: int = 8,
    figure_latents: int = 5,
    reporter: Reporter | None = None,
) -> AttributionResult:
    """Attribute CLIP's image–prompt similarity to the project's SAE latents.

    images: files, directories or glob patterns (relative to the working directory).
    objective: "cosine" (y = cos) or "probability" (softmax over the prompts, as zero-shot).
    out_dir: where attribution.json and the PNGs go (default <outputs>/attribute).
    figure_latents: rows per prompt in each PNG (top latents by attribution).
    """
    from conceptscope_cli.context import run_context
    from conceptscope_cli.dictionary.stage import resolve_sae
    from conceptscope_cli.session import ModelSession

    reporter = reporter or NullReporter()
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise CscopeError("no prompt given", hint='pass at least one prompt, e.g. "a photo of a dog"')
    if objective == "probability" and len(prompts) < 2:
        raise CscopeError("the probability objective needs at least two prompts (a softmax over one is constant)")
    if top_k < 1:
        raise CscopeError(f"top_k must be positive, got {top_k}")
    files = expand_image_args(images)
    loaded = [open_image(path) for path in files]  # fail on a bad image before any heavy work

    ctx = run_context(project, dataset, split, device=device)
    dataset_name, split_name, torch_device = ctx.dataset, ctx.split, ctx.device
    sae_dir, _, sae_provenance = resolve_sae(project, dataset_name, device=device, reporter=reporter)
    session = ModelSession(project, ctx, sae_dir)
    layer, tokens = session.splice()
    sae, backbone, view = session.sae, session.backbone, session.view

    text = backbone.encode_text(prompts)
    logit_scale = session.logit_scale
    crops = [view.pixels(image) for image in loaded]  # (3, H, W) in [0, 1]
    reporter.task("attribute: images", len(files))
    parts: list[BatchAttribution] = []
    for start in range(0, len(files), batch_size):
        batch = host_to_device(torch.stack(crops[start:start + batch_size]), torch_device)
        parts.append(attribute_batch(
            backbone.model, sae, view.normalize(batch), text, layer=layer, tokens=tokens,
            objective=objective, logit_scale=logit_scale, top_k=top_k,
        ))
        reporter.advance(len(batch))
    scores = concat_batches(parts)

    n_latents = int(sae.d_sae)
    names, dictionary, note = load_concept_names(project, dataset_name, split_name, sae_provenance, n_latents)
    out = Path(out_dir) if out_dir is not None else project.outputs_dir / "attribute"
    out.mkdir(parents=True, exist_ok=True)
    figure_paths = figure_names(files, out)
    results = [
        _image_scores(i, files[i], figure_paths[i], scores, prompts, names, top_k) for i in range(len(files))
    ]
    for i, result in enumerate(results):
        _write_figure(result, crops[i], scores, i, backbone.grid_size, figure_latents, len(prompts) > 1)
    attribution = AttributionResult(
        images=results, prompts=prompts, objective=objective, layer=layer, token_selection=tokens,
        sae_path=Path(sae_dir), n_latents=n_latents, dictionary=dictionary, json_path=out / JSON_NAME,
        out_dir=out, notes=[note] if note else [],
    )
    write_json_atomic(attribution.json_path, _to_json(attribution, scores, project, logit_scale))
    return attribution


# ---------------------------------------------------------------- helpers
def _score(latent: int, names: dict, attribution: float | None, activation: float, positive: float) -> LatentScore:
    name, reference = names.get(latent, (None, None))
    share = attribution / positive if attribution is not None and positive > 0 else None
    return LatentScore(latent, name, attribution, activation, share, reference)


def _image_scores(
    i: int, file: Path, figure: Path, scores: BatchAttribution, prompts: list[str], names: dict, top_k: int
) -> ImageScores:
    activation = scores.activation[i]
    prompt_scores = []
    for p, prompt in enumerate(prompts):
        r = scores.attribution[i, p]
        positive = float(r.clamp_min(0).sum())
        top = [int(k) for k in scores.top_latents[i, p] if r[k] > 0][:top_k]
        bottom = [int(k) for k in scores.bottom_latents[i, p] if r[k] < 0][:top_k]
        prompt_scores.append(PromptScores(
            prompt=prompt, similarity=float(scores.similarity[i, p]), probability=float(scores.probability[i, p]),
            objective=float(scores.objective[i, p]),
            top=[_score(k, names, float(r[k]), float(activation[k]), positive) for k in top],
            bottom=[_score(k, names, float(r[k]), float(activation[k]), positive) for k in bottom],
            total=float(r.sum()), total_positive=positive, error_term=float(scores.error_term[i, p]),
            bias_term=float(scores.bias_term[i, p]), layer_input=float(scores.layer_term[i, p]),
        ))
    active = [int(k) for k in scores.active_latents[i] if activation[k] > 0]
    return ImageScores(file, figure, prompt_scores, [_score(k, names, None, float(activation[k]), 0.0) for k in active])


def patch_grid(values: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]) -> np.ndarray | None:
    """Per-token values (Ts,) at full-sequence positions -> (gh, gw) over the patches; None without patches."""
    patch = positions >= 1
    if not bool(patch.any()):
        return None
    out = np.zeros(grid[0] * grid[1], dtype=np.float32)
    out[(positions[patch] - 1).numpy()] = values[patch].float().numpy()
    return out.reshape(grid)


def _write_figure(
    result: ImageScores, crop: torch.Tensor, scores: BatchAttribution, i: int, grid: tuple[int, int],
    figure_latents: int, several_prompts: bool,
) -> None:
    header = [result.image.name]
    if result.most_active:
        header.append("most active: " + ", ".join(
            f"#{s.latent} {s.name or ''} ({s.activation:.2f})".replace("  ", " ") for s in result.most_active[:5]))
    sections = []
    for p, prompt in enumerate(result.prompts):
        title = f'"{prompt.prompt}"  cos {prompt.similarity:.3f}'
        if several_prompts:
            title += f"  p {prompt.probability:.2f}"
        title += "  | top latents by attribution (red raises y, blue lowers it)"
        header.append(f'"{prompt.prompt}": latents {prompt.total:+.3f}, SAE error {prompt.error_term:+.3f}, '
                      f'decoder bias {prompt.bias_term:+.3f} (gradient x input {prompt.layer_input:+.3f})')
        ids = scores.top_latents[i, p].tolist()
        rows = []
        for s in prompt.top[:figure_latents]:
            per_token = scores.top_maps[i, p, ids.index(s.latent)]
            heatmap = patch_grid(per_token, scores.positions, grid)
            cls = scores.positions == 0
            # the map shows patches only: say how much the CLS token carries
            split = (f"CLS token {float(per_token[cls].sum()):+.4f}, patches {float(per_token[~cls].sum()):+.4f}"
                     if bool(cls.any()) and heatmap is not None else None)
            rows.append(FigureRow(heatmap, [
                f"#{s.latent}  {s.name or '(unnamed)'}",
                f"attribution {s.attribution:+.4f}" + (f"  ({100 * s.share:.1f}% of positive)" if s.share is not None else ""),
                *([split] if split else []),
                f"activation {s.activation:.3f} (mean over tokens)",
                *([] if heatmap is not None else ["no patch map (CLS token only)"]),
            ], s.reference))
        sections.append(FigureSection(title, rows))
    assert result.figure is not None
    render_figure(crop, header, sections).save(result.figure)


def _latent_json(score: LatentScore, out: Path) -> dict[str, Any]:
    reference = None
    if score.reference is not None:
        try:
            reference = str(score.reference.relative_to(out))
        except ValueError:
            reference = str(score.reference)
    return {"latent": score.latent, "name": score.name, "attribution": score.attribution,
            "activation": score.activation, "share": score.share, "reference_image": reference}


def _to_json(result: AttributionResult, scores: BatchAttribution, project: Project, logit_scale: float) -> dict[str, Any]:
    images = []
    for i, image in enumerate(result.images):
        activation = scores.activation[i]
        active = torch.nonzero(activation > 0).flatten().tolist()
        prompts = []
        for p, prompt in enumerate(image.prompts):
            r = scores.attribution[i, p]
            prompts.append({
                "prompt": prompt.prompt, "similarity": prompt.similarity, "probability": prompt.probability,
                "objective": prompt.objective, "total": prompt.total, "total_positive": prompt.total_positive,
                "error_term": prompt.error_term, "bias_term": prompt.bias_term, "layer_input": prompt.layer_input,
                "top": [_latent_json(s, result.out_dir) for s in prompt.top],
                "bottom": [_latent_json(s, result.out_dir) for s in prompt.bottom],
                # every latent active on the image (the others have R = 0)
                "attribution": {str(k): float(r[k]) for k in active},
            })
        images.append({
            "image": str(image.image),
            "figure": image.figure.name if image.figure else None,
            "most_active": [_latent_json(s, result.out_dir) for s in image.most_active],
            "activation": {str(k): float(activation[k]) for k in active},
            "prompts": prompts,
        })
    return {
        "meta": {
            "cscope_version": conceptscope_cli.__version__,
            "backbone": project.manifest.get(BackboneConfig).model,
            "layer": result.layer,
            "token_selection": result.token_selection,
            "sae": str(result.sae_path),
            "n_latents": result.n_latents,
            "objective": result.objective,
            "logit_scale": logit_scale,
            "prompts": result.prompts,
            "dictionary": str(result.dictionary) if result.dictionary else None,
            "notes": result.notes,
        },
        "images": images,
    }
