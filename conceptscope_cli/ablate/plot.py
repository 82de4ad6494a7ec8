"""Line charts with error bands and grouped bar charts drawn with PIL (matplotlib is not a
dependency). Deterministic: the same numbers give the same PNG bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
INK = (20, 20, 20)
GRID = (225, 225, 225)
MUTED = (110, 110, 110)
PANEL_W, PANEL_H = 460, 320
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 16, 30, 46
LEGEND_H = 16  # one legend entry, under the panel


def font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


@dataclass
class Series:
    name: str
    x: list[float]
    y: list[float]
    low: list[float] | None = None  # band, same length as y
    high: list[float] | None = None
    dashed: bool = False


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    x_ticks: list[tuple[float, str]] | None = None  # (position, label); default: nice numbers


@dataclass
class Bars:
    title: str
    y_label: str
    groups: list[str]  # one cluster per group (e.g. a class)
    series: dict[str, list[float]]  # name -> one value per group


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-6:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    return f"{value:.4g}"


class _Frame:
    """Maps data coordinates into one panel's plotting rectangle."""

    def __init__(self, width: int, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
        self.x0, self.y0 = MARGIN_L, MARGIN_T
        self.x1, self.y1 = width - MARGIN_R, PANEL_H - MARGIN_B
        self.xr, self.yr = x_range, y_range

    def px(self, x: float) -> float:
        span = (self.xr[1] - self.xr[0]) or 1.0
        return self.x0 + (x - self.xr[0]) / span * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        span = (self.yr[1] - self.yr[0]) or 1.0
        return self.y1 - (y - self.yr[0]) / span * (self.y1 - self.y0)


def _axes(draw: ImageDraw.ImageDraw, frame: _Frame, title: str, x_label: str, y_label: str,
          x_ticks: list[tuple[float, str]], y_ticks: list[float]) -> None:
    small, big = font(11), font(13)
    for value in y_ticks:
        y = frame.py(value)
        draw.line([(frame.x0, y), (frame.x1, y)], fill=GRID)
        draw.text((frame.x0 - 6, y), _label(value), fill=MUTED, font=small, anchor="rm")
    for value, text in x_ticks:
        x = frame.px(value)
        draw.line([(x, frame.y1), (x, frame.y1 + 4)], fill=INK)
        draw.text((x, frame.y1 + 6), text, fill=MUTED, font=small, anchor="ma")
    draw.rectangle([frame.x0, frame.y0, frame.x1, frame.y1], outline=INK)
    draw.text(((frame.x0 + frame.x1) / 2, frame.y0 - 8), title, fill=INK, font=big, anchor="md")
    draw.text(((frame.x0 + frame.x1) / 2, frame.y1 + 24), x_label, fill=INK, font=small, anchor="ma")
    # the y label goes above the tick labels: PIL cannot rotate text without a second image
    draw.text((frame.x0 - MARGIN_L + 4, frame.y0 - 22), y_label, fill=INK, font=small, anchor="la")


def _legend(draw: ImageDraw.ImageDraw, frame: _Frame, names: list[str], dashed: list[bool]) -> None:
    """Below the axes, one entry a line, so that it never hides the data."""
    small = font(11)
    x, y = frame.x0, PANEL_H + 2
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        cy = y + 8 + LEGEND_H * i
        _polyline(draw, [(x + 5, cy), (x + 25, cy)], colour, dashed[i])
        draw.text((x + 30, cy), name, fill=INK, font=small, anchor="lm")


def _polyline(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: tuple, dashed: bool) -> None:
    if not dashed:
        draw.line(points, fill=colour, width=2)
        return
    for (ax, ay), (bx, by) in zip(points, points[1:]):
        length = math.hypot(bx - ax, by - ay)
        for s in range(0, max(int(length), 1), 8):
            t0, t1 = s / max(length, 1e-9), min((s + 4) / max(length, 1e-9), 1.0)
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=colour, width=2)


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _draw_panel(image: Image.Image, panel: Panel) -> None:
    xs = _finite([x for s in panel.series for x in s.x]) or [0.0, 1.0]
    ys = _finite([v for s in panel.series for v in (s.y + (s.low or []) + (s.high or []))]) or [0.0, 1.0]
    y_ticks = nice_ticks(min(ys), max(ys))
    frame = _Frame(image.width, (min(xs), max(xs)), (y_ticks[0], y_ticks[-1]))
    x_ticks = panel.x_ticks or [(v, _label(v)) for v in nice_ticks(min(xs), max(xs)) if min(xs) <= v <= max(xs)]
    draw = ImageDraw.Draw(image)
    _axes(draw, frame, panel.title, panel.x_label, panel.y_label, x_ticks, y_ticks)
    # bands first, blended on a separate layer so that overlapping bands stay readable
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    layer = ImageDraw.Draw(overlay)
    for i, s in enumerate(panel.series):
        if s.low is None or s.high is None or len(s.x) < 2:
            continue
        upper = [(frame.px(x), frame.py(h)) for x, h in zip(s.x, s.high)]
        lower = [(frame.px(x), frame.py(lo)) for x, lo in zip(s.x, s.low)][::-1]
        layer.polygon(upper + lower, fill=(*PALETTE[i % len(PALETTE)], 50))
    image.paste(Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB"))
    draw = ImageDraw.Draw(image)
    for i, s in enumerate(panel.series):
        points = [(frame.px(x), frame.py(y)) for x, y in zip(s.x, s.y)]
        colour = PALETTE[i % len(PALETTE)]
        if len(points) > 1:
            _polyline(draw, points, colour, s.dashed)
        for x, y in points if len(points) <= 30 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    _legend(draw, frame, [s.name for s in panel.series], [s.dashed for s in panel.series])


def _draw_bars(image: Image.Image, bars: Bars) -> None:
    values = _finite([v for vs in bars.series.values() for v in vs]) or [0.0]
    y_ticks = nice_ticks(min(0.0, min(values)), max(0.0, max(values)))
    n_groups = max(len(bars.groups), 1)
    frame = _Frame(image.width, (0.0, float(n_groups)), (y_ticks[0], y_ticks[-1]))
    draw = ImageDraw.Draw(image)
    _axes(draw, frame, bars.title, "", bars.y_label, [(g + 0.5, name[:12]) for g, name in enumerate(bars.groups)], y_ticks)
    names = list(bars.series)
    width = 0.8 / max(len(names), 1)
    zero = frame.py(0.0)
    draw.line([(frame.x0, zero), (frame.x1, zero)], fill=INK)
    for j, name in enumerate(names):
        for g, value in enumerate(bars.series[name]):
            if value is None or not math.isfinite(value):
                continue
            x0 = frame.px(g + 0.1 + j * width)
            x1 = frame.px(g + 0.1 + (j + 1) * width) - 1
            y = frame.py(value)
            draw.rectangle([x0, min(y, zero), x1, max(y, zero)], fill=PALETTE[j % len(PALETTE)])
    _legend(draw, frame, names, [False] * len(names))


def _entries(panel: Panel | Bars) -> int:
    return len(panel.series)


def render(panels: list[Panel | Bars], title: str | None = None) -> Image.Image:
    """Panels side by side (a bar panel is as wide as its groups need), legends under them,
    with an optional title."""
    widths = [max(PANEL_W, MARGIN_L + MARGIN_R + 40 * len(p.groups)) if isinstance(p, Bars) else PANEL_W for p in panels]
    head = 26 if title else 0
    height = PANEL_H + 6 + LEGEND_H * max((_entries(p) for p in panels), default=0)
    image = Image.new("RGB", (sum(widths), height + head), (255, 255, 255))
    if title:
        ImageDraw.Draw(image).text((8, 6), title, fill=INK, font=font(14))
    left = 0
    for panel, width in zip(panels, widths):
        sub = Image.new("RGB", (width, height), (255, 255, 255))
        if isinstance(panel, Bars):
            _draw_bars(sub, panel)
        else:
            _draw_panel(sub, panel)
        image.paste(sub, (left, head))
        left += width
    return image
