"""`cscope train` as a pipeline stage: the trained SAE is a cache entry.

The entry key hashes the activation entry's key and every training setting that changes
the weights. The run is built inside the entry's partial directory, where its periodic
checkpoints live, so an interrupted `cscope train` resumes from the last checkpoint.
Upstream activations are extracted first when missing (like `make`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from conceptscope_cli import checks
from conceptscope_cli.cache.store import CacheEntry, PendingEntry, content_key
from conceptscope_cli.checks import ResultWarning
from conceptscope_cli.config.manifest import value_error
from conceptscope_cli.config.sections import BackboneConfig, SAEConfig
from conceptscope_cli.distributed import build_entry
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.extract.activations import ExtractResult, extract_activations
from conceptscope_cli.progress import NullReporter, Reporter
from conceptscope_cli.project import Project
from conceptscope_cli.sae.data import split_train_eval
from conceptscope_cli.sae.recipe import resolve_recipe

if TYPE_CHECKING:
    from conceptscope_cli.context import RunContext

KIND = "sae"
# Settings that change how a run is observed, not the weights it ends with.
_NOT_IN_KEY = {"checkpoint_every", "keep_checkpoints", "metrics_every", "wandb", "wandb_project"}


@dataclass
class SAEResult:
    entry: CacheEntry
    reused: bool
    activations: ExtractResult | None = None

    @property
    def path(self) -> Path:
        return self.entry.path


def effective_config(project: Project) -> SAEConfig:
    """`[sae]`, with the project seed unless `[sae] seed` is set explicitly."""
    cfg = project.manifest.get(SAEConfig)
    if "seed" not in project.manifest.raw.get("sae", {}):
        cfg = dataclasses.replace(cfg, seed=project.settings.seed)
    return cfg


def sae_inputs(cfg: SAEConfig, activations_key: str) -> dict[str, Any]:
    return {
        "activations": activations_key,
        "training": {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_KEY},
    }


def sae_plan(project: Project, activations: CacheEntry) -> tuple[SAEConfig, dict[str, Any], str, Any]:
    """(settings, inputs, cache key, recipe) of the SAE trained on the activation entry `activations`.

    "auto" settings become concrete before keying, so the key and cfg.json hold real values."""
    cfg = effective_config(project)
    try:
        cfg.validate()
    except ValueError as exc:
        raise CscopeError(f"[sae]: {exc}") from None
    record = activations.record
    n_train, _ = split_train_eval(int(record["stats"]["n_images"]), cfg.eval_fraction)
    recipe = resolve_recipe(cfg, int(record["stats"]["d_model"]), n_train * int(record["stats"]["n_tokens"]))
    cfg = recipe.config
    d_sae = cfg.dictionary_size(int(record["stats"]["d_model"]))
    if cfg.architecture != "relu" and isinstance(cfg.k, int) and cfg.k > d_sae:  # needs the model's width: checked here, at the key's line
        raise value_error(project.manifest.get(SAEConfig), "k",
                          f"{cfg.k} active latents per token, but the SAE has {d_sae} latents",
                          hint="lower k or raise expansion / d_sae")
    inputs = sae_inputs(cfg, activations.key)
    return cfg, inputs, content_key(inputs), recipe


def train_stage(
    project: Project,
    dataset: str | None = None,
    split: str | None = None,
    *,
    device: str | None = None,
    reporter: Reporter | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    ctx: RunContext | None = None,
) -> SAEResult:
    """Train (or reuse) the SAE that the manifest describes. `cscope run` passes its resolved `ctx`
    (the names are then ignored; its split is the one trained on)."""
    from conceptscope_cli.context import device_of
    from conceptscope_cli.sae.trainer import train_sae

    reporter = reporter or NullReporter()
    if ctx is not None:
        device = ctx.device_name
    activations = extract_activations(project, dataset, split, device=device, reporter=reporter, ctx=ctx)
    record = activations.entry.record
    cfg, inputs, key, recipe = sae_plan(project, activations.entry)
    where = f"{record['summary']['dataset']}/{record['summary']['split']}"
    checks.report(ResultWarning("train", message, "[sae] total_tokens / warmup_steps") for message in recipe.warnings)
    existing = project.cache.lookup(KIND, key)
    if existing is not None:
        checks.report(checks.check_sae(existing.record["stats"].get("eval", {}), where,
                                       existing.record["summary"].get("d_sae")))
        return SAEResult(existing, True, activations)
    backbone = project.manifest.get(BackboneConfig)
    provenance = {
        "backbone": record["summary"]["model"],
        "layer": record["summary"]["layer"],
        "layer_index": record["summary"]["layer_index"],
        "token_selection": backbone.tokens,
        "dataset": record["summary"]["dataset"],
        "split": record["summary"]["split"],
        "activations_key": activations.entry.key,
    }
    total_steps = -(-int(cfg.total_tokens) // cfg.batch_size)

    def build(pending: PendingEntry) -> Any:
        """Every rank trains (DistributedDataParallel under torchrun); rank 0 writes the files."""
        # Counted in tokens, so the display shows tokens/s and an ETA for the whole budget.
        reporter.task("train: SAE", total_steps * cfg.batch_size, unit="tokens")
        last_step = [0]

        def metrics(row: dict[str, Any]) -> None:
            step = int(row.get("step", last_step[0]))
            reporter.advance(max(0, step - last_step[0]) * cfg.batch_size)
            last_step[0] = step
            if on_metrics:
                on_metrics(row)

        result = train_sae(
            cfg, activations.entry.path, pending.path, device=device_of(project, device),
            provenance=provenance, on_metrics=metrics, resume=True,
        )
        reporter.advance(max(0, total_steps - last_step[0]) * cfg.batch_size)
        return result

    def finish(pending: PendingEntry, result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        _drop_training_state(pending.path)
        summary = {**provenance, "architecture": cfg.architecture, "d_sae": cfg.dictionary_size(record["stats"]["d_model"])}
        stats = {"steps": result.steps, "tokens": result.tokens, "eval": result.eval_metrics,
                 "input_scale": result.input_scale, "derived": recipe.derived}
        return summary, stats

    entry, reused = build_entry(project.cache, KIND, key, inputs, build, finish)
    checks.report(checks.check_sae(entry.record["stats"].get("eval", {}), where, entry.record["summary"].get("d_sae")))
    return SAEResult(entry, reused, activations)


def _drop_training_state(run_dir: Path) -> None:
    """Optimizer checkpoints are only for resuming; the finished entry keeps the SAE."""
    import shutil

    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        shutil.rmtree(checkpoints)
