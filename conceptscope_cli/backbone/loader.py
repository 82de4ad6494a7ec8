"""Load an open_clip model resolved by `conceptscope_cli.backbone.resolve`, or only its preprocessing.

`load_backbone` builds the model and reads its weights; `load_preprocessing` reads the model's
config alone (no model built, no weights read or downloaded) for what only needs the pixels the
model sees and its patch grid, such as drawing a report's heatmaps from cached activations."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
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


def _fetch_from_hub(resolved: ResolvedModel) -> None:
    """Download (or find in the local cache) what open_clip will read from the Hub, before
    building the model: offline, a missing file fails in a second instead of after the
    model is built and the downloads are retried."""
    import open_clip

    from conceptscope_cli.hub import offline_hint, prepare_hub

    if resolved.model_name.startswith("hf-hub:"):
        repo = resolved.model_name[len("hf-hub:"):]

        def fetch() -> None:
            from huggingface_hub import hf_hub_download

            hf_hub_download(repo, "open_clip_config.json")
    elif resolved.pretrained and not resolved.model_name.startswith("local-dir:") and not os.path.isfile(resolved.pretrained):
        cfg = open_clip.get_pretrained_cfg(resolved.model_name, resolved.pretrained)
        if not cfg:
            return  # an unknown tag: open_clip's own error names the valid ones
        repo = cfg.get("hf_hub") or cfg.get("url") or resolved.model_name

        def fetch() -> None:
            open_clip.download_pretrained(cfg)
    else:
        return
    access = prepare_hub()
    try:
        fetch()
    except Exception as exc:  # the Hub libraries raise many types; each means "not available here"
        where = "is not in the local Hugging Face cache" if not access.online else "could not be downloaded"
        raise CscopeError(f"backbone {resolved.description!r} ({repo}) {where}: {type(exc).__name__}: {exc}",
                          hint=offline_hint("model", repo, access)) from exc


def load_backbone(resolved: ResolvedModel, device: torch.device) -> Backbone:
    """Build the open_clip model, load its weights, and put it in eval mode on `device`."""
    import open_clip

    _fetch_from_hub(resolved)
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


@dataclass(frozen=True)
class Preprocessing:
    """What open_clip's eval transform does to an image, and the patch grid the model cuts it into."""

    preprocess: Callable[[Any], torch.Tensor]
    grid_size: tuple[int, int]


def _configs(resolved: ResolvedModel) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(model_cfg, preprocess_cfg overrides) from the sources open_clip's `create_model` reads, in its
    order; None when the config is not a local or built-in file (then only the full load is exact)."""
    import open_clip

    if resolved.model_name.startswith(("local-dir:", "hf-hub:")):
        if resolved.model_name.startswith("hf-hub:"):
            from huggingface_hub import hf_hub_download

            _fetch_from_hub(resolved)  # the config only: the same offline handling as the full load
            path = hf_hub_download(resolved.model_name[len("hf-hub:"):], "open_clip_config.json")
        else:
            path = os.path.join(resolved.model_name[len("local-dir:"):], "open_clip_config.json")
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        return config.get("model_cfg"), config.get("preprocess_cfg", {})
    name = resolved.model_name.replace("/", "-")
    model_cfg = open_clip.get_model_config(name)
    tag = open_clip.get_pretrained_cfg(name, resolved.pretrained) if resolved.pretrained else {}
    return (model_cfg, tag) if model_cfg is not None else None


def load_preprocessing(resolved: ResolvedModel) -> Preprocessing:
    """The eval transform and patch grid `load_backbone(resolved, ...)` would give, from the config.

    Mirrors open_clip's `create_model_and_transforms`: defaults, then the config's (or the pretrained
    tag's) preprocess_cfg, then the size of the built visual tower (to_2tuple of vision_cfg
    image_size); a tower that is not open_clip's own ViT (timm, ...) falls back to the full load."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    configs = _configs(resolved)
    vision = (configs[0] or {}).get("vision_cfg", {}) if configs else {}
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if configs is None or "timm_model_name" in vision or size is None or patch is None:
        backbone = load_backbone(resolved, torch.device("cpu"))
        return Preprocessing(backbone.preprocess, backbone.grid_size)
    two = (lambda v: (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1])))  # noqa: E731 - open_clip's to_2tuple
    image, cell = two(size), two(patch)
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), configs[1] or {})
    cfg["size"] = image
    return Preprocessing(image_transform_v2(PreprocessCfg(**cfg), is_train=False),
                         (image[0] // cell[0], image[1] // cell[1]))
