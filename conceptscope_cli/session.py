"""The one loader: what a stage opens to run CLIP with an SAE on a split.

A `ModelSession` holds a run context (`conceptscope_cli.context`), an SAE folder and, for stages
that read a concept dictionary, its meta. Each part is opened on first use and once: the
backbone (model weights), its preprocessing (from the config alone while the model is not
loaded), the SAE with its cfg.json, the split, and the token reader behind the dictionary. The
splice checks (`backbone/session.py`: the SAE fits the backbone, its tokens reach the output)
run in `splice`. Which SAE a stage uses stays the stage's choice (`dictionary.stage.resolve_sae`
trains one when needed; a dictionary's meta names its own).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from conceptscope_cli.config.sections import BackboneConfig, ExtractConfig
from conceptscope_cli.context import RunContext
from conceptscope_cli.errors import MissingArtifactError
from conceptscope_cli.project import Project

if TYPE_CHECKING:
    from conceptscope_cli.backbone.loader import Backbone, Preprocessing
    from conceptscope_cli.backbone.resolve import ResolvedModel
    from conceptscope_cli.backbone.types import TokenSelection
    from conceptscope_cli.backbone.views import ModelView
    from conceptscope_cli.data.datasets import SplitHandle
    from conceptscope_cli.extract.images import TokenReader
    from conceptscope_cli.sae.model import SparseAutoencoder


class ModelSession:
    """Backbone, preprocessing, SAE, split and token reader of one run, each loaded on first use."""

    def __init__(self, project: Project, ctx: RunContext, sae_dir: Path | None = None,
                 meta: dict[str, Any] | None = None, *, resolved: ResolvedModel | None = None) -> None:
        self.project, self.ctx = project, ctx
        self.sae_dir = Path(sae_dir) if sae_dir is not None else None
        self.meta = meta  # a concept dictionary's meta: where its tokens are (token cache or latents entry)
        # The backbone as the caller resolved it (extract keys its cache by this fingerprint: the
        # weights loaded are the ones keyed); None: resolved from the manifest on first use.
        self._resolved = resolved

    @property
    def resolved(self) -> ResolvedModel:
        if self._resolved is None:
            self._resolved = self.project.resolved_backbone()
        return self._resolved

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    # ------------------------------------------------------------ backbone
    @cached_property
    def backbone(self) -> Backbone:
        from conceptscope_cli.backbone.loader import load_backbone

        return load_backbone(self.resolved, self.ctx.device)

    @cached_property
    def preprocessing(self) -> Preprocessing:
        """The eval transform and patch grid; without loading weights unless the model is loaded anyway."""
        from conceptscope_cli.backbone.loader import Preprocessing, load_preprocessing

        if "backbone" in self.__dict__:
            return Preprocessing(self.backbone.preprocess, self.backbone.grid_size)
        return load_preprocessing(self.resolved)

    @property
    def grid(self) -> tuple[int, int]:
        return self.preprocessing.grid_size

    @cached_property
    def view(self) -> ModelView:
        """The crop the model sees, split at normalisation (masks and heatmaps are drawn on it)."""
        from conceptscope_cli.backbone.views import model_view

        return model_view(self.preprocessing.preprocess)

    # ----------------------------------------------------------------- SAE
    @cached_property
    def _sae(self) -> tuple[SparseAutoencoder, dict[str, Any]]:
        from conceptscope_cli.sae.checkpoint import load_sae

        if self.sae_dir is None:
            raise ValueError("this session was opened without an SAE folder")
        return load_sae(self.sae_dir, self.ctx.device)

    @property
    def sae(self) -> SparseAutoencoder:
        return self._sae[0]

    @property
    def sae_cfg(self) -> dict[str, Any]:
        return self._sae[1]

    def splice(self, *, check_pooled: bool = True) -> tuple[int, TokenSelection]:
        """(block, token selection) to splice the SAE at, frozen for inference; CscopeError when the
        SAE does not fit the backbone or (unless `check_pooled` is False) cannot reach its output."""
        from conceptscope_cli.backbone.session import check_reachable, check_sae_fits

        self.sae.requires_grad_(False)
        self.backbone.model.requires_grad_(False)
        project_layer = self.backbone.resolve_layer(self.project.manifest.get(BackboneConfig).layer)
        layer, tokens = check_sae_fits(self.sae, self.sae_cfg, self.backbone, project_layer)
        if check_pooled:
            check_reachable(self.backbone, layer, tokens)
        return layer, tokens

    @property
    def logit_scale(self) -> float:
        from conceptscope_cli.backbone.session import logit_scale_of

        return logit_scale_of(self.backbone.model)

    # ---------------------------------------------------------------- data
    @cached_property
    def split(self) -> SplitHandle:
        from conceptscope_cli.data.datasets import open_split

        return open_split(self.ctx.dataset, self.ctx.dataset_cfg, self.ctx.split, self.project.root,
                          self.project.cache)

    @cached_property
    def reader(self) -> TokenReader:
        """The tokens behind the dictionary (`meta`): its full-token cache entry when one exists (no
        model needed), else recomputed from the images by the backbone (rows and labels from its
        latents entry)."""
        from conceptscope_cli.dictionary.sparse import LatentMatrix
        from conceptscope_cli.dictionary.tokens import ImageTokenReader
        from conceptscope_cli.extract.images import ImageTokens
        from conceptscope_cli.extract.store import ActivationReader

        if self.meta is None:
            raise ValueError("this session was opened without a dictionary's meta")
        key = self.meta.get("activations_entry")
        entry = self.project.cache.lookup("activations", key) if key else None
        if entry is not None:
            return ActivationReader(entry.path)
        latents = self.project.cache.lookup("latents", self.meta["latents_entry"])
        if latents is None:
            raise MissingArtifactError(f"latents entry {self.meta['latents_entry']} is missing from the cache",
                                       command="cscope dict", hint="run `cscope dict` again")
        with LatentMatrix(latents.path / "latents.h5") as matrix:
            rows, labels = matrix.row_index.copy(), matrix.labels.copy()
        manifest = self.project.manifest
        return ImageTokenReader(ImageTokens(self.backbone, manifest.get(BackboneConfig)), self.split, rows, labels,
                                batch_size=manifest.get(ExtractConfig).batch_size)

    # ------------------------------------------------------------ forwards
    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor, batch: int) -> torch.Tensor:
        """L2-normalised image embeddings (n, e) of unnormalised crops (n, 3, H, W), on CPU; under
        bf16 autocast on CUDA when `[backbone] precision = "bf16"`."""
        from conceptscope_cli.devices import autocast_for, host_to_device

        out = []
        for start in range(0, len(pixels), batch):
            x = self.view.normalize(host_to_device(pixels[start:start + batch], self.device))
            with autocast_for(self.device, self.ctx.precision):
                embedding = self.backbone.model.encode_image(x)
            out.append(torch.nn.functional.normalize(embedding.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings (P, e) on CPU."""
        return self.backbone.encode_text(prompts).cpu()
