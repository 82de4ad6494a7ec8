"""Block-L activations computed from the images on demand, instead of read from a token cache.

`ImageTokens` runs the backbone up to block L on preprocessed images and returns exactly
what `cscope extract` would store for them: the selected tokens, rounded to the cache's
storage dtype (so latents computed from either source agree; only the backbone's batching
can change the float rounding). `ImageTokenReader` offers the parts of `ActivationReader`
that the dictionary, categorize and export stages use on a few images (`row_index`,
`labels`, `read_images`), recomputing the tokens of the requested images.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from conceptscope_cli.backbone.capture import ResidualCapture, select_tokens
from conceptscope_cli.backbone.loader import Backbone
from conceptscope_cli.config.sections import BackboneConfig
from conceptscope_cli.data.datasets import SplitHandle


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
        self.positions = select_tokens(1 + backbone.grid_size[0] * backbone.grid_size[1], backbone_cfg.tokens)
        self.storage = torch.float16 if backbone_cfg.dtype == "float16" else torch.float32
        self.autocast = torch.bfloat16 if backbone_cfg.precision == "bf16" and backbone.device.type == "cuda" else None

    @property
    def n_tokens(self) -> int:
        return int(len(self.positions))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        acts = self.capture(images.to(self.backbone.device, non_blocking=True), autocast_dtype=self.autocast)
        kept = acts[:, self.positions.to(acts.device)]
        # The cache stores this dtype; rounding the same way keeps both sources' latents equal.
        return kept.to(self.storage).float()


class ImageTokenReader:
    """`read_images` by running the backbone on the requested images (positions index row_index)."""

    def __init__(self, tokens: ImageTokens, split: SplitHandle, row_index: np.ndarray, labels: np.ndarray,
                 batch_size: int = 64) -> None:
        self.tokens, self.split, self.batch_size = tokens, split, int(batch_size)
        self.row_index = np.asarray(row_index, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    @property
    def n_images(self) -> int:
        return int(len(self.row_index))

    @property
    def n_tokens(self) -> int:
        return self.tokens.n_tokens

    def read_images(self, positions: np.ndarray) -> np.ndarray:
        """(n,) entry positions -> (n, T, d) float32, in the order given."""
        from conceptscope_cli.dictionary.reference import fetch_images

        rows = [int(self.row_index[p]) for p in np.asarray(positions, dtype=np.int64)]
        images = fetch_images(self.split, rows)
        preprocess = self.tokens.backbone.preprocess
        out = []
        for lo in range(0, len(rows), self.batch_size):
            batch = torch.stack([preprocess(images[r]) for r in rows[lo:lo + self.batch_size]])
            out.append(self.tokens(batch).cpu().numpy())
        d = self.tokens.backbone.d_model
        return np.concatenate(out) if out else np.zeros((0, self.n_tokens, d), np.float32)


def token_reader(project: Any, meta: dict[str, Any], backbone: Backbone, split: SplitHandle) -> TokenReader:
    """The tokens behind a concept dictionary: its full-token cache entry when one exists,
    else recomputed from the images (rows and labels from its latents entry)."""
    from conceptscope_cli.config.sections import ExtractConfig
    from conceptscope_cli.dictionary.sparse import LatentMatrix
    from conceptscope_cli.extract.store import ActivationReader

    key = meta.get("activations_entry")
    entry = project.cache.lookup("activations", key) if key else None
    if entry is not None:
        return ActivationReader(entry.path)
    latents = project.cache.lookup("latents", meta["latents_entry"])
    if latents is None:
        from conceptscope_cli.errors import MissingArtifactError

        raise MissingArtifactError(f"latents entry {meta['latents_entry']} is missing from the cache",
                                   hint="run `cscope dict` again")
    with LatentMatrix(latents.path / "latents.h5") as matrix:
        rows, labels = matrix.row_index.copy(), matrix.labels.copy()
    return ImageTokenReader(ImageTokens(backbone, project.manifest.get(BackboneConfig)), split, rows, labels,
                            batch_size=project.manifest.get(ExtractConfig).batch_size)
