"""`cscope extract`: run the backbone over a split and cache one layer's activations."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptscope_cli.backbone.capture import ResidualCapture, select_tokens
from conceptscope_cli.backbone.loader import Backbone
from conceptscope_cli.backbone.resolve import ResolvedModel
from conceptscope_cli.cache.disk import activation_bytes, check_disk
from conceptscope_cli.cache.store import CacheEntry, PendingEntry, content_key
from conceptscope_cli.config.manifest import value_error
from conceptscope_cli.config.sections import BackboneConfig, ExtractConfig
from conceptscope_cli.context import RunContext, run_context
from conceptscope_cli.data.datasets import SplitHandle, decoded_loader, open_split, skipped_file_names
from conceptscope_cli.devices import HeapWatch, autocast_dtype, precision_of, release_free_memory
from conceptscope_cli.distributed import build_entry, current
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.extract.store import (
    ShardInfo,
    ShardWriter,
    completed_shards,
    shard_infos,
    shard_path,
    write_view,
)
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project
from conceptscope_cli.session import ModelSession

KIND = "activations"


@dataclass
class ExtractResult:
    entry: CacheEntry
    reused: bool


def activation_inputs(
    resolved: ResolvedModel, backbone: BackboneConfig, extract: ExtractConfig, split: SplitHandle, seed: int
) -> dict[str, Any]:
    """Everything that determines the activations: the cache key is a hash of this."""
    return {
        "model": resolved.model_name if not resolved.model_name.startswith("local-dir:") else "local-dir",
        "pretrained": resolved.pretrained if resolved.pretrained and "/" not in resolved.pretrained else None,
        "weights": resolved.fingerprint,
        "layer": backbone.layer,
        "tokens": backbone.tokens,
        "tokens_per_image": extract.tokens_per_image or None,  # 0 and unset both mean every token
        # The seed only matters when tokens are subsampled; leaving it out otherwise lets
        # projects with different seeds share the same full-token cache.
        "token_seed": seed if extract.tokens_per_image else None,
        "dtype": backbone.dtype,
        "precision": backbone.precision,
        "dataset": {"source": split.config.source, "path": split.config.path, "config": split.config.config},
        "dataset_fingerprint": split.fingerprint,
        "split": split.split,
        "limit": extract.limit,
        "image_column": split.config.image_column,
        "label_column": split.config.label_column,
        "labels": split.labels.describe() if split.labels is not None else None,
    }


def token_positions_for(
    rows: np.ndarray, n_tokens: int, selection: str, tokens_per_image: int | None, seed: int
) -> np.ndarray:
    """Stored token positions per image, (b, T'), deterministic per row (independent of batching).

    With `tokens_per_image = K`, each image keeps K patch tokens drawn by a generator seeded
    with (seed, row_index), plus CLS when the selection includes it; K = 0 or K >= the number
    of patches keeps every token.
    """
    base = select_tokens(n_tokens, selection).numpy()
    patches = base[base > 0]
    keep_cls = bool((base == 0).any())
    if not tokens_per_image or tokens_per_image >= len(patches):  # every token, in raster order
        return np.broadcast_to(base, (len(rows), len(base))).astype(np.int32)
    out = []
    for row in rows:
        rng = np.random.default_rng([seed, int(row)])
        chosen = np.sort(rng.choice(patches, size=tokens_per_image, replace=False))
        out.append(np.concatenate([[0], chosen]) if keep_cls else chosen)
    return np.stack(out).astype(np.int32) if out else np.empty((0, tokens_per_image + keep_cls), np.int32)


@dataclass
class ActivationPlan:
    """What `extract_activations` would cache, and under which key (no image is decoded)."""

    name: str
    split_name: str
    split: SplitHandle
    resolved: ResolvedModel
    backbone_cfg: BackboneConfig
    extract_cfg: ExtractConfig
    seed: int
    inputs: dict[str, Any]
    key: str


def plan_activations(project: Project, dataset_name: str | None = None, split_name: str | None = None, *,
                     full_tokens: bool = False) -> ActivationPlan:
    """The activation entry's inputs and key (also what `cscope run --dry-run` compares)."""
    name, dataset_cfg = project.dataset(dataset_name)
    split_name = project.split(dataset_cfg, split_name)
    backbone_cfg = project.manifest.get(BackboneConfig)
    extract_cfg = project.manifest.get(ExtractConfig)
    if full_tokens:
        extract_cfg = dataclasses.replace(extract_cfg, tokens_per_image=None)
    seed = project.settings.seed
    split = open_split(name, dataset_cfg, split_name, project.root, project.cache)
    resolved = project.resolved_backbone()
    inputs = activation_inputs(resolved, backbone_cfg, extract_cfg, split, seed)
    return ActivationPlan(name, split_name, split, resolved, backbone_cfg, extract_cfg, seed, inputs, content_key(inputs))


def activation_key(project: Project, name: str, split_name: str, *, full_tokens: bool = False
                   ) -> tuple[str, dict[str, Any], SplitHandle]:
    """(cache key, inputs, split) of a split's activation entry, without extracting anything."""
    plan = plan_activations(project, name, split_name, full_tokens=full_tokens)
    return plan.key, plan.inputs, plan.split


def extract_activations(
    project: Project,
    dataset_name: str | None = None,
    split_name: str | None = None,
    *,
    device: str | None = None,
    reporter: Reporter | None = None,
    full_tokens: bool = False,
    ctx: RunContext | None = None,
) -> ExtractResult:
    """Cache the configured layer's activations for one split (no-op when already cached).

    `full_tokens` ignores `[extract] tokens_per_image`: stages that need every patch token
    of an image (patch maps, image-level means) ask for it. `cscope run` passes its resolved `ctx`
    (dataset, split and device; the names are then ignored); the device of a named call is
    resolved on first use, after the plan.
    """
    reporter = reporter or NullReporter()
    if ctx is not None:
        dataset_name, split_name, device = ctx.dataset, ctx.split, ctx.device_name
    plan = plan_activations(project, dataset_name, split_name, full_tokens=full_tokens)
    name, split_name, split, resolved = plan.name, plan.split_name, plan.split, plan.resolved
    backbone_cfg, extract_cfg, seed, inputs, key = plan.backbone_cfg, plan.extract_cfg, plan.seed, plan.inputs, plan.key
    existing = project.cache.lookup(KIND, key)
    if existing is not None:
        return ExtractResult(existing, reused=True)

    def build(pending: PendingEntry) -> tuple[int, int, str, float, int, int, tuple[int, int]]:
        """Every rank: load the backbone (through the one loader, as planned), fill this rank's missing shards."""
        opened = ctx if ctx is not None else run_context(project, name, split_name, device=device)
        backbone = ModelSession(project, opened, resolved=resolved).backbone
        try:
            layer = backbone.resolve_layer(backbone_cfg.layer)
        except CscopeError as exc:  # a manifest value only the loaded model can check: at its line
            raise value_error(backbone_cfg, "layer", exc.message,
                              hint=f"a block index in [-{backbone.n_layers}, {backbone.n_layers - 1}]") from None
        started = time.perf_counter()
        n_tokens, d_model, total = _extract_shards(
            pending.path, split, backbone, layer, backbone_cfg, extract_cfg, seed,
            num_workers=project.settings.num_workers, reporter=reporter, cache_root=project.cache.root,
            force_disk=project.force_disk,
        )
        return (n_tokens, d_model, repr(backbone.preprocess), time.perf_counter() - started, layer, total,
                (int(backbone.grid_size[0]), int(backbone.grid_size[1])))

    def finish(pending: PendingEntry, built: tuple) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0: the shards of every rank become one entry (a virtual view over them)."""
        n_tokens, d_model, preprocess, elapsed, layer, total, grid = built
        shards = shard_infos(pending.path)
        check_complete(shards, extract_cfg.shard_size, total, f"{name}/{split_name}")
        skipped = sorted(item for s in shards for item in s.skipped)
        summary = {
            "model": resolved.description,
            "layer": backbone_cfg.layer,
            "layer_index": layer,
            "tokens": backbone_cfg.tokens,
            "dataset": name,
            "split": split_name,
        }
        n_images = write_view(
            pending.path, n_tokens=n_tokens, d_model=d_model, dtype=backbone_cfg.dtype,
            attrs={"d_model": d_model, "n_tokens": n_tokens, "layer": layer, "token_selection": backbone_cfg.tokens},
        )
        bad_names = skipped_file_names(plan.split.config, project.root, name, split_name)
        for bad in bad_names:
            reporter.log(f"skipped file {bad}: its name is not valid UTF-8")
        stats = {
            "n_images": n_images,
            "n_skipped_files": len(bad_names),
            "skipped_files": bad_names,
            "n_tokens": n_tokens,
            # Every token of the selection stored (no subsample took effect): usable for patch maps.
            "all_tokens": n_tokens == len(select_tokens(1 + grid[0] * grid[1], backbone_cfg.tokens)),
            "d_model": d_model,
            "n_skipped": len(skipped),
            "skipped": [{"row_index": r, "error": e} for r, e in skipped],
            "class_names": split.class_names,
            "preprocess": preprocess,
            "seconds_this_run": round(elapsed, 3),
        }
        return summary, stats

    entry, reused = build_entry(project.cache, KIND, key, inputs, build, finish)
    return ExtractResult(entry, reused=reused)


def _extract_shards(
    folder: Path,
    split: SplitHandle,
    backbone: Backbone,
    layer: int,
    backbone_cfg: BackboneConfig,
    extract_cfg: ExtractConfig,
    seed: int,
    *,
    num_workers: int,
    reporter: Reporter,
    cache_root: Path | None = None,
    force_disk: bool = False,
) -> tuple[int, int, int]:
    """Fill the missing shards of a partial entry; returns (tokens per image, d_model, rows of the split)."""
    capture = ResidualCapture(backbone.visual, layer)
    total = split.num_rows
    if extract_cfg.limit is not None:
        total = extract_cfg.limit if total is None else min(total, extract_cfg.limit)
    shard_size = extract_cfg.shard_size
    done = set(completed_shards(folder))
    autocast = autocast_dtype(backbone.device, precision_of(backbone_cfg.precision, "[backbone] precision"))
    full_tokens = 1 + backbone.grid_size[0] * backbone.grid_size[1]
    stored_tokens = len(token_positions_for(np.zeros(1, np.int64), full_tokens, backbone_cfg.tokens,
                                            extract_cfg.tokens_per_image, seed)[0])
    ranks = current()
    if total is None and ranks.active:
        raise CscopeError(f"{split.name}/{split.split} has no known length, so it cannot be split across ranks",
                          hint="set [extract] limit (or --limit), or run on one process")
    # This rank's shards: a contiguous range (every shard when running alone).
    mine = ranks.span(-(-total // shard_size)) if total is not None else None
    if mine is not None:
        def rows_in(shard: int) -> int:
            return min(shard_size, total - shard * shard_size)  # type: ignore[operator]  # total is set here

        if cache_root is not None:  # the whole entry's missing shards, the same on every rank
            assert total is not None  # mine is None otherwise
            todo = [i for i in range(-(-total // shard_size)) if i not in done]
            missing = sum(rows_in(i) for i in todo)
            check_disk(f"extract {split.name}/{split.split} ({missing} images x {stored_tokens} tokens x "
                       f"{backbone.d_model} {backbone_cfg.dtype})",
                       activation_bytes(missing, stored_tokens, backbone.d_model, backbone_cfg.dtype, len(todo)),
                       cache_root,
                       force=force_disk, log=reporter.log)

        reporter.task(f"extract {split.name}/{split.split}{ranks.label}", sum(rows_in(i) for i in mine))
        reporter.advance(sum(rows_in(i) for i in done if i in mine))  # rows cached by an interrupted run
    else:
        reporter.task(f"extract {split.name}/{split.split}", None)

    shard = mine.start if mine is not None else 0
    while (mine is None or shard < mine.stop) and (total is None or shard * shard_size < total):
        start = shard * shard_size
        stop = start + shard_size if total is None else min(start + shard_size, total)
        if shard in done:
            if total is None:  # streaming: a short complete shard is where the split ended
                info = next(i for i in shard_infos(folder) if i.index == shard)
                if info.row_stop - info.row_start < shard_size:
                    total = info.row_stop
                    break
            shard += 1
            continue
        loader = decoded_loader(
            split, start, stop, backbone.preprocess, batch_size=extract_cfg.batch_size,
            num_workers=num_workers, pin_memory=backbone.device.type == "cuda",
        )
        if total is None and len(loader.dataset) == 0:  # type: ignore[arg-type]  # a streaming split ran out
            total = start
            break
        try:
            writer = ShardWriter(
                shard_path(folder, shard), capacity=len(loader.dataset), n_tokens=stored_tokens,  # type: ignore[arg-type]  # a map-style dataset
                d_model=backbone.d_model, dtype=backbone_cfg.dtype, chunk_images=extract_cfg.chunk_images,
            )
        except FileNotFoundError as exc:
            raise _removed_under_us(folder) from exc
        skipped: list[tuple[int, str]] = []
        heap = HeapWatch()  # within the shard: a drifting heap trimmed before it grows far
        try:
            for batch in loader:
                skipped.extend(batch.failures)
                for row, error in batch.failures:
                    reporter.log(f"skipped row {row}: {error}")
                if batch.images is not None:
                    _store_batch(writer, capture, batch, backbone.device, autocast, backbone_cfg, extract_cfg, seed)
                    heap.check()
                reporter.advance(len(batch.row_index) + len(batch.failures))
            # Closing flushes to disk, so a full disk fails here: inside the try, the shard is dropped.
            writer.close(row_start=start, row_stop=start + len(loader.dataset), skipped=skipped)  # type: ignore[arg-type]  # a map-style dataset
        except BaseException as exc:
            writer.abort()
            if isinstance(exc, FileNotFoundError) and not folder.is_dir():
                raise _removed_under_us(folder) from exc
            raise
        release_free_memory()  # peak RSS bounded by one shard, not by the number of images
        if total is None and len(loader.dataset) < shard_size:  # type: ignore[arg-type]  # a map-style dataset
            total = start + len(loader.dataset)  # type: ignore[arg-type]
            break
        shard += 1
    assert total is not None  # the loop ends at the known length or where the stream ran out
    return stored_tokens, backbone.d_model, total


def _store_batch(writer: ShardWriter, capture: ResidualCapture, batch: Any, device: torch.device,
                 autocast: torch.dtype | None, backbone_cfg: BackboneConfig, extract_cfg: ExtractConfig, seed: int) -> None:
    """One decoded batch through the backbone into the shard. A function of its own so that its
    tensors are freed when it returns, not when the next batch reassigns them: held through the
    next forward, they sat between its large temporaries in the C heap (README "Scaling out")."""
    images = batch.images.to(device, non_blocking=True)
    acts = capture(images, autocast_dtype=autocast)  # (b, T_full, d)
    positions = token_positions_for(batch.row_index, acts.shape[1], backbone_cfg.tokens,
                                    extract_cfg.tokens_per_image, seed)
    index = torch.from_numpy(positions.astype(np.int64)).to(acts.device)
    kept = torch.gather(acts, 1, index[..., None].expand(-1, -1, acts.shape[-1]))
    writer.append(
        kept.to(torch.float16 if backbone_cfg.dtype == "float16" else torch.float32).cpu().numpy(),
        batch.labels, batch.row_index, positions,
    )


def _removed_under_us(folder: Path) -> CscopeError:
    return CscopeError(f"the partial cache entry {folder} was removed while extracting; nothing was committed",
                       hint="run the same command again (`cscope cache rm` keeps entries a running cscope holds)")


def check_complete(shards: list[ShardInfo], shard_size: int, total: int, where: str) -> None:
    """Refuse to commit an entry that does not account for every row of the split.

    Shards must be 0, 1, ... without gaps, each covering its `shard_size` rows, and in each
    the rows written plus the rows skipped must equal the rows it covers; the last must end
    at `total`. (A shard folder removed under a running extract breaks one of these.)"""
    expected = -(-total // shard_size)
    problems = []
    if [s.index for s in shards] != list(range(expected)):
        have = {s.index for s in shards}
        problems.append(f"missing shards {sorted(set(range(expected)) - have)[:10]}")
    for s in shards:
        covered = s.row_stop - s.row_start
        if s.row_start != s.index * shard_size or covered != min(shard_size, total - s.row_start):
            problems.append(f"shard {s.index} covers rows [{s.row_start}, {s.row_stop})")
        elif s.n_images + len(s.skipped) != covered:
            problems.append(f"shard {s.index} holds {s.n_images} rows + {len(s.skipped)} skipped of {covered}")
    if problems:
        raise CscopeError(f"the activations of {where} are incomplete ({'; '.join(problems[:3])}): "
                          "nothing was committed", hint="run `cscope cache rm --partial`, then extract again")
