"""The exact pixels the model sees.

open_clip's eval preprocessing is Compose([Resize, CenterCrop, to-RGB, ToTensor,
Normalize]). Masks and heatmaps must be drawn on the centre crop the model saw, not on a
differently resized image (a bug of the reference code), and masking must happen before
normalisation so that "black" means zero pixels. `ModelView` splits the pipeline there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T


@dataclass
class ModelView:
    to_crop: Callable[[Image.Image], Image.Image]  # resize + crop (+ RGB), still a PIL image
    mean: torch.Tensor  # (3,)
    std: torch.Tensor  # (3,)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The crop as an unnormalised tensor in [0, 1], (3, H, W)."""
        return T.functional.to_tensor(self.to_crop(image).convert("RGB"))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(…, 3, H, W) in [0, 1] → model input."""
        mean = self.mean.to(pixels.device)[:, None, None]
        std = self.std.to(pixels.device)[:, None, None]
        return (pixels - mean) / std


def model_view(preprocess: Callable) -> ModelView:
    """Split an open_clip eval transform at ToTensor."""
    steps = list(getattr(preprocess, "transforms", []))
    to_tensor = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
    normalize = next((s for s in steps if isinstance(s, T.Normalize)), None)
    if to_tensor is None or normalize is None:
        raise ValueError(f"unsupported preprocessing pipeline: {preprocess!r}")
    return ModelView(
        to_crop=T.Compose(steps[:to_tensor]) if to_tensor else (lambda im: im),
        mean=torch.tensor(normalize.mean, dtype=torch.float32),
        std=torch.tensor(normalize.std, dtype=torch.float32),
    )
