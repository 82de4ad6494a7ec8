"""The context-only check in the categorize stage: which images, which tokens, what is written.

The statistics are `categorize/context_check.py`; the forward without the object's patches is
`backbone/dropping.py`; where the object is comes from the dataset's `object_box_column` or
`object_mask_column` through the data layer (`data/object_masks.object_patch_masks`). METHOD
§Categorization, "Context-only check".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from conceptscope_cli.categorize import context_check as K
from conceptscope_cli.categorize import scores as S
from conceptscope_cli.config.sections import CategorizeConfig
from conceptscope_cli.context import RunContext
from conceptscope_cli.progress import Reporter
from conceptscope_cli.project import Project

ClassesEdit = Callable[[dict[str, dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class ContextImages:
    """The sampled images' concept activations without the object, and what was left out."""

    values: np.ndarray  # (N, K) activation of each claimed concept on each kept image
    labels: np.ndarray  # (N,) class of each kept image
    no_box: int  # sampled images without a box or mask (left out)
    no_context: int  # sampled images whose object covers every patch (nothing is left to measure)


def context_checker(project: Project, ctx: RunContext, cfg: CategorizeConfig, concept: Any, meta: dict[str, Any],
                    reporter: Reporter) -> ClassesEdit | None:
    """The edit that checks every bias claim context-only, or None when the check is off: with
    `[categorize] context_check = "auto"` it runs when the dataset names an `object_box_column` or
    an `object_mask_column`."""
    regions = ctx.dataset_cfg.region_settings()
    if cfg.context_check == "off" or regions is None:
        return None
    column = ctx.dataset_cfg.object_mask_column or ctx.dataset_cfg.object_box_column
    # How the objects were given: masks, or boxes in their format and units.
    given = ({"objects": "masks"} if "mask_column" in regions else
             {"objects": "boxes", "box_format": regions["format"], "box_units": regions["units"]})

    def check(classes: dict[str, dict[str, Any]]) -> dict[str, Any]:
        claims = [(name, int(info["class"]), entry) for name, info in classes.items() for entry in info["bias"]]
        summary: dict[str, Any] = {"column": column, **given, "samples_per_class": cfg.context_samples,
                                   "rule": "context-only effect >= min_effect and its CI above 0",
                                   "base_rate": cfg.base_rate, "n_claims": len(claims)}
        if not claims:
            return {**summary, "n_entangled": 0, "n_images": 0, "no_box": 0, "no_context": 0}
        members = [tuple(int(m) for m in (e.get("members") or [e["latent"]])) for _, _, e in claims]
        images = context_activations(project, ctx, cfg, concept, meta, members, reporter)
        effects = K.context_only_effects(images.values, images.labels, np.array([y for _, y, _ in claims]),
                                         len(classes), base_rate=cfg.base_rate, n_boot=cfg.bootstrap,
                                         seed=project.settings.seed, confidence=cfg.confidence)
        keep = K.survives(effects, cfg.min_effect)
        for k, (_, _, entry) in enumerate(claims):
            entry["context_only"] = {
                "effect": _finite(effects.effect[k]), "effect_low": _finite(effects.effect_low[k]),
                "effect_high": _finite(effects.effect_high[k]), "n_class": int(effects.n_class[k]),
                "n_classes_compared": int(effects.n_compared[k]), "present_class": _finite(effects.present_class[k]),
                "present_rest": _finite(effects.present_rest[k]), "survives": bool(keep[k])}
        for info in classes.values():
            info["entangled"] = [e for e in info["bias"] if not e["context_only"]["survives"]]
            info["bias"] = [e for e in info["bias"] if e["context_only"]["survives"]]
        return {**summary, "n_entangled": int((~keep).sum()), "n_images": int(len(images.labels)),
                "no_box": images.no_box, "no_context": images.no_context}

    return check


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


@torch.no_grad()
def context_activations(project: Project, ctx: RunContext, cfg: CategorizeConfig, concept: Any, meta: dict[str, Any],
                        members: list[tuple[int, ...]], reporter: Reporter) -> ContextImages:
    """For a seeded sample of every class's images (`context_samples`, the alignment sample's
    seeding), each concept's image-level activation (sum of its members' means over the SAE's
    tokens) with the patches the object's box touches dropped from the sequence."""
    from conceptscope_cli.backbone.dropping import activations_without_patches
    from conceptscope_cli.data.object_masks import object_patch_masks
    from conceptscope_cli.devices import autocast_for
    from conceptscope_cli.dictionary.latents import encode_images
    from conceptscope_cli.dictionary.reference import fetch_images
    from conceptscope_cli.session import ModelSession

    session = ModelSession(project, ctx, concept.sae_dir(project.cache), meta)
    layer, tokens = session.splice(check_pooled=False)
    reader, sae, view, grid = session.reader, session.sae, session.view, session.grid
    visual = session.backbone.visual
    n_classes = len(meta["class_names"])
    flat = torch.tensor([m for group in members for m in group], dtype=torch.long)
    owner = torch.tensor([k for k, group in enumerate(members) for _ in group], dtype=torch.long)
    values: list[np.ndarray] = []
    labels: list[int] = []
    no_box = no_context = 0
    reporter.task(f"categorize {ctx.dataset}/{ctx.split}: context-only check", n_classes, unit="classes")
    for y in range(n_classes):
        positions = np.flatnonzero(reader.labels == y)
        if not len(positions):
            reporter.advance(1)
            continue
        sample = S.sample_images(positions, cfg.context_samples, project.settings.seed, y)
        rows = [int(r) for r in reader.row_index[sample]]
        decoded = fetch_images(session.split, rows)
        objects = object_patch_masks(session.split, rows, decoded, view, grid)
        kept_rows, drops = [], []
        for r in rows:
            drop = objects.get(r)
            if drop is None:
                no_box += 1
                continue
            if bool(drop.all()):
                no_context += 1
                continue
            kept_rows.append(r)
            drops.append(drop)
        for start in range(0, len(kept_rows), cfg.batch_size):
            batch = kept_rows[start:start + cfg.batch_size]
            x = torch.stack([view.normalize(view.pixels(decoded[r])) for r in batch]).to(session.device)
            with autocast_for(session.device, ctx.precision):
                acts = activations_without_patches(visual, layer, x, torch.stack(drops[start:start + len(batch)]))
            for a in acts:
                selected = a[1:] if tokens == "patches" else a[:1] if tokens == "cls" else a
                f = encode_images(sae, selected[None])[0].cpu()  # (m,) the image-level latents, as `cscope dict`
                values.append(torch.zeros(len(members)).index_add_(0, owner, f[flat]).numpy())
                labels.append(y)
        reporter.advance(1)
    return ContextImages(np.stack(values) if values else np.zeros((0, len(members))),
                         np.asarray(labels, dtype=np.int64), no_box, no_context)
