"""The pure parts of `train_sae` (sae/trainer.py) on hand-made numbers: the plan, the resume guard,
when records and checkpoints fall, and what a metrics record holds. No data, no training."""

from __future__ import annotations

import pytest
import torch

from conceptscope_cli.config.sections import SAEConfig
from conceptscope_cli.sae.metrics import FiringTracker
from conceptscope_cli.sae.trainer import changed_invariants, is_record_step, metrics_record, training_plan


def _cfg(**overrides) -> SAEConfig:
    values = dict(architecture="topk", k=4, d_sae=64, batch_size=100, total_tokens=1050, warmup_steps=5,
                  eval_fraction=0.1)
    values.update(overrides)
    return SAEConfig(**values)


def test_plan_holds_out_the_last_images_and_rounds_steps_up() -> None:
    plan = training_plan(_cfg(), n_images=95, n_tokens=7, d_in=32)
    # round(9.5) = 10 held-out images; 1050 tokens / 100 per step = 10.5 -> 11 steps
    assert (plan.n_train, plan.n_eval, plan.d_in, plan.d_sae, plan.total_steps) == (85, 10, 32, 64, 11)
    assert training_plan(_cfg(eval_fraction=0.0), 95, 7, 32).n_eval == 0
    assert training_plan(_cfg(d_sae=None, expansion=8), 95, 7, 32).d_sae == 256
    assert training_plan(_cfg(total_tokens=1000), 95, 7, 32).total_steps == 10


def test_resume_guard_names_exactly_the_changed_invariants() -> None:
    cfg = _cfg()
    same = cfg.to_dict()
    assert changed_invariants(same, cfg) == []
    assert changed_invariants({**same, "k": 8, "seed": 3, "lr": 1.0}, cfg) == ["k", "seed"]  # lr may change
    assert changed_invariants({}, cfg) == []  # an old checkpoint without a config is not refused


@pytest.mark.parametrize("every, total, expected", [(3, 10, [3, 6, 9, 10]), (5, 10, [5, 10]), (0, 4, [1, 2, 3, 4]),
                                                    (20, 10, [10])])
def test_records_fall_every_n_steps_and_after_the_last(every: int, total: int, expected: list[int]) -> None:
    assert [d for d in range(1, total + 1) if is_record_step(d, every, total)] == expected


def test_metrics_record_holds_means_fractions_and_throughput() -> None:
    cfg = _cfg()
    tracker = FiringTracker(4, window_tokens=10)
    tracker.update(torch.tensor([3, 0, 1, 0]), 20)  # two of four latents silent over a full window
    record = metrics_record(7, cfg, 1e-3, {"mse": 0.5, "l0": 3.0}, tracker, interval_tokens=600, elapsed=2.0,
                            total_steps=11, threshold=None)
    assert record == {"step": 7, "tokens": 700, "lr": 1e-3, "mse": 0.5, "l0": 3.0, "dead_fraction": 0.5,
                      "dense_fraction": 0.5, "tokens_per_s": 300.0, "total_steps": 11}
    with_threshold = metrics_record(7, cfg, 1e-3, {}, tracker, 600, 0.0, 11, threshold=0.25)
    assert with_threshold["threshold"] == 0.25 and with_threshold["tokens_per_s"] == 600 / 1e-9
