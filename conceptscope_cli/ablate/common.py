"""What the three `cscope ablate` commands share: the loaded model + SAE, class text
features, spliced forward passes, batches of a split, and resumable per-batch parts.

Notation: B images, C classes, e embedding width, m latents, Ts spliced tokens.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import conceptscope_cli
from conceptscope_cli.backbone.splice import LatentEditFn, SAESplice
from conceptscope_cli.backbone.types import ClipModel, TokenSelection
from conceptscope_cli.cache.store import content_key, write_json_atomic
from conceptscope_cli.config.sections import AblateConfig, BackboneConfig, DatasetConfig
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.progress import Reporter
from conceptscope_cli.project import Project
from conceptscope_cli.sae.model import SparseAutoencoder


def ablate_config(project: Project, override: AblateConfig | None = None) -> AblateConfig:
    """The `[ablate]` settings: `override`, else the manifest's section (defaults while the
    section is not registered with the manifest)."""
    if override is not None:
        cfg = override
    else:
        try:
            cfg = project.manifest.get(AblateConfig)
        except KeyError:
            cfg = AblateConfig()
    try:
        cfg.validate()
    except ValueError as exc:
        raise CscopeError(f"[ablate] {exc}") from None
    return cfg


def eval_split(dataset_cfg: DatasetConfig, split: str | None, cfg: AblateConfig) -> str:
    """The split ablations are measured on: argument, [ablate] split, else the last listed."""
    chosen = split or cfg.split or dataset_cfg.splits[-1]
    if chosen not in dataset_cfg.splits:
        raise CscopeError(f"split {chosen!r} is not listed for this dataset", hint=f"splits: {', '.join(dataset_cfg.splits)}")
    return chosen


# ------------------------------------------------------------------ model
@dataclass
class Session:
    """The backbone with the project's SAE, ready to splice at `layer` over `tokens`."""

    project: Project
    dataset: str
    dataset_cfg: DatasetConfig
    device: torch.device
    backbone: Any  # conceptscope_cli.backbone.loader.Backbone
    sae: SparseAutoencoder
    sae_dir: Path
    sae_key: str
    sae_provenance: dict[str, Any]
    layer: int
    tokens: TokenSelection
    logit_scale: float

    @property
    def model(self) -> ClipModel:
        return self.backbone.model

    def meta(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "backbone": self.project.manifest.get(BackboneConfig).model,
            "backbone_weights": self.backbone.resolved.description,
            "layer": self.layer,
            "token_selection": self.tokens,
            "sae": str(self.sae_dir),
            "sae_key": self.sae_key,
            "n_latents": int(self.sae.d_sae),
            "logit_scale": self.logit_scale,
            "seed": self.project.settings.seed,
            "cscope_version": conceptscope_cli.__version__,
        }


def open_session(
    project: Project, dataset: str | None, *, device: str | None, reporter: Reporter, check_pooled: bool = True
) -> Session:
    """Load backbone and SAE (training the SAE first when `cscope train` has not run) through the
    one loader (`conceptscope_cli.session`), which checks that the SAE fits the backbone and, unless
    told otherwise, reaches its output."""
    from conceptscope_cli.context import run_context
    from conceptscope_cli.dictionary.stage import resolve_sae
    from conceptscope_cli.session import ModelSession

    ctx = run_context(project, dataset, device=device)
    sae_dir, sae_key, provenance = resolve_sae(project, ctx.dataset, device=device, reporter=reporter)
    opened = ModelSession(project, ctx, sae_dir)
    layer, tokens = opened.splice(check_pooled=check_pooled)
    return Session(project, ctx.dataset, ctx.dataset_cfg, ctx.device, opened.backbone, opened.sae, Path(sae_dir),
                   sae_key, provenance, layer, tokens, opened.logit_scale)


def class_text(backbone: Any, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot text features (C, e): each class's prompts embedded, normalised, averaged
    over the templates and normalised again (CLIP's prompt ensembling)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = backbone.encode_text(prompts).reshape(len(class_names), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


@dataclass
class MaskEdit:
    """Zero the latents marked in `mask` (keep=False), or every latent but those (keep=True).

    mask: (B, m) one row per image, or (m,) shared. Applies at every spliced token.
    """

    mask: torch.Tensor
    keep: bool = False

    def __call__(self, f: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(f.device)
        mask = (mask[None] if mask.ndim == 1 else mask)[:, None, :]  # (B|1, 1, m)
        return f.masked_fill(~mask if self.keep else mask, 0.0)


def ids_mask(ids: np.ndarray | torch.Tensor, m: int) -> torch.Tensor:
    """Per-image latent ids (B, i) -> boolean mask (B, m)."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    mask = torch.zeros(ids.shape[0], m, dtype=torch.bool)
    if ids.numel():
        mask.scatter_(1, ids, True)
    return mask


@torch.no_grad()
def image_features(
    session: Session, images: torch.Tensor, *, edit: LatentEditFn | None = None, keep_error: bool = True,
    spliced: bool = True,
) -> torch.Tensor:
    """Normalised image embeddings (B, e), float32, with the SAE spliced in (or not)."""
    if not spliced:
        features = session.model.encode_image(images)
    else:
        with SAESplice(session.model.visual, session.sae, session.layer, tokens=session.tokens,
                       keep_error=keep_error, edit=edit):
            features = session.model.encode_image(images)
    return torch.nn.functional.normalize(features.float(), dim=-1)


# ---------------------------------------------------------------- batches
def split_rows(split_handle: Any, cfg: AblateConfig) -> int:
    """How many rows (from row 0) are measured."""
    n = split_handle.num_rows
    if n is None:
        if cfg.max_images is None:
            raise CscopeError("a streaming split has no known length", hint="set [ablate] max_images")
        return cfg.max_images
    return n if cfg.max_images is None else min(n, cfg.max_images)


def batch_ranges(n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the batches, fixed by n_rows and batch_size alone so that
    a resumed run cuts the split exactly as the interrupted one did."""
    return [(start, min(start + batch_size, n_rows)) for start in range(0, n_rows, batch_size)]


def load_batch(split_handle: Any, start: int, stop: int, preprocess: Any) -> Any:
    """One DecodedBatch of rows [start, stop) (images None when none decoded)."""
    from conceptscope_cli.data.datasets import collate_decoded, decoded_loader

    loader = decoded_loader(split_handle, start, stop, preprocess, batch_size=max(stop - start, 1), num_workers=0)
    batches = list(loader)
    return batches[0] if batches else collate_decoded([])


class PartStore:
    """Per-batch result files `parts/batch-XXXXXX.json` under a stamp of the inputs.

    A part is written atomically when its batch is done, so a killed run loses at most the
    batch in flight; a changed stamp (other settings, SAE, data) discards the old parts.
    """

    def __init__(self, folder: Path, stamp: str) -> None:
        self.folder = folder / "parts"
        self.stamp = stamp
        stamp_file = self.folder / "stamp"
        if self.folder.is_dir() and (not stamp_file.is_file() or stamp_file.read_text() != stamp):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not stamp_file.is_file():
            tmp = stamp_file.with_name("stamp.tmp")
            tmp.write_text(stamp)
            tmp.replace(stamp_file)

    def path(self, index: int) -> Path:
        return self.folder / f"batch-{index:06d}.json"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def write(self, index: int, data: dict[str, Any]) -> None:
        write_json_atomic(self.path(index), data)

    def load(self, n: int) -> list[dict[str, Any]]:
        return [json.loads(self.path(i).read_text()) for i in range(n)]


def stamp_of(inputs: dict[str, Any]) -> str:
    return content_key({**inputs, "format_version": conceptscope_cli.FORMAT_VERSION})


def settings_json(cfg: AblateConfig, names: tuple[str, ...]) -> dict[str, Any]:
    values = dataclasses.asdict(cfg)
    return {name: values[name] for name in names}


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """A small CSV writer with a fixed float format, so reruns give identical bytes."""
    import csv

    def cell(value: Any) -> Any:
        if isinstance(value, float):
            return repr(value) if np.isfinite(value) else ""
        return "" if value is None else value

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[cell(v) for v in row] for row in rows])
    tmp.replace(path)


def iter_todo(store: PartStore, ranges: list[tuple[int, int]], reporter: Reporter) -> Iterator[tuple[int, int, int]]:
    """(batch index, start, stop) of batches without a part; done ones advance the bar."""
    for index, (start, stop) in enumerate(ranges):
        if store.done(index):
            reporter.advance(stop - start)
            continue
        yield index, start, stop
        reporter.advance(stop - start)
