"""A procedural image world with planted biases.

Each image shows one large outlined object (the *class*: a shape) on a textured
background, with a fill colour, a fill texture and optionally a small co-occurring
object in a corner. Every attribute is known exactly, so later pipeline stages can
be checked against ground truth.

The default train split carries planted biases (e.g. most circles are on water);
the test split is balanced: for each class the attribute values are spread evenly
and shuffled independently, so attributes carry no information about the class.

On disk the world is a HuggingFace ``imagefolder`` directory::

    out_dir/
      world.json               config, vocabulary, planted biases, counts
      train/metadata.jsonl     one JSON row per image, in generation order (columns below)
      train/000000.png ...     zero-padded names: sorted order == generation order
      test/metadata.jsonl
      test/000000.png ...

``datasets.load_dataset("imagefolder", data_dir=out_dir)`` returns rows in sorted
file-name order, which is generation order, so row ``i`` of a split is the image
``{i:06d}.png`` and line ``i`` of its ``metadata.jsonl``. Rendering uses one RNG
per image, seeded from (seed, split, index), so the same seed gives byte-identical
PNGs (PIL writes no timestamps into PNGs).

Metadata columns: ``file_name``, ``label`` (index into the class names), ``class_name``, the
attributes ``background``, ``object_color``, ``object_texture``, ``co_object`` ("none" when
absent), ``caption`` (:func:`caption_for`), and ``object_box``: the class object's bounding box
``[x0, y0, x1, y1]`` in pixels (x right, y down, x1 / y1 exclusive), the tightest box around
the pixels its rendered mask covers (``RenderedImage.object_mask > 0``; the co-object is not
part of it), in the form ``[datasets.NAME] object_box_column`` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

SPLITS: tuple[str, ...] = ("train", "test")
ATTRIBUTES: tuple[str, ...] = ("background", "object_color", "object_texture", "co_object")

DEFAULT_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
BACKGROUNDS: tuple[str, ...] = ("grass", "water", "sand", "sky", "brick")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "purple": (150, 50, 200),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
STAR_COLOR: tuple[int, int, int] = (20, 215, 215)
CO_OBJECTS: tuple[str, ...] = ("none", "star", "heart", "flag")

# Shapes the renderer knows; a config may use any subset of them as classes.
KNOWN_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")

# Supersampling factor: shapes are drawn at this multiple of the output size and
# box-filtered down, which gives smooth edges without PIL's antialiasing support.
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class PlantedBias:
    """In the train split, ``P(attribute == value | class) = rate``.

    The remaining ``1 - rate`` of the class is spread uniformly over the other values.
    """

    class_name: str
    attribute: str
    value: str
    rate: float

    def to_json(self) -> dict[str, Any]:
        return {"class": self.class_name, "attribute": self.attribute, "value": self.value, "rate": self.rate}


DEFAULT_BIASES: tuple[PlantedBias, ...] = (
    PlantedBias("circle", "background", "water", 0.88),
    PlantedBias("cross", "co_object", "star", 0.88),
    # A context bias, not an object colour: a colour covers exactly the object's pixels, so
    # ConceptScope's masks (rightly) see it as part of the target, never as context.
    PlantedBias("triangle", "background", "sand", 0.85),
)


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a generated world (same config => same bytes)."""

    seed: int = 0
    image_size: int = 64
    n_train_per_class: int = 240
    n_test_per_class: int = 100
    classes: tuple[str, ...] = DEFAULT_CLASSES
    backgrounds: tuple[str, ...] = BACKGROUNDS
    object_colors: tuple[str, ...] = tuple(COLORS)
    object_textures: tuple[str, ...] = TEXTURES
    co_objects: tuple[str, ...] = CO_OBJECTS
    biases: tuple[PlantedBias, ...] = DEFAULT_BIASES
    # When False the test split is also sampled with the planted biases.
    balanced_test: bool = True

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in KNOWN_SHAPES]
        if unknown:
            raise ValueError(f"unknown classes {unknown}; known shapes: {KNOWN_SHAPES}")
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ValueError("classes must be at least two distinct shapes")
        for name, values, known in (
            ("backgrounds", self.backgrounds, BACKGROUNDS),
            ("object_colors", self.object_colors, tuple(COLORS)),
            ("object_textures", self.object_textures, TEXTURES),
            ("co_objects", self.co_objects, CO_OBJECTS),
        ):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ValueError(f"{name}: unknown or empty values {bad}; known: {known}")
        if self.image_size < 32:
            raise ValueError("image_size must be at least 32")
        for b in self.biases:
            if b.class_name not in self.classes:
                raise ValueError(f"bias on unknown class {b.class_name!r}")
            if b.attribute not in ATTRIBUTES:
                raise ValueError(f"bias on unknown attribute {b.attribute!r}")
            if b.value not in self.values(b.attribute):
                raise ValueError(f"bias value {b.value!r} not in {b.attribute} vocabulary")
            if not 0.0 <= b.rate <= 1.0:
                raise ValueError(f"bias rate must be in [0, 1], got {b.rate}")
        keys = [(b.class_name, b.attribute) for b in self.biases]
        if len(set(keys)) != len(keys):
            raise ValueError("at most one planted bias per (class, attribute)")

    def values(self, attribute: str) -> tuple[str, ...]:
        """The vocabulary of one attribute."""
        return {
            "background": self.backgrounds,
            "object_color": self.object_colors,
            "object_texture": self.object_textures,
            "co_object": self.co_objects,
        }[attribute]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["biases"] = [b.to_json() for b in self.biases]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WorldConfig":
        d = dict(d)
        d["biases"] = tuple(
            PlantedBias(b["class"], b["attribute"], b["value"], float(b["rate"])) for b in d.get("biases", [])
        )
        for k in ("classes", "backgrounds", "object_colors", "object_textures", "co_objects"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    """Ground truth of one image."""

    label: int
    class_name: str
    background: str
    object_color: str
    object_texture: str
    co_object: str

    def attribute(self, name: str) -> str:
        return str(getattr(self, name))


def caption_for(class_name: str, background: str, object_color: str, object_texture: str, co_object: str) -> str:
    """The full scene caption, e.g. ``"a red striped circle on grass with a small star."``."""
    text = f"a {object_color} {object_texture} {class_name} on {background}"
    if co_object != "none":
        text += f" with a small {co_object}"
    return text + "."


def _split_rng(seed: int, split: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), purpose])


def _sample_biased(config: WorldConfig, rng: np.random.Generator) -> list[Sample]:
    """Train-style sampling: classes in blocks, attributes uniform unless a bias applies."""
    bias = {(b.class_name, b.attribute): b for b in config.biases}
    out: list[Sample] = []
    for label, cls in enumerate(config.classes):
        for _ in range(config.n_train_per_class):
            attrs: dict[str, str] = {}
            for attr in ATTRIBUTES:
                vocab = config.values(attr)
                b = bias.get((cls, attr))
                if b is None or len(vocab) == 1:
                    attrs[attr] = vocab[int(rng.integers(len(vocab)))]
                elif rng.random() < b.rate:
                    attrs[attr] = b.value
                else:
                    others = [v for v in vocab if v != b.value]
                    attrs[attr] = others[int(rng.integers(len(others)))]
            out.append(Sample(label, cls, **attrs))
    return out


def _sample_balanced(config: WorldConfig, n_per_class: int, rng: np.random.Generator) -> list[Sample]:
    """Each class gets every attribute value equally often (up to rounding), shuffled
    independently per attribute, so attributes are independent of the class."""
    out: list[Sample] = []
    for label, cls in enumerate(config.classes):
        columns: dict[str, list[str]] = {}
        for attr in ATTRIBUTES:
            vocab = config.values(attr)
            # Rotate the start so the leftover (n mod |vocab|) values differ per class.
            start = int(rng.integers(len(vocab)))
            col = [vocab[(start + i) % len(vocab)] for i in range(n_per_class)]
            rng.shuffle(col)
            columns[attr] = col
        for i in range(n_per_class):
            out.append(Sample(label, cls, **{a: columns[a][i] for a in ATTRIBUTES}))
    return out


def sample_split(config: WorldConfig, split: str) -> list[Sample]:
    """Ground-truth rows of one split, in generation (= file/row) order."""
    if split == "train":
        return _sample_biased(config, _split_rng(config.seed, split, 0))
    if split == "test":
        rng = _split_rng(config.seed, split, 0)
        if config.balanced_test:
            return _sample_balanced(config, config.n_test_per_class, rng)
        biased = WorldConfig.from_json({**config.to_json(), "n_train_per_class": config.n_test_per_class})
        return _sample_biased(biased, rng)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# ----------------------------------------------------------------------------- rendering


def _noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    return rng.normal(0.0, scale, size=(h, w, 1))


def _background(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A textured background, float32 (n, n, 3) in [0, 255]."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    if kind == "grass":
        img = np.empty((n, n, 3), np.float32)
        img[:] = (70, 150, 50)
        img += _noise(rng, n, n, 10)
        # Short vertical dark blades at random positions.
        for _ in range(n):
            x, y = int(rng.integers(n)), int(rng.integers(n))
            length = int(rng.integers(n // 16, n // 8 + 1))
            img[y : y + length, x : x + max(1, n // 64)] = (30, 95, 25)
        return img
    if kind == "water":
        phase = rng.uniform(0, 2 * math.pi)
        waves = np.sin(2 * math.pi * (yy * 7 + 0.35 * np.sin(2 * math.pi * xx * 2 + phase)))
        img = np.empty((n, n, 3), np.float32)
        img[:] = (30, 90, 160)
        img += waves[..., None] * np.array([18, 35, 45], np.float32)
        return img + _noise(rng, n, n, 5)
    if kind == "sand":
        img = np.empty((n, n, 3), np.float32)
        img[:] = (225, 195, 140)
        grains = (rng.random((n, n)) < 0.08)[..., None] * np.array([-55, -55, -45], np.float32)
        return img + grains + _noise(rng, n, n, 6)
    if kind == "sky":
        img = np.empty((n, n, 3), np.float32)
        img[:] = (135, 195, 240)
        img += (yy[..., None] * np.array([40, 30, 10], np.float32))  # lighter toward the horizon
        # A few white cloud blobs made of overlapping ellipses.
        cloud = Image.new("L", (n, n), 0)
        draw = ImageDraw.Draw(cloud)
        for _ in range(int(rng.integers(2, 4))):
            cx, cy = rng.uniform(0, n), rng.uniform(0, n * 0.8)
            for _ in range(3):
                rx, ry = rng.uniform(n * 0.06, n * 0.12), rng.uniform(n * 0.04, n * 0.07)
                ox = rng.uniform(-n * 0.08, n * 0.08)
                draw.ellipse((cx + ox - rx, cy - ry, cx + ox + rx, cy + ry), fill=255)
        a = np.asarray(cloud, np.float32)[..., None] / 255.0
        return img * (1 - a) + 250.0 * a + _noise(rng, n, n, 3)
    if kind == "brick":
        img = np.empty((n, n, 3), np.float32)
        img[:] = (165, 65, 45)
        row_h = n // 8
        brick_w = n // 4
        shift = int(rng.integers(brick_w))
        mortar = max(1, n // 64)
        rows = (np.arange(n) // row_h)
        is_mortar = np.zeros((n, n), bool)
        is_mortar[(np.arange(n) % row_h) < mortar, :] = True
        for r in range(int(rows.max()) + 1):
            offset = shift + (brick_w // 2) * (r % 2)
            cols = (np.arange(n) + offset) % brick_w < mortar
            is_mortar[r * row_h : (r + 1) * row_h, cols] = True
        # Per-brick tone variation.
        tone = rng.normal(0, 12, size=(int(rows.max()) + 1, 1, 1)).repeat(row_h, 0)[:n]
        img += tone
        img[is_mortar] = (200, 195, 185)
        return img + _noise(rng, n, n, 5)
    raise ValueError(f"unknown background {kind!r}")


def _shape_polygons(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Outline polygons of a shape (the ring and circle are handled separately)."""
    if shape == "square":
        s = r * 0.85
        return [[(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]]
    if shape == "triangle":
        return [[(cx, cy - r * 1.05), (cx + r * 1.1, cy + r * 0.85), (cx - r * 1.1, cy + r * 0.85)]]
    if shape == "diamond":
        return [[(cx, cy - r * 1.1), (cx + r * 0.8, cy), (cx, cy + r * 1.1), (cx - r * 0.8, cy)]]
    if shape == "cross":
        a, t = r, r * 0.36  # arm half-length, arm half-thickness
        return [[
            (cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t), (cx + a, cy + t), (cx + t, cy + t),
            (cx + t, cy + a), (cx - t, cy + a), (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t),
        ]]
    raise ValueError(f"no polygon for {shape!r}")


def _shape_mask(shape: str, n: int, cx: float, cy: float, r: float, outline: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill and outline masks (n, n) float32 in [0, 1] for a shape of half-extent ``r``."""
    fill = Image.new("L", (n, n), 0)
    line = Image.new("L", (n, n), 0)
    df, dl = ImageDraw.Draw(fill), ImageDraw.Draw(line)
    if shape in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        df.ellipse(box, fill=255)
        dl.ellipse(box, outline=255, width=outline)
        if shape == "ring":
            ri = r * 0.5
            inner = (cx - ri, cy - ri, cx + ri, cy + ri)
            df.ellipse(inner, fill=0)
            dl.ellipse(inner, outline=255, width=outline)
    else:
        for poly in _shape_polygons(shape, cx, cy, r):
            df.polygon(poly, fill=255)
            dl.line(poly + [poly[0]], fill=255, width=outline, joint="curve")
    return np.asarray(fill, np.float32) / 255.0, np.asarray(line, np.float32) / 255.0


def _texture(kind: str, color: tuple[int, int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Object fill (n, n, 3) float32: the colour with a texture pattern in a darker shade."""
    base = np.array(color, np.float32)
    dark = base * 0.45
    img = np.empty((n, n, 3), np.float32)
    img[:] = base
    yy, xx = np.mgrid[0:n, 0:n]
    if kind == "striped":
        period = n // 8
        offset = int(rng.integers(period))
        stripes = ((xx + yy + offset) % period) < period // 2  # diagonal stripes
        img[stripes] = dark
    elif kind == "dotted":
        period = n // 8
        ox, oy = int(rng.integers(period)), int(rng.integers(period))
        dx = (xx + ox) % period - period / 2
        dy = (yy + oy) % period - period / 2
        img[dx * dx + dy * dy <= (period * 0.28) ** 2] = dark
    elif kind != "solid":
        raise ValueError(f"unknown texture {kind!r}")
    return img


def _co_object(kind: str, n: int, cx: float, cy: float, s: float) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """Layers (mask, colour) of a small co-occurring object of half-size ``s``."""
    layers: list[tuple[Image.Image, tuple[int, int, int]]] = []
    if kind == "star":
        m = Image.new("L", (n, n), 0)
        pts = []
        for k in range(10):
            rad = s if k % 2 == 0 else s * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        ImageDraw.Draw(m).polygon(pts, fill=255)
        edge = Image.new("L", (n, n), 0)
        ImageDraw.Draw(edge).line(pts + [pts[0]], fill=255, width=max(1, n // 64))
        # Cyan, a colour no object, background or other co-object uses: a yellow star (the first
        # version) shared its colour with yellow objects and the example SAE merged the two.
        layers += [(m, STAR_COLOR), (edge, (0, 85, 85))]
    elif kind == "heart":
        m = Image.new("L", (n, n), 0)
        d = ImageDraw.Draw(m)
        lobe = s * 0.55
        d.ellipse((cx - s, cy - s * 0.7, cx - s + 2 * lobe, cy - s * 0.7 + 2 * lobe), fill=255)
        d.ellipse((cx + s - 2 * lobe, cy - s * 0.7, cx + s, cy - s * 0.7 + 2 * lobe), fill=255)
        d.polygon([(cx - s * 0.98, cy - s * 0.05), (cx + s * 0.98, cy - s * 0.05), (cx, cy + s)], fill=255)
        layers.append((m, (255, 105, 180)))
    elif kind == "flag":
        pole = Image.new("L", (n, n), 0)
        cloth = Image.new("L", (n, n), 0)
        w = max(2, n // 40)
        ImageDraw.Draw(pole).rectangle((cx - s, cy - s, cx - s + w, cy + s), fill=255)
        ImageDraw.Draw(cloth).rectangle((cx - s + w, cy - s, cx + s, cy), fill=255)
        layers += [(pole, (20, 20, 20)), (cloth, (250, 250, 250)), (_outline_rect(n, cx - s + w, cy - s, cx + s, cy), (20, 20, 20))]
    elif kind != "none":
        raise ValueError(f"unknown co-object {kind!r}")
    return [(np.asarray(m, np.float32) / 255.0, c) for m, c in layers]


def _outline_rect(n: int, x0: float, y0: float, x1: float, y1: float) -> Image.Image:
    m = Image.new("L", (n, n), 0)
    ImageDraw.Draw(m).rectangle((x0, y0, x1, y1), outline=255, width=max(1, n // 64))
    return m


def _over(img: np.ndarray, mask: np.ndarray, color: np.ndarray | tuple[int, int, int]) -> np.ndarray:
    a = mask[..., None]
    return img * (1 - a) + np.asarray(color, np.float32) * a


@dataclass(frozen=True)
class RenderedImage:
    """One rendered image and where its parts are: the ground truth of every mask experiment.

    ``object_mask`` and ``co_object_mask`` are (H, W) float32 in [0, 1], the fraction of each
    output pixel covered by the object (fill and outline) and by the co-object; everything
    else is background.
    """

    image: Image.Image
    object_mask: np.ndarray
    co_object_mask: np.ndarray


def _downsample(arr: np.ndarray, image_size: int) -> np.ndarray:
    """Box-filter a supersampled (n, n, ...) canvas down to (image_size, image_size, ...)."""
    shape = (image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE) + arr.shape[2:]
    return arr.reshape(shape).mean(axis=(1, 3))


def render_layers(sample: Sample, image_size: int, rng: np.random.Generator) -> RenderedImage:
    """Draw one image (RGB, ``image_size`` square) and its object / co-object coverage."""
    n = image_size * _SUPERSAMPLE
    img = _background(sample.background, n, rng)
    # Large object, slightly jittered, so the silhouette dominates the image.
    r = n * rng.uniform(0.28, 0.34)
    cx = n / 2 + rng.uniform(-0.05, 0.05) * n
    cy = n / 2 + rng.uniform(-0.05, 0.05) * n
    # A thick dark outline gives a colour-independent silhouette cue the tiny ViT picks up fast.
    fill, line = _shape_mask(sample.class_name, n, cx, cy, r, outline=max(2, n // 20))
    img = _over(img, fill, _texture(sample.object_texture, COLORS[sample.object_color], n, rng))
    img = _over(img, line, (15, 15, 15))
    object_cover = np.maximum(fill, line)
    co_cover = np.zeros((n, n), np.float32)
    if sample.co_object != "none":
        s = n * rng.uniform(0.10, 0.12)
        corner = int(rng.integers(4))
        margin = s + n * 0.03
        ox = margin if corner % 2 == 0 else n - margin
        oy = margin if corner < 2 else n - margin
        for mask, color in _co_object(sample.co_object, n, ox, oy, s):
            img = _over(img, mask, color)
            object_cover = object_cover * (1 - mask)  # the co-object is drawn on top
            co_cover = np.maximum(co_cover, mask)
    arr = _downsample(np.clip(img, 0, 255), image_size)
    return RenderedImage(
        Image.fromarray(np.round(arr).astype(np.uint8), "RGB"),
        _downsample(object_cover, image_size).astype(np.float32),
        _downsample(co_cover, image_size).astype(np.float32),
    )


def render(sample: Sample, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one image (RGB, ``image_size`` square) for a ground-truth sample."""
    return render_layers(sample, image_size, rng).image


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), 1, index])


def iter_split_images(config: WorldConfig, split: str) -> Iterator[tuple[Sample, Image.Image]]:
    """Render a split in memory: yields ``(sample, image)`` in generation order."""
    for s, rendered in iter_split_layers(config, split):
        yield s, rendered.image


def iter_split_layers(config: WorldConfig, split: str) -> Iterator[tuple[Sample, RenderedImage]]:
    """Like :func:`iter_split_images`, with each image's object and co-object coverage."""
    for i, s in enumerate(sample_split(config, split)):
        yield s, render_layers(s, config.image_size, _image_rng(config.seed, split, i))


@dataclass(frozen=True)
class SplitLayers:
    """A rendered split (or its first rows) as arrays: images and where their parts are."""

    samples: list[Sample]
    images: np.ndarray  # (n, H, W, 3) uint8
    object_masks: np.ndarray  # (n, H, W) float32 coverage in [0, 1]
    co_object_masks: np.ndarray  # (n, H, W) float32 coverage in [0, 1]


def render_split_layers(config: WorldConfig, split: str, limit: int | None = None) -> SplitLayers:
    """Render the first ``limit`` rows (all when None) of a split with their part masks.

    The images are byte-identical to the PNGs :func:`generate_world` writes for ``config``."""
    samples, images, objects, co_objects = [], [], [], []
    for i, (sample, rendered) in enumerate(iter_split_layers(config, split)):
        if limit is not None and i >= limit:
            break
        samples.append(sample)
        images.append(np.asarray(rendered.image))
        objects.append(rendered.object_mask)
        co_objects.append(rendered.co_object_mask)
    return SplitLayers(samples, np.stack(images), np.stack(objects), np.stack(co_objects))


def file_name(index: int) -> str:
    """File name of row ``index``; zero padding keeps sorted order == generation order."""
    return f"{index:06d}.png"


# ----------------------------------------------------------------------------- disk


def object_box(mask: np.ndarray) -> list[int] | None:
    """The tightest ``[x0, y0, x1, y1]`` (x1 / y1 exclusive) around the pixels of an (H, W)
    coverage mask that are > 0; None when no pixel is."""
    ys, xs = np.nonzero(mask > 0)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _metadata_row(index: int, s: Sample, box: list[int] | None) -> dict[str, Any]:
    return {
        "file_name": file_name(index),
        "label": s.label,
        "class_name": s.class_name,
        "background": s.background,
        "object_color": s.object_color,
        "object_texture": s.object_texture,
        "co_object": s.co_object,
        "caption": caption_for(s.class_name, s.background, s.object_color, s.object_texture, s.co_object),
        "object_box": box,
    }


def _vocabulary(config: WorldConfig) -> dict[str, list[str]]:
    vocab = {"class_name": list(config.classes)}
    vocab.update({a: list(config.values(a)) for a in ATTRIBUTES})
    return vocab


def generate_world(out_dir: Path, config: WorldConfig | None = None) -> dict[str, Any]:
    """Write the world to ``out_dir`` (see module docstring) and return the world info.

    Existing files of the two splits are overwritten; stray PNGs from a larger earlier
    world are removed so the folder matches the metadata exactly.
    """
    config = config or WorldConfig()
    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    for split in SPLITS:
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        rows: list[str] = []
        for i, (s, rendered) in enumerate(iter_split_layers(config, split)):
            rendered.image.save(split_dir / file_name(i), format="PNG", optimize=False, compress_level=6)
            rows.append(json.dumps(_metadata_row(i, s, object_box(rendered.object_mask)), sort_keys=False))
        for stale in split_dir.glob("*.png"):
            if not stale.stem.isdigit() or int(stale.stem) >= len(rows):
                stale.unlink()
        (split_dir / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
        counts[split] = len(rows)
    info = {
        "format": "conceptscope-example-world/1",
        "config": config.to_json(),
        "class_names": list(config.classes),
        "attributes": list(ATTRIBUTES),
        "vocabulary": _vocabulary(config),
        "attribute_words": sorted({w for a in ATTRIBUTES for w in config.values(a) if w != "none"}),
        "planted_biases": [b.to_json() for b in config.biases],
        "splits": counts,
        "row_order": "row i of a split is file {i:06d}.png and line i of its metadata.jsonl (generation order)",
    }
    (out_dir / "world.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def load_world_info(out_dir: Path) -> dict[str, Any]:
    """Read ``out_dir/world.json`` as written by :func:`generate_world`."""
    return json.loads((Path(out_dir) / "world.json").read_text(encoding="utf-8"))


def load_metadata(out_dir: Path, split: str) -> list[dict[str, Any]]:
    """Metadata rows of a split, in row order."""
    path = Path(out_dir) / split / "metadata.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ground_truth(out_dir: Path, split: str, attribute: str, value: str | int) -> np.ndarray:
    """Boolean array (n_rows,) : which rows of ``split`` have ``attribute == value``.

    ``attribute`` may be any metadata column, e.g. ``"background"``, ``"co_object"``,
    ``"class_name"`` or ``"label"``.
    """
    rows = load_metadata(out_dir, split)
    if rows and attribute not in rows[0]:
        raise KeyError(f"unknown attribute {attribute!r}; columns: {sorted(rows[0])}")
    return np.array([r[attribute] == value for r in rows], dtype=bool)


def labels(out_dir: Path, split: str) -> np.ndarray:
    """Integer class labels (n_rows,) of a split, in row order."""
    return np.array([r["label"] for r in load_metadata(out_dir, split)], dtype=np.int64)


def load_split_arrays(out_dir: Path, split: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """All images of a split as uint8 (n, H, W, 3) plus their metadata rows."""
    rows = load_metadata(out_dir, split)
    split_dir = Path(out_dir) / split
    images = np.stack([np.asarray(Image.open(split_dir / r["file_name"]).convert("RGB")) for r in rows])
    return images, rows


def empirical_rates(rows: Sequence[dict[str, Any]], class_name: str, attribute: str, value: str) -> float:
    """Fraction of rows of ``class_name`` whose ``attribute`` equals ``value``."""
    sel = [r for r in rows if r["class_name"] == class_name]
    if not sel:
        raise ValueError(f"no rows of class {class_name!r}")
    return sum(r[attribute] == value for r in sel) / len(sel)


__all__ = [
    "ATTRIBUTES",
    "SPLITS",
    "PlantedBias",
    "RenderedImage",
    "Sample",
    "SplitLayers",
    "WorldConfig",
    "caption_for",
    "empirical_rates",
    "file_name",
    "generate_world",
    "ground_truth",
    "iter_split_images",
    "iter_split_layers",
    "labels",
    "load_metadata",
    "load_split_arrays",
    "load_world_info",
    "object_box",
    "render",
    "render_layers",
    "render_split_layers",
    "sample_split",
]
