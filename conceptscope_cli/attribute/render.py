"""One PNG per image: the model's crop, then per prompt the top latents as rows of
(heatmap overlaid on the crop | index, name, scores | reference tile).

Heatmaps are the per-token attribution of one latent over the patch grid, upsampled
bilinearly onto the crop the model saw (in grey) and scaled by the map's largest
magnitude: red where the latent raises y, blue where it lowers it, clear where it does
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CELL = 112  # displayed size of a crop
PAD = 6
TITLE_H = 22
TEXT_W = 300
REF_W = 5 * CELL + 4 * PAD  # room for a five-image reference tile at cell height
LINE_H = 16
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
POSITIVE = np.array([0.95, 0.1, 0.05])
NEGATIVE = np.array([0.1, 0.35, 1.0])


@dataclass
class FigureRow:
    heatmap: np.ndarray | None  # (gh, gw) signed values, None when there is no patch map
    lines: list[str]
    reference: Path | None = None


@dataclass
class FigureSection:
    title: str
    rows: list[FigureRow] = field(default_factory=list)


def figure_size(rows_per_section: list[int]) -> tuple[int, int]:
    """(width, height) of a figure with these numbers of rows under each section title."""
    width = PAD + CELL + PAD + TEXT_W + PAD + REF_W + PAD
    height = PAD + CELL + PAD + sum(TITLE_H + n * (CELL + PAD) for n in rows_per_section)
    return width, height


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """Truncate text with an ellipsis so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _to_cell(image: Image.Image, height: int, max_width: int | None = None) -> Image.Image:
    """Resize to the given height (keeping aspect, capped at max_width); nearest when enlarging."""
    scale = height / image.height
    if max_width is not None and image.width * scale > max_width:
        scale = max_width / image.width
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)


def overlay(crop: torch.Tensor, heatmap: np.ndarray | None, size: int = CELL) -> Image.Image:
    """crop (3, H, W) in [0, 1] shown at size × size; heatmap (gh, gw) signed, upsampled
    bilinearly to the same size. Under a heatmap the crop is drawn in dimmed grey so that
    the red/blue of the map cannot be confused with the image's own colours."""
    image = _to_cell(Image.fromarray((crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)), size, size)
    if heatmap is None:
        return image
    grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None] / 255.0
    pixels = 0.25 + 0.5 * np.repeat(grey, 3, axis=-1)
    up = torch.nn.functional.interpolate(
        torch.as_tensor(heatmap, dtype=torch.float32)[None, None], size=pixels.shape[:2], mode="bilinear",
        align_corners=False,
    )[0, 0].numpy().astype(np.float64)
    scale = np.abs(up).max()
    strength = np.abs(up) / scale if scale > 0 else np.zeros_like(up)
    colour = np.where(up[..., None] >= 0, POSITIVE, NEGATIVE)
    alpha = 0.8 * strength[..., None]
    pixels = pixels * (1 - alpha) + colour * alpha
    return Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8))


def render_figure(crop: torch.Tensor, header: list[str], sections: list[FigureSection]) -> Image.Image:
    """Draw the figure; its size is `figure_size([len(s.rows) for s in sections])`."""
    width, height = figure_size([len(s.rows) for s in sections])
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    text_x = PAD + CELL + PAD
    text_w = TEXT_W + PAD + REF_W
    canvas.paste(overlay(crop, None), (PAD, PAD))
    for i, line in enumerate(header[: CELL // LINE_H]):
        draw.text((text_x, PAD + i * LINE_H), _fit(draw, line, font, text_w), fill=INK if i == 0 else MUTED, font=font)
    y = PAD + CELL + PAD
    for section in sections:
        draw.line([(PAD, y + 1), (width - PAD, y + 1)], fill=MUTED)
        draw.text((PAD, y + 5), _fit(draw, section.title, font, width - 2 * PAD), fill=INK, font=font)
        y += TITLE_H
        for row in section.rows:
            canvas.paste(overlay(crop, row.heatmap), (PAD, y))
            for i, line in enumerate(row.lines[: CELL // LINE_H]):
                draw.text((text_x, y + i * LINE_H), _fit(draw, line, font, TEXT_W), fill=INK if i == 0 else MUTED, font=font)
            ref_x = text_x + TEXT_W + PAD
            if row.reference is not None and row.reference.is_file():
                with Image.open(row.reference) as tile:
                    canvas.paste(_to_cell(tile.convert("RGB"), CELL, REF_W), (ref_x, y))
            else:
                draw.text((ref_x, y), "no reference tile", fill=MUTED, font=font)
            y += CELL + PAD
    return canvas
