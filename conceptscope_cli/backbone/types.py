"""Static types for the objects the backbone layer handles.

open_clip ships no type information, so a CLIP model and its vision tower are `Any` to the type
checker (their attributes, e.g. `visual.transformer.resblocks`, `encode_image`, `logit_scale`,
would otherwise be checked against `nn.Module.__getattr__`). The SAE is described by the
methods the splice calls, so the backbone layer does not import the SAE library above it.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch

TokenSelection = Literal["all", "cls", "patches"]
"""Which tokens an SAE reads and writes: every token, the CLS token, or the patch tokens."""

ClipModel = Any
"""An open_clip CLIP model (`encode_image`, `encode_text`, `visual`, `logit_scale`)."""

VisualTower = Any
"""An open_clip VisionTransformer (`transformer.resblocks`, `grid_size`, `ln_post`, ...)."""


class SaeLike(Protocol):
    """What the backbone needs of an SAE: (N, d) -> (N, m) -> (N, d) and the decoder bias (d,)."""

    @property
    def b_dec(self) -> torch.Tensor: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, f: torch.Tensor) -> torch.Tensor: ...
