"""`cscope ablate edit`: set chosen SAE latents on chosen patches and read CLIP's answer
(saev's interventions, METHOD §8).

With the SAE spliced after block L, at the edited tokens t (every spliced token, or the
chosen patches):

    f′_tk = v_k for the chosen latents k, f′ = f otherwise
    z′_t  = f′_t W_dec + b_dec + (z_t − ẑ_t)            (the clean error term is kept)

v_k = scale · max_k, where max_k is the latent's largest image-level activation observed in
the dictionary split (stats.h5 `top_values[:, 0]`, a mean over an image's tokens); or a
given absolute value; or 0 (neither given). Before = the unspliced model (identical to the
spliced one without an edit, the error term being kept). For each image and prompt:
cosine and zero-shot probability (softmax over the prompts with CLIP's logit scale) before
and after, and the predicted prompt.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from conceptscope_cli.ablate.common import PartStore, Session, batch_ranges, iter_todo, open_session, stamp_of
from conceptscope_cli.ablate.plot import font
from conceptscope_cli.attribute.core import image_text_scores
from conceptscope_cli.backbone.splice import LatentEdit, SAESplice, splice_reaches_output, token_positions
from conceptscope_cli.cache.store import write_json_atomic
from conceptscope_cli.errors import CscopeError, ManifestError
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project

CELL = 160
PAD = 8
OUTLINE = (255, 215, 0)


@dataclass
class PromptEdit:
    prompt: str
    similarity_before: float
    similarity_after: float
    probability_before: float
    probability_after: float

    @property
    def similarity_change(self) -> float:
        return self.similarity_after - self.similarity_before


@dataclass
class ImageEdit:
    image: Path
    figure: Path
    prompts: list[PromptEdit]
    prediction_before: str  # the prompt with the largest similarity
    prediction_after: str


@dataclass
class EditResult:
    images: list[ImageEdit]
    latents: list[int]
    values: list[float]  # v_k set at the edited tokens, per latent
    patches: list[int] | None  # raster patch indices; None = every spliced token
    prompts: list[str]
    layer: int
    json_path: Path
    out_dir: Path
    notes: list[str] = field(default_factory=list)


@dataclass
class ComposedEdit:
    """Apply several latent edits in turn (one `LatentEdit` per latent with its own value)."""

    edits: list[LatentEdit]

    def __call__(self, f: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        for edit in self.edits:
            f = edit(f, positions)
        return f


def edit_values(latents: list[int], scale: float | None, value: float | None, max_values: np.ndarray | None) -> list[float]:
    """v_k per latent: scale · max_k, the given value, or 0."""
    if scale is not None and value is not None:
        raise CscopeError("give either a scale (times the latent's maximum) or a value, not both")
    for flag, number in (("--scale", scale), ("--value", value)):
        if number is not None and not math.isfinite(number):
            raise ManifestError(f"{flag} must be a finite number, got {number}")
    if scale is not None:
        assert max_values is not None
        return [float(scale * max_values[k]) for k in latents]
    return [float(value if value is not None else 0.0)] * len(latents)


def max_activations(project: Project, session: Session, *, device: str | None, reporter: Reporter) -> np.ndarray:
    """(m,) largest image-level activation of each latent in the dictionary split (`cscope dict` runs first)."""
    from conceptscope_cli.ablate.common import ablate_config
    from conceptscope_cli.dictionary.latents import load_stats
    from conceptscope_cli.dictionary.stage import build_dictionary

    cfg = ablate_config(project)
    split = cfg.rank_split or session.dataset_cfg.splits[0]
    entry = build_dictionary(project, session.dataset, split, device=device, reporter=reporter).latents_entry
    top = load_stats(entry.path / "stats.h5")["top_values"]  # (m, K), strongest first; -1 pads unused slots
    return np.clip(top[:, 0], 0.0, None)


def edited_tokens(session: Session, patches: list[int] | None) -> tuple[torch.Tensor, list[int] | None]:
    """(full-sequence positions the edit touches, the same as LatentEdit tokens or None)."""
    gh, gw = session.backbone.grid_size
    n_tokens = 1 + gh * gw
    spliced = token_positions(n_tokens, session.tokens)
    if patches is None:
        return spliced, None
    bad = [p for p in patches if not 0 <= p < gh * gw]
    if bad:
        raise CscopeError(f"patch indices {bad} outside the {gh}x{gw} grid", hint=f"patches are 0..{gh * gw - 1} in raster order")
    wanted = torch.tensor(sorted({p + 1 for p in patches}), dtype=torch.long)
    if not bool(torch.isin(wanted, spliced).all()):
        raise CscopeError(f"the SAE reads {session.tokens} tokens only: patches cannot be edited", hint="edit the whole image")
    return wanted, wanted.tolist()


@torch.no_grad()
def edit_batch(
    session: Session, images: torch.Tensor, text: torch.Tensor, edit: ComposedEdit, latents: list[int]
) -> dict[str, Any]:
    """Scores before (unspliced) / after (edited) for a batch (B, 3, H, W) and prompts (P, e).

    Returns lists: similarity/probability before/after (B, P), and the summed activation of
    the edited latents per token before / after (B, T) (0 at tokens the SAE does not read)."""
    before = torch.nn.functional.normalize(session.model.encode_image(images).float(), dim=-1)
    splice = SAESplice(session.model.visual, session.sae, session.layer, tokens=session.tokens, keep_error=True, edit=edit)
    with splice:
        after = torch.nn.functional.normalize(session.model.encode_image(images).float(), dim=-1)
    cos_b, p_b = image_text_scores(before, text, session.logit_scale)
    cos_a, p_a = image_text_scores(after, text, session.logit_scale)
    gh, gw = session.backbone.grid_size
    ids = torch.as_tensor(latents, dtype=torch.long)
    maps = {}
    for key, f in (("before", splice.clean_latents), ("after", splice.latents)):
        assert f is not None and splice.positions is not None
        full = torch.zeros(len(images), 1 + gh * gw)
        full[:, splice.positions.cpu()] = f[:, :, ids.to(f.device)].sum(-1).float().cpu()
        maps[key] = full
    return {"similarity_before": cos_b.cpu().tolist(), "similarity_after": cos_a.cpu().tolist(),
            "probability_before": p_b.cpu().tolist(), "probability_after": p_a.cpu().tolist(),
            "map_before": maps["before"].tolist(), "map_after": maps["after"].tolist()}


def check_request(prompts: list[str], latents: list[int], batch_size: int) -> list[str]:
    """The non-empty prompts; a request without prompts or latents, or a batch size < 1, is refused."""
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise CscopeError("no prompt given", hint='pass at least one prompt, e.g. "a photo of a dog"')
    if not latents:
        raise CscopeError("no latent given", hint="pass the latent ids to edit")
    if batch_size < 1:
        raise CscopeError("batch_size must be positive")
    return prompts


def image_edits(parts: list[dict[str, Any]], ranges: list[tuple[int, int]], files: list[Path], figures: list[Path],
                prompts: list[str]) -> list[ImageEdit]:
    """One ImageEdit per image from the batch parts (`edit_batch`'s (B, P) lists, batch `i` = rows
    `ranges[i]`); the prediction before / after is the prompt with the largest cosine."""
    results = []
    for part, (start, stop) in zip(parts, ranges):
        for i in range(stop - start):
            rows = [PromptEdit(p, part["similarity_before"][i][j], part["similarity_after"][i][j],
                               part["probability_before"][i][j], part["probability_after"][i][j]) for j, p in enumerate(prompts)]
            results.append(ImageEdit(files[start + i], figures[start + i], rows,
                                     max(rows, key=lambda r: r.similarity_before).prompt,
                                     max(rows, key=lambda r: r.similarity_after).prompt))
    return results


def edit_notes(latents: list[int], max_values: np.ndarray | None) -> list[str]:
    if max_values is not None and any(max_values[k] == 0 for k in latents):
        return ["latents never active in the dictionary split have maximum 0: scaling them sets 0"]
    return []


def edit_json(meta: dict[str, Any], stamp: str, notes: list[str], results: list[ImageEdit]) -> dict[str, Any]:
    """The content of `edit.json` (FORMATS.md)."""
    return {
        "meta": {**meta, "stamp": stamp, "notes": notes},
        "images": [{"image": str(r.image), "figure": r.figure.name, "prediction_before": r.prediction_before,
                    "prediction_after": r.prediction_after,
                    "prompts": [{"prompt": p.prompt, "similarity_before": p.similarity_before,
                                 "similarity_after": p.similarity_after, "similarity_change": p.similarity_change,
                                 "probability_before": p.probability_before, "probability_after": p.probability_after}
                                for p in r.prompts]} for r in results],
    }


def edit(
    project: Project,
    images: list[str],
    latents: list[int],
    *,
    scale: float | None,
    value: float | None,
    patches: list[int] | None,
    prompts: list[str],
    out_dir: Path | None = None,
    dataset: str | None = None,
    device: str | None = None,
    batch_size: int = 8,
    reporter: Reporter | None = None,
) -> EditResult:
    """Edit latents on images and compare CLIP's similarities to the prompts before / after.

    images: files, folders or globs (relative to the working directory); patches: raster
    patch indices (None: every spliced token). Writes `<outputs>/edit/` (or `out_dir`):
    parts/ (per batch), edit.json and one `<image stem>.png` per image. The scores are
    `edit_batch`'s; `image_edits` and `edit_json` assemble them.
    """
    from conceptscope_cli.attribute.inputs import expand_image_args, figure_names, open_image
    from conceptscope_cli.backbone.views import model_view

    reporter = reporter or NullReporter()
    prompts = check_request(prompts, latents, batch_size)
    files = expand_image_args(images)
    session = open_session(project, dataset, device=device, reporter=reporter, check_pooled=False)
    m = int(session.sae.d_sae)
    bad = [k for k in latents if not 0 <= k < m]
    if bad:
        raise CscopeError(f"latent ids {bad} do not exist: the SAE has {m} latents")
    positions, tokens = edited_tokens(session, patches)
    gh, gw = session.backbone.grid_size
    if not splice_reaches_output(session.model.visual, session.layer, positions, 1 + gh * gw):
        raise CscopeError(f"the edited tokens after block {session.layer} (the last) do not reach the pooled image embedding",
                          hint="edit an SAE on an earlier layer, or the whole image when the SAE reads the CLS token")
    max_values = max_activations(project, session, device=device, reporter=reporter) if scale is not None else None
    values = edit_values(latents, scale, value, max_values)
    latent_edit = ComposedEdit([LatentEdit([k], "set", v, tokens) for k, v in zip(latents, values)])

    out = Path(out_dir) if out_dir is not None else project.outputs_dir / "edit"
    figures = figure_names(files, out)
    view = model_view(session.backbone.preprocess)
    text = session.backbone.encode_text(prompts)
    files_id = [[str(f), f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()] for f in files]
    meta = {**session.meta(), "latents": latents, "values": values, "scale": scale, "value": value,
            "patches": sorted(set(patches)) if patches is not None else None, "prompts": prompts,
            "batch_size": batch_size, "max_observed": [float(max_values[k]) for k in latents] if max_values is not None else None}
    stamp = stamp_of({**meta, "images": files_id})
    store = PartStore(out, stamp)
    reporter.task("edit: images", len(files))
    ranges = batch_ranges(len(files), batch_size)
    for index, start, stop in iter_todo(store, ranges, reporter):
        crops = [view.pixels(open_image(f)) for f in files[start:stop]]
        part = edit_batch(session, view.normalize(torch.stack(crops)).to(session.device), text, latent_edit, latents)
        for i, crop in enumerate(crops):
            _figure(crop, files[start + i].name, prompts, part, i, (gh, gw), positions.tolist(), latents, values).save(figures[start + i])
        store.write(index, part)

    results = image_edits(store.load(len(ranges)), ranges, files, figures, prompts)
    notes = edit_notes(latents, max_values)
    result = EditResult(results, latents, values, meta["patches"], prompts, session.layer, out / "edit.json", out, notes)
    write_json_atomic(result.json_path, edit_json(meta, stamp, notes, results))
    return result


def _overlay(crop: torch.Tensor, grid_values: np.ndarray | None, scale: float) -> Image.Image:
    """The crop in grey with a red heat overlay of per-patch values (gh, gw) in [0, scale]."""
    pixels = crop.permute(1, 2, 0).numpy()
    grey = pixels.mean(-1, keepdims=True).repeat(3, -1) * 0.8 + 0.1
    image = grey if grid_values is not None else pixels
    if grid_values is not None and scale > 0:
        heat = torch.nn.functional.interpolate(torch.as_tensor(grid_values, dtype=torch.float32)[None, None],
                                               size=pixels.shape[:2], mode="nearest")[0, 0].numpy()
        alpha = np.clip(heat / scale, 0, 1)[..., None] * 0.75
        image = image * (1 - alpha) + np.array([0.95, 0.1, 0.05]) * alpha
    out = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return out.resize((CELL, CELL), Image.Resampling.NEAREST)


def _figure(
    crop: torch.Tensor, name: str, prompts: list[str], part: dict[str, Any], i: int, grid: tuple[int, int],
    positions: list[int], latents: list[int], values: list[float],
) -> Image.Image:
    """crop with the edited patches outlined | edited latents' activation before | after, then the table."""
    gh, gw = grid
    before = np.asarray(part["map_before"][i][1:]).reshape(gh, gw)
    after = np.asarray(part["map_after"][i][1:]).reshape(gh, gw)
    scale = float(max(before.max(), after.max(), 1e-12))
    tiles = [_overlay(crop, None, 0.0), _overlay(crop, before, scale), _overlay(crop, after, scale)]
    draw_tile = ImageDraw.Draw(tiles[0])
    cw, ch = CELL / gw, CELL / gh
    for pos in positions:
        if pos == 0:
            continue  # the CLS token has no place on the image
        r, c = divmod(pos - 1, gw)
        draw_tile.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=OUTLINE, width=2)
    small, big = font(12), font(13)
    line_h = 18
    width = max(3 * CELL + 4 * PAD, 620)
    height = PAD + 20 + CELL + 20 + line_h * (len(prompts) + 2) + PAD + (line_h if 0 in positions else 0)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    edits = ", ".join(f"#{k}={v:.3g}" for k, v in zip(latents, values))
    draw.text((PAD, PAD), f"{name}: set {edits}", fill=(20, 20, 20), font=big)
    y = PAD + 20
    captions = ["edited patches (outlined)", "latents before", "latents after"]
    for j, (tile, caption) in enumerate(zip(tiles, captions)):
        x = PAD + j * (CELL + PAD)
        image.paste(tile, (x, y))
        draw.text((x, y + CELL + 3), caption, fill=(110, 110, 110), font=small)
    y += CELL + 20
    if 0 in positions:
        draw.text((PAD, y), "the CLS token is edited too", fill=(110, 110, 110), font=small)
        y += line_h
    columns = [PAD, PAD + 260, PAD + 340, PAD + 420, PAD + 490, PAD + 550]
    for x, head in zip(columns, ["prompt", "cos before", "cos after", "change", "p before", "p after"]):
        draw.text((x, y), head, fill=(20, 20, 20), font=small)
    best_b = int(np.argmax(part["similarity_before"][i]))
    best_a = int(np.argmax(part["similarity_after"][i]))
    for j, prompt in enumerate(prompts):
        y += line_h
        cb, ca = part["similarity_before"][i][j], part["similarity_after"][i][j]
        cells = [prompt[:40], f"{cb:.4f}" + (" *" if j == best_b else ""), f"{ca:.4f}" + (" *" if j == best_a else ""),
                 f"{ca - cb:+.4f}", f"{part['probability_before'][i][j]:.3f}", f"{part['probability_after'][i][j]:.3f}"]
        for x, text in zip(columns, cells):
            draw.text((x, y), text, fill=(20, 20, 20), font=small)
    draw.text((PAD, y + line_h), "* = predicted prompt (largest cosine)", fill=(110, 110, 110), font=small)
    return image
