"""`train_sae`: the training loop behind `cscope train` (no CLI/Rich code here).

Run directory layout:

    run_dir/
      sae.safetensors, cfg.json   final SAE (input scale folded in; takes raw activations)
      eval.json                   held-out metrics (mse, fvu, l0, dead/dense fractions)
      metrics.jsonl               one record every `metrics_every` steps (means over the interval)
      checkpoints/step-XXXXXXXX/  resumable training state (see checkpoint.py)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from conceptscope_cli.config.sections import SAEConfig
from conceptscope_cli.devices import autocast_for, host_to_device, precision_of

from .checkpoint import (
    CHECKPOINT_DIR,
    list_training_checkpoints,
    load_training_checkpoint,
    sae_config_dict,
    save_sae,
    save_training_checkpoint,
    write_eval_json,
)
from .data import CacheLayout, ShuffledTokenStream, iter_eval_batches, open_cache, sample_tokens, split_train_eval
from .init import estimate_input_scale, initial_b_dec
from .losses import auxk_loss, ghost_grad_loss, l1_loss, reconstruction_loss
from .metrics import FiringTracker, ReconstructionMetrics, firing_fractions
from .model import (
    SparseAutoencoder,
    fold_input_scale,
    normalize_decoder_rows_,
    remove_parallel_grad_,
    update_threshold_,
)
from .recipe import is_resolved, resolve_recipe

MetricsCallback = Callable[[dict[str, Any]], None]

# Settings that must not change between a checkpoint and the run resuming from it.
_RESUME_INVARIANTS = ("architecture", "expansion", "d_sae", "k", "batch_size", "seed", "shuffle_buffer",
                      "eval_fraction", "scale_inputs", "b_dec_init")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    input_scale: float
    eval_metrics: dict[str, float]
    resumed_from_step: Optional[int] = None
    final_metrics: dict[str, Any] = field(default_factory=dict)


def learning_rate(cfg: SAEConfig, step: int, total_steps: int) -> float:
    """Linear warm-up over warmup_steps, then constant, optionally decaying after decay_start·total_steps."""
    warmup = int(cfg.warmup_steps)  # resolved from "auto" before training (sae/recipe.py)
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay_from = int(cfg.decay_start * total_steps)
    if cfg.lr_decay != "none" and step >= decay_from:
        progress = min(1.0, (step - decay_from) / max(1, total_steps - decay_from))
        floor = cfg.min_lr_fraction
        if cfg.lr_decay == "cosine":
            factor *= floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor *= 1.0 - (1.0 - floor) * progress
    return cfg.lr * factor


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_optimizer(sae: SparseAutoencoder, cfg: SAEConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2)}
    try:  # fused Adam is ~10x faster than the foreach kernel on CPU, and available on CUDA
        return torch.optim.Adam(sae.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(sae.parameters(), **kwargs)


@torch.no_grad()
def _match_state_layout_to_params(optimizer: torch.optim.Optimizer) -> None:
    """Give restored moment tensors the memory layout of their parameters (W_enc is stored
    transposed; checkpoints hold contiguous copies). Fused kernels expect matching layouts."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


class _IntervalMeans:
    """Sums of per-step scalars since the last metrics record."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1

    def pop(self) -> dict[str, float]:
        means = {key: value / max(self.steps, 1) for key, value in self.sums.items()}
        self.sums, self.steps = {}, 0
        return means

    # Checkpointed: when checkpoint_every is not a multiple of metrics_every, a resumed run must
    # finish the interval it was in with the steps before the checkpoint (JSON floats round-trip).
    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.sums, self.steps = {k: float(v) for k, v in state["sums"].items()}, int(state["steps"])


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line)
        except (ValueError, KeyError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, batches: Iterable[torch.Tensor], device: torch.device) -> dict[str, float]:
    """MSE, FVU, L0, dead and dense fractions of a (raw-input) SAE over (B, d) batches."""
    sae.eval()
    metrics = ReconstructionMetrics(sae.d_in)
    fire_counts = torch.zeros(sae.d_sae, dtype=torch.int64)
    for batch in batches:
        z = batch.to(device)
        features = sae.encode(z)
        recon = sae.decode(features)
        active = features > 0
        metrics.update(z, recon, active.sum(-1))
        fire_counts += active.sum(0).cpu()
    result = metrics.as_dict()
    result.update(firing_fractions(fire_counts, metrics.tokens))
    return result


def training_step(model: torch.nn.Module, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                  tracker: FiringTracker, x: torch.Tensor, cfg: SAEConfig, *, lr: float,
                  autocast: Any = None, global_batch_size: Optional[int] = None,
                  world_size: int = 1) -> dict[str, float]:
    """One optimisation step on this rank's tokens x (b, d) (already input-scaled).

    model is `sae` or its DistributedDataParallel wrapper. Renormalises decoder rows, runs the
    forward pass and losses (MSE + L1 + ghost grads for relu; MSE + AuxK for topk/batchtopk),
    removes the decoder-parallel gradient, clips, steps Adam and updates the firing tracker
    (and the BatchTopK threshold). Returns the step's scalar metrics.
    """
    global_batch_size = global_batch_size or x.shape[0]
    for group in optimizer.param_groups:
        group["lr"] = lr
    normalize_decoder_rows_(sae.W_dec)
    use_aux = cfg.architecture != "relu" and cfg.aux_coefficient > 0 and cfg.aux_k > 0
    use_ghost = cfg.architecture == "relu" and cfg.ghost_grads
    dead_mask = tracker.dead_mask(cfg.dead_window).to(x.device)
    n_dead = int(dead_mask.sum())
    with autocast if autocast is not None else contextlib.nullcontext():
        out = model(x, dead_mask=dead_mask if use_aux else None, aux_k=cfg.aux_k if use_aux else 0)
    recon = out.recon.float()
    mse = reconstruction_loss(recon, x, cfg.mse_normalization)
    loss = mse
    logged: dict[str, float] = {}
    if cfg.architecture == "relu":
        l1 = l1_loss(out.features.float(), nonnegative=True)
        loss = loss + cfg.l1_coefficient * l1
        logged["l1"] = float(l1.detach())
        if use_ghost and n_dead > 0:
            ghost = ghost_grad_loss(x, recon, out.pre_acts.float(), sae.W_dec, dead_mask, mse)
            loss = loss + ghost
            logged["ghost_loss"] = float(ghost.detach())
    if use_aux and out.aux is not None and out.aux_values is not None:
        aux = auxk_loss(x, recon, out.aux, out.aux_values, sae.W_dec, n_dead, cfg.aux_k)
        loss = loss + cfg.aux_coefficient * aux
        logged["auxk_loss"] = float(aux.detach())
    # Each rank holds part of the global batch; weighting by its share makes the DDP-averaged
    # gradient equal the gradient of the mean loss over the whole global batch.
    weight = x.shape[0] * world_size / global_batch_size
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    remove_parallel_grad_(sae.W_dec)
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    optimizer.step()

    fire_counts = out.fire_counts.detach()
    threshold_observation = out.threshold_observation
    if world_size > 1:
        fire_counts = fire_counts.to(torch.int64)
        dist.all_reduce(fire_counts)
        if threshold_observation is not None:
            threshold_observation = threshold_observation.detach().clone()
            dist.all_reduce(threshold_observation)
            threshold_observation /= world_size
    tracker.update(fire_counts, global_batch_size)
    if threshold_observation is not None:
        update_threshold_(sae, threshold_observation, cfg.batchtopk_threshold_momentum)

    with torch.no_grad():
        sse = float((recon - x).pow(2).sum())
        sst = float((x - x.mean(0, keepdim=True)).pow(2).sum())
    return {"loss": float(loss.detach()), "mse": float(mse.detach()), "l0": float(out.l0),
            "fvu": sse / max(sst, 1e-30), **logged}


@dataclass(frozen=True)
class TrainingPlan:
    """The numbers a run is fixed by: images held out, the dictionary size and the step count."""

    cfg: SAEConfig  # with every "auto" value resolved
    n_train: int  # images the stream draws from (the first ones)
    n_eval: int  # held-out images at the end of the entry
    d_in: int  # d
    d_sae: int  # m
    total_steps: int  # ceil(total_tokens / batch_size)


def training_plan(cfg: SAEConfig, n_images: int, n_tokens: int, d_in: int) -> TrainingPlan:
    """Pure: the plan of a run on an entry of `n_images` × `n_tokens` tokens of width `d_in`."""
    n_train, n_eval = split_train_eval(n_images, cfg.eval_fraction)
    if not is_resolved(cfg):  # callers outside the stage may leave "auto" values
        cfg = resolve_recipe(cfg, d_in, n_train * n_tokens).config
    return TrainingPlan(cfg, n_train, n_eval, d_in, cfg.dictionary_size(d_in), -(-int(cfg.total_tokens) // cfg.batch_size))


def changed_invariants(previous: dict[str, Any], cfg: SAEConfig) -> list[str]:
    """Settings of a checkpoint (`previous`, its config) that differ from `cfg` and forbid resuming."""
    return [key for key in _RESUME_INVARIANTS if key in previous and previous[key] != getattr(cfg, key)]


def is_record_step(done: int, every: int, total_steps: int) -> bool:
    """A metrics record (or checkpoint) after `done` steps: every `every` steps and after the last."""
    return done % max(every, 1) == 0 or done == total_steps


def metrics_record(done: int, cfg: SAEConfig, lr: float, means: dict[str, float], tracker: FiringTracker,
                   interval_tokens: int, elapsed: float, total_steps: int, threshold: float | None) -> dict[str, Any]:
    """One line of metrics.jsonl: the interval's means, firing fractions and throughput at step `done`."""
    record = {"step": done, "tokens": done * cfg.batch_size, "lr": lr, **means,
              "dead_fraction": tracker.dead_fraction(), "dense_fraction": tracker.dense_fraction(),
              "tokens_per_s": interval_tokens / max(elapsed, 1e-9), "total_steps": total_steps}
    if threshold is not None:
        record["threshold"] = threshold
    return record


def _mean_over_ranks(means: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    if world_size <= 1:
        return means
    keys = sorted(means)
    packed = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return {k: float(v) / world_size for k, v in zip(keys, packed.tolist())}


@dataclass
class _Start:
    """Where a run starts: step 0 with a fresh input scale and b_dec, or a checkpoint's state."""

    step: int = 0
    input_scale: float = 1.0
    resumed_from: Optional[int] = None
    record: dict[str, Any] = field(default_factory=dict)
    data_state: Optional[dict] = None
    interval: Optional[dict] = None
    optimizer_state: Optional[dict] = None


def _start(run_dir: Path, plan: TrainingPlan, layout: CacheLayout, sae: SparseAutoencoder, tracker: FiringTracker,
           metrics_path: Path, *, resume: bool, is_writer: bool) -> _Start:
    """Restore the newest checkpoint into `sae`/`tracker` (and the torch RNG), or initialise a fresh run."""
    cfg = plan.cfg
    checkpoints = list_training_checkpoints(run_dir) if resume else []
    if checkpoints:
        loaded = load_training_checkpoint(checkpoints[-1])
        state = loaded["state"]
        changed = changed_invariants(state.get("config", {}), cfg)
        if changed:
            raise ValueError(f"cannot resume {run_dir}: settings changed since the checkpoint: {changed}")
        sae.load_state_dict(loaded["model"])
        step = int(state["step"])
        tracker.load_state_tensors({k[len("tracker."):]: v for k, v in loaded["extra"].items()
                                    if k.startswith("tracker.")})
        torch.set_rng_state(loaded["extra"]["rng.torch"])
        if is_writer:
            _truncate_metrics(metrics_path, step)
        return _Start(step, float(state["input_scale"]), step, dict(state.get("metrics") or {}), state.get("data"),
                      state.get("interval"), loaded["optimizer"])
    sample = sample_tokens(layout, plan.n_train, cfg.geometric_median_samples)
    input_scale = estimate_input_scale(sample) if cfg.scale_inputs else 1.0
    with torch.no_grad():
        sae.b_dec.copy_(initial_b_dec(sample * input_scale, cfg.b_dec_init))
    if is_writer:  # a fresh run must not inherit records or checkpoints of an earlier one
        if metrics_path.exists():
            metrics_path.unlink()
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    return _Start(input_scale=input_scale)


def _data_parallel(sae: SparseAutoencoder, device: torch.device, world_size: int) -> torch.nn.Module:
    if world_size <= 1:
        return sae
    from torch.nn.parallel import DistributedDataParallel

    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    # Buffers (the BatchTopK threshold) are kept in sync by all-reducing their updates instead.
    with warnings.catch_warnings():  # torch >= 2.12 deprecates the flag, but its replacement syncs at init
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(sae, device_ids=device_ids, broadcast_buffers=False)


def train_sae(cfg: SAEConfig, entry_dir: Path | str, run_dir: Path | str, *, device: str | torch.device = "cpu",
              provenance: Optional[dict] = None, on_metrics: Optional[MetricsCallback] = None,
              resume: bool = True) -> TrainResult:
    """Train an SAE on the activation cache entry `entry_dir`, writing everything to `run_dir`.

    Resumes from the newest checkpoint in run_dir when `resume` (bit-for-bit continuation of the
    data order and optimizer state). Under torchrun (torch.distributed initialised) the model is
    wrapped in DistributedDataParallel, each rank reads its own slice of the data, and rank 0
    writes all files. The step is `training_step`; the plan, records and final files are
    `training_plan`, `metrics_record` and `_finish`.
    """
    cfg.validate()
    device = torch.device(device)
    rank, world_size = _distributed()
    is_writer = rank == 0
    run_dir = Path(run_dir)
    if is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    layout = open_cache(entry_dir)
    plan = training_plan(cfg, layout.n_images, layout.n_tokens, layout.d_in)
    cfg, total_steps = plan.cfg, plan.total_steps

    torch.manual_seed(cfg.seed)
    sae = SparseAutoencoder(plan.d_in, plan.d_sae, cfg.architecture, int(cfg.k), sparse_kernels=cfg.uses_sparse_kernels(),
                            generator=torch.Generator().manual_seed(cfg.seed))
    tracker = FiringTracker(plan.d_sae, window_tokens=cfg.dead_metric_tokens)
    metrics_path = run_dir / "metrics.jsonl"
    start = _start(run_dir, plan, layout, sae, tracker, metrics_path, resume=resume, is_writer=is_writer)
    input_scale = start.input_scale
    sae.to(device)
    optimizer = make_optimizer(sae, cfg, device)
    if start.optimizer_state is not None:
        optimizer.load_state_dict(start.optimizer_state)
        _match_state_layout_to_params(optimizer)

    model = _data_parallel(sae, device, world_size)
    stream = ShuffledTokenStream(layout, cfg.batch_size, cfg.shuffle_buffer, cfg.seed, n_train_images=plan.n_train,
                                 rank=rank, world_size=world_size, tokens_consumed=start.step * cfg.batch_size)
    if start.data_state is not None:
        stream.load_state_dict(start.data_state)  # also refuses a cache whose training split changed

    wandb_run = _start_wandb(cfg, run_dir, provenance) if (cfg.wandb and is_writer) else None
    autocast = autocast_for(device, precision_of(cfg.autocast, "[sae] autocast"))
    interval = _IntervalMeans()
    interval.load_state_dict(start.interval)
    interval_start, interval_tokens = time.perf_counter(), 0
    last_record: dict[str, Any] = start.record

    sae.train()
    for step in range(start.step, total_steps):
        batch = stream.next_batch()
        x = host_to_device(batch.tokens, device)
        if input_scale != 1.0:
            x = x * input_scale
        lr = learning_rate(cfg, step, total_steps)
        logged = training_step(model, sae, optimizer, tracker, x, cfg, lr=lr, autocast=autocast,
                               global_batch_size=batch.global_batch_size, world_size=world_size)
        interval.add(logged)
        interval_tokens += batch.global_batch_size
        done = step + 1
        if is_record_step(done, cfg.metrics_every, total_steps):
            means = _mean_over_ranks(interval.pop(), world_size, device)
            threshold = float(sae.threshold) if cfg.architecture == "batchtopk" else None
            record = metrics_record(done, cfg, lr, means, tracker, interval_tokens,
                                    time.perf_counter() - interval_start, total_steps, threshold)
            interval_start, interval_tokens = time.perf_counter(), 0
            last_record = record
            if is_writer:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                if wandb_run is not None:
                    wandb_run.log(record, step=done)
                if on_metrics is not None:
                    on_metrics(record)
        if is_writer and cfg.checkpoint_every > 0 and is_record_step(done, cfg.checkpoint_every, total_steps):
            _save_checkpoint(run_dir, done, sae, optimizer, stream, tracker, input_scale, cfg, last_record, interval)

    eval_metrics = _finish(run_dir, sae, plan, layout, input_scale, device, provenance, world_size, wandb_run) \
        if is_writer else _finish_rank(sae)
    if world_size > 1:
        dist.barrier()
    return TrainResult(run_dir=run_dir, steps=total_steps, tokens=total_steps * cfg.batch_size,
                       input_scale=input_scale, eval_metrics=eval_metrics, resumed_from_step=start.resumed_from,
                       final_metrics=last_record)


def _finish_rank(sae: SparseAutoencoder) -> dict[str, float]:
    normalize_decoder_rows_(sae.W_dec)  # every rank ends with the writer's decoder
    return {}


def _finish(run_dir: Path, sae: SparseAutoencoder, plan: TrainingPlan, layout: CacheLayout, input_scale: float,
            device: torch.device, provenance: Optional[dict], world_size: int, wandb_run: Any) -> dict[str, float]:
    """Rank 0: the final SAE (unit decoder rows, input scale folded in), its held-out metrics and files."""
    cfg = plan.cfg
    # Renormalise one last time so the saved decoder has unit rows (before folding the scale).
    normalize_decoder_rows_(sae.W_dec)
    final_sae = fold_input_scale(copy.deepcopy(sae).float(), input_scale)
    eval_metrics: dict[str, float] = {}
    if plan.n_eval > 0:
        eval_metrics = evaluate_sae(final_sae, iter_eval_batches(layout, plan.n_train, plan.n_eval, cfg.batch_size,
                                                                cfg.eval_max_tokens), device)
    else:
        warnings.warn("eval_fraction is 0: no held-out evaluation", stacklevel=3)
    write_eval_json(run_dir, eval_metrics)
    cfg_dict = sae_config_dict(final_sae.cpu(), input_scale=input_scale, provenance=provenance,
                               training={**cfg.to_dict(), "steps": plan.total_steps,
                                         "tokens": plan.total_steps * cfg.batch_size, "world_size": world_size},
                               eval_metrics=eval_metrics)
    save_sae(final_sae, run_dir, cfg_dict)
    if wandb_run is not None:
        wandb_run.summary.update({f"eval/{k}": v for k, v in eval_metrics.items()})
        wandb_run.finish()
    return eval_metrics


def _save_checkpoint(run_dir: Path, step: int, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                     stream: ShuffledTokenStream, tracker: FiringTracker, input_scale: float, cfg: SAEConfig,
                     last_record: dict[str, Any], interval: _IntervalMeans) -> None:
    extra = {f"tracker.{k}": v for k, v in tracker.state_tensors().items()}
    extra["rng.torch"] = torch.get_rng_state()
    state = {"data": stream.state_dict(), "input_scale": input_scale, "config": cfg.to_dict(),
             "metrics": last_record, "interval": interval.state_dict()}
    save_training_checkpoint(run_dir, step, sae, optimizer, state, extra, keep=cfg.keep_checkpoints)


def _start_wandb(cfg: SAEConfig, run_dir: Path, provenance: Optional[dict]) -> Any:
    try:
        import wandb
    except ImportError:
        warnings.warn("wandb=true but the wandb package is not installed; logging to metrics.jsonl only", stacklevel=2)
        return None
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=cfg.wandb_project, id=run_id, resume="allow", dir=str(run_dir),
                      config={**cfg.to_dict(), "provenance": provenance or {}})
