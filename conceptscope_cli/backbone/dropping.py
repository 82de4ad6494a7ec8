"""Block-L activations of images with some patch tokens removed from the sequence.

Used by the context-only check of a bias claim (METHOD §Categorization, "Context-only check"):
the tokens an object covers are dropped after the position embedding, so the blocks never see
them. Dropping (rather than blacking out pixels) leaves no hole whose outline the model could
read. The model's own forward runs (conv, class token, position embedding, patch dropout,
`ln_pre`, the blocks); a hook on `ln_pre` keeps each image's remaining tokens and the forward
stops at block L. Images that keep the same number of tokens run as one batch, so no attention
mask is needed and every image's result equals a forward of that image alone.

Shapes: B images, P patches (raster order), T = 1 + P tokens (class token first), Tk the tokens
an image keeps (the class token always), d the width.
"""

from __future__ import annotations

import contextlib

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from conceptscope_cli.backbone.capture import ResidualCapture
from conceptscope_cli.backbone.types import VisualTower


@torch.no_grad()
def activations_without_patches(
    visual: VisualTower, layer: int, images: Float[Tensor, "B 3 H W"], drop: Bool[Tensor, "B P"],
    *, autocast_dtype: torch.dtype | None = None,
) -> list[Float[Tensor, "Tk d"]]:
    """Block `layer`'s output for each image, without the patches `drop` marks: one (Tk, d)
    tensor per image, its tokens in sequence order (the class token first).

    `images` are model inputs (normalised). An image whose patches are all dropped keeps only
    its class token."""
    if drop.ndim != 2 or drop.shape[0] != images.shape[0]:
        raise ValueError(f"drop must be (B, P) for {images.shape[0]} images, got {tuple(drop.shape)}")
    keep = torch.cat([torch.ones(len(drop), 1, dtype=torch.bool, device=drop.device), ~drop.bool()], dim=1)  # (B, T)
    counts = keep.sum(1)
    capture = ResidualCapture(visual, layer)
    out: list[Tensor | None] = [None] * len(images)
    for count in torch.unique(counts).tolist():
        members = torch.nonzero(counts == count).flatten()
        # (b, count) token positions to keep, ascending, for the images that keep `count` tokens
        positions = torch.stack([torch.nonzero(keep[i]).flatten() for i in members.tolist()])
        with _keeping(visual, positions.to(images.device)):
            acts = capture(images[members.to(images.device)], autocast_dtype=autocast_dtype)
        for row, i in enumerate(members.tolist()):
            out[i] = acts[row]
    return [a for a in out if a is not None]


@contextlib.contextmanager
def _keeping(visual: VisualTower, positions: Tensor):  # noqa: ANN202 - a context manager
    """While active, `visual.ln_pre`'s output (B, T, d) is cut to the tokens `positions` (B, Tk)."""
    n_tokens = int(visual.positional_embedding.shape[0])

    def hook(module: torch.nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if output.ndim != 3 or output.shape[1] != n_tokens or output.shape[0] != positions.shape[0]:
            raise RuntimeError(f"ln_pre gave {tuple(output.shape)}, expected (B={positions.shape[0]}, T={n_tokens}, d): "
                               "this visual tower's token layout is not supported")
        index = positions[:, :, None].expand(-1, -1, output.shape[2])
        return output.gather(1, index)

    handle = visual.ln_pre.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
