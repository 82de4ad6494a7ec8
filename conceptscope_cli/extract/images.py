"""Block-L activations computed from the images on demand, instead of read from a token cache.

`ImageTokens` runs the backbone up to block L on preprocessed images and returns exactly
what `cscope extract` would store for them: the selected tokens, rounded to the cache's
storage dtype (so latents computed from either source agree; only the backbone's batching
can change the float rounding). `TokenReader` is what later stages read of a split's tokens:
an `ActivationReader`, or `dictionary.tokens.ImageTokenReader`, which recomputes them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import numpy as np
import torch

from conceptscope_cli.backbone.capture import ResidualCapture, recording, select_tokens
from conceptscope_cli.backbone.loader import Backbone
from conceptscope_cli.config.sections import BackboneConfig
from conceptscope_cli.devices import autocast_dtype, precision_of


class TokenReader(Protocol):
    """What later stages need of a split's block-L tokens (an `ActivationReader` or an `ImageTokenReader`)."""

    row_index: np.ndarray
    labels: np.ndarray

    @property
    def n_images(self) -> int: ...

    @property
    def n_tokens(self) -> int: ...

    def read_images(self, positions: np.ndarray) -> np.ndarray: ...


class ImageTokens:
    """Preprocessed images (b, 3, H, W) -> the stored tokens of block L, (b, T, d) float32 on the device."""

    def __init__(self, backbone: Backbone, backbone_cfg: BackboneConfig) -> None:
        self.backbone = backbone
        self.layer = backbone.resolve_layer(backbone_cfg.layer)
        self.capture = ResidualCapture(backbone.visual, self.layer)
        n_tokens = 1 + backbone.grid_size[0] * backbone.grid_size[1]
        self.positions = select_tokens(n_tokens, backbone_cfg.tokens)
        self._every_token = bool(torch.equal(self.positions, torch.arange(n_tokens)))  # keep() needs no gather
        self.storage = torch.float16 if backbone_cfg.dtype == "float16" else torch.float32
        self.autocast = autocast_dtype(backbone.device, precision_of(backbone_cfg.precision, "[backbone] precision"))

    @property
    def n_tokens(self) -> int:
        return int(len(self.positions))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.keep(self.capture(images.to(self.backbone.device, non_blocking=True), autocast_dtype=self.autocast))

    def keep(self, acts: torch.Tensor) -> torch.Tensor:
        """Block-L output (b, 1 + patches, d) -> the stored tokens (b, T, d) float32."""
        # The cache stores this dtype; rounding the same way keeps both sources' latents equal.
        if self._every_token and acts.dtype != self.storage:
            return acts.to(self.storage).float()  # the rounding already copies: no gather needed
        kept = acts[:, self.positions.to(acts.device)]  # a copy, never a view of the live residual
        return kept.to(self.storage).float()

    @contextlib.contextmanager
    def recorded(self) -> Iterator[list[torch.Tensor]]:
        """The stored tokens of every image run through the whole model inside the block, batch by
        batch (each (b, T, d) float32): block L's output is kept on the way, no second forward."""
        with recording(self.backbone.visual, self.layer, self.keep) as kept:
            yield kept
