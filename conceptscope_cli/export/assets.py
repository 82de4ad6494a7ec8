"""Report images: compressed thumbnails, de-duplicated by key, and heatmap overlays."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Five anchors of matplotlib's "inferno": black → purple → red → orange → pale yellow.
_INFERNO = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32) / 255.0


class AssetStore:
    """Encoded thumbnails keyed by what they show (e.g. "heat/<position>/<latent>").

    A key added twice is encoded once, so an image shared by several views costs its bytes
    once. Ids are short ("a0", "a1", ...) because the report refers to them many times.
    """

    def __init__(self, image_format: str = "webp", quality: int = 70) -> None:
        self.image_format = image_format
        self.quality = int(quality)
        self.ext = "webp" if image_format == "webp" else "jpg"
        self.mime = "image/webp" if image_format == "webp" else "image/jpeg"
        self._ids: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self.blobs)

    def get(self, key: str) -> str | None:
        """Id of an already added key, or None."""
        return self._ids.get(key)

    def ref(self, key: str) -> str:
        """Id of a key that has been added (KeyError otherwise)."""
        return self._ids[key]

    def add(self, key: str, image: Image.Image, *, max_size: int | None = None, height: int | None = None) -> str:
        """Encode `image` (scaled to fit `max_size` × `max_size`, or to `height`) under `key`; returns its id."""
        existing = self._ids.get(key)
        if existing is not None:
            return existing
        image = image.convert("RGB")
        if height is not None and image.height != height:
            width = max(1, round(image.width * height / image.height))
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        elif max_size is not None and max(image.size) > max_size:
            image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        if self.image_format == "webp":
            image.save(buffer, format="WEBP", quality=self.quality, method=4)
        else:
            image.save(buffer, format="JPEG", quality=self.quality, optimize=True)
        asset_id = f"a{len(self.blobs)}"
        self._ids[key] = asset_id
        self.blobs[asset_id] = buffer.getvalue()
        return asset_id

    def data_uri(self, asset_id: str) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.blobs[asset_id]).decode("ascii")

    def file_name(self, asset_id: str) -> str:
        return f"{asset_id}.{self.ext}"

    def inline_size(self) -> int:
        """Bytes the assets take as data URIs inside a JSON object (quotes, key, comma included)."""
        prefix = len(f"data:{self.mime};base64,") + 8
        return sum(4 * ((len(blob) + 2) // 3) + prefix + len(key) for key, blob in self.blobs.items())

    def write_files(self, folder: Path) -> int:
        """Write every asset as a file into folder; returns the bytes written."""
        folder.mkdir(parents=True, exist_ok=True)
        total = 0
        for asset_id, blob in self.blobs.items():
            (folder / self.file_name(asset_id)).write_bytes(blob)
            total += len(blob)
        return total


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] → (H, W, 3) float32 colours on the inferno scale."""
    x = np.clip(values, 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.floor(x).astype(np.int64).clip(0, len(_INFERNO) - 2)
    frac = (x - low)[..., None]
    return _INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac


def heatmap_overlay(crop: torch.Tensor, patch_map: np.ndarray, opacity: float = 0.6) -> Image.Image:
    """Draw a latent's patch map over the crop the model saw.

    crop (3, H, W) in [0, 1]; patch_map (gh, gw) ≥ 0. The map is upsampled bilinearly and
    divided by its maximum (so a weakly active image still shows where it fires; the caption
    carries the value); colour and opacity both grow with the activation, so inactive patches
    leave the image untouched.
    """
    h, w = crop.shape[1:]
    grid = torch.as_tensor(np.asarray(patch_map, dtype=np.float32))[None, None]
    up = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    peak = float(up.max())
    heat = up / peak if peak > 0 else np.zeros_like(up)
    alpha = (opacity * heat)[..., None]
    base = crop.permute(1, 2, 0).numpy()
    mixed = base * (1 - alpha) + colormap(heat) * alpha
    return Image.fromarray((mixed * 255).round().clip(0, 255).astype(np.uint8))


def crop_image(crop: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → PIL image."""
    return Image.fromarray((crop.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8))
