"""Settings of `cscope export` (the `[export]` section of `cscope.toml`).

Plain field types only (str, int, float, bool, Optional, list[str], Literal) so the
manifest system can validate the section and write it into the template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

#: Every format `cscope export` can write.
FORMATS = ("html", "csv", "json", "saelens")


@dataclass(frozen=True)
class ExportConfig:
    formats: list[str] = field(
        default_factory=lambda: list(FORMATS),
        metadata={"help": 'What to write: "html" (offline report), "csv" and "json" (class x concept tables), '
                          '"saelens" (the SAE as a SAELens folder plus a copy in cscope\'s own format).'})
    out_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Output folder (relative to the project). Default <outputs>/report/<dataset>/<split>."})
    title: Optional[str] = field(default=None, metadata={"help": "Report title (default: the project name)."})
    concepts: Literal["categorized", "all"] = field(
        default="categorized",
        metadata={"help": 'Concept pages in the report: "categorized" (latents that are a candidate of some class) '
                          'or "all" valid latents.'})
    thumbnail_size: int = field(default=96, metadata={"help": "Longest side, in pixels, of image thumbnails in the report."})
    tile_height: int = field(default=64, metadata={"help": "Height, in pixels, of a reference tile in the report."})
    image_format: Literal["webp", "jpeg"] = field(
        default="webp", metadata={"help": "Encoding of report images (webp is smaller; jpeg for old viewers)."})
    quality: int = field(default=70, metadata={"help": "JPEG/WebP quality of report images (1-100)."})
    max_images_per_concept: int = field(
        default=8, metadata={"help": "Top images of the dataset, with the activation heatmap, on a concept page."})
    class_examples: int = field(
        default=3, metadata={"help": "High- and low-activation images (each) of a class on a concept page; 0 disables."})
    top_classes: int = field(default=10, metadata={"help": "Classes listed by concept strength on a concept page."})
    heatmap_opacity: float = field(default=0.6, metadata={"help": "Opacity of the activation heatmap drawn over an image (0-1)."})
    single_file_max_mb: float = field(
        default=50.0,
        metadata={"help": "Largest single-file report in MB; above it the report is a folder (index.html + assets/)."})

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown export format(s) {', '.join(map(repr, unknown))}; choose from {', '.join(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        for name in ("thumbnail_size", "tile_height"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be at least 8 pixels")
        for name in ("max_images_per_concept", "class_examples", "top_classes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0.0 <= self.heatmap_opacity <= 1.0:
            raise ValueError("heatmap_opacity must be in [0, 1]")
        if self.single_file_max_mb <= 0:
            raise ValueError("single_file_max_mb must be positive")
