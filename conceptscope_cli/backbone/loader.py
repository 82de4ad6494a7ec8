"""Load an open_clip model resolved by `conceptscope_cli.backbone.resolve` (and pick a device)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from conceptscope_cli.backbone.resolve import ResolvedModel
from conceptscope_cli.backbone.types import ClipModel, VisualTower
from conceptscope_cli.errors import CscopeError


@dataclass
class Backbone:
    """A loaded CLIP model with its preprocessing and tokenizer."""

    model: ClipModel
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    resolved: ResolvedModel
    device: torch.device

    @property
    def visual(self) -> VisualTower:
        return self.model.visual

    @property
    def n_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def d_model(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (int(self.visual.grid_size[0]), int(self.visual.grid_size[1]))

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def resolve_layer(self, layer: int) -> int:
        """A non-negative block index; -2 means the second-to-last block."""
        resolved = layer + self.n_layers if layer < 0 else layer
        if not 0 <= resolved < self.n_layers:
            raise CscopeError(f"layer {layer} does not exist: the model has {self.n_layers} blocks")
        return resolved

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (len(prompts), embed_dim)."""
        tokens = self.tokenizer(prompts).to(self.device)
        with torch.no_grad():
            features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1)


def load_backbone(resolved: ResolvedModel, device: torch.device) -> Backbone:
    """Build the open_clip model, load its weights, and put it in eval mode on `device`."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            resolved.model_name, pretrained=resolved.pretrained, device=device
        )
        tokenizer = open_clip.get_tokenizer(resolved.model_name)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        raise CscopeError(
            f"could not load backbone {resolved.description!r}: {exc}",
            hint="check [backbone] model/pretrained; without network access only local weights can be loaded",
        ) from exc
    model.eval()
    if not hasattr(model, "visual") or not hasattr(getattr(model.visual, "transformer", None), "resblocks"):
        raise CscopeError(
            f"{resolved.description} has no ViT residual stream (visual.transformer.resblocks)",
            hint="cscope supports open_clip VisionTransformer towers",
        )
    return Backbone(model=model, preprocess=preprocess, tokenizer=tokenizer, resolved=resolved, device=device)
