"""Defaults derived from the data and the model, and warnings for empty or absurd results."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli


def test_recipe_rules_follow_width_and_data_size() -> None:
    from conceptscope_cli.config.sections import SAEConfig
    from conceptscope_cli.sae.recipe import resolve_recipe

    # The embedded example: d 128, 1,140 training images x 65 tokens, batch 1,024.
    example = resolve_recipe(dataclasses.replace(SAEConfig(), batch_size=1024), 128, 1140 * 65)
    cfg = example.config
    assert (cfg.architecture, cfg.k, cfg.expansion, cfg.total_tokens, cfg.warmup_steps) == \
        ("topk", 16, 4, 25 * 1140 * 65, 181)
    assert example.warnings == []
    # ImageNet-1k at ViT-L/14 with 64 sampled tokens per image: the largest dictionary, the token cap.
    imagenet = resolve_recipe(SAEConfig(), 1024, 1_281_167 * 64).config
    assert (imagenet.k, imagenet.expansion, imagenet.total_tokens, imagenet.warmup_steps) == (64, 32, 200_000_000, 500)
    # A 120-image dataset: at least 1,000 steps, the smallest (4x) dictionary, warm-up a tenth of the steps.
    small = resolve_recipe(SAEConfig(), 128, 120 * 65).config
    assert (small.expansion, small.total_tokens, small.warmup_steps) == (4, 1000 * 4096, 100)
    # Between the bounds the dictionary grows with the data, one power of two at a time.
    assert resolve_recipe(SAEConfig(), 128, 1_000_000).config.expansion == 32
    assert resolve_recipe(SAEConfig(), 128, 200_000).config.expansion == 8
    # Explicit values are kept.
    explicit = resolve_recipe(dataclasses.replace(SAEConfig(), k=7, expansion=3, warmup_steps=9), 128, 10_000).config
    assert (explicit.k, explicit.expansion, explicit.warmup_steps) == (7, 3, 9)


def test_explicit_budget_far_from_the_rule_is_warned_about() -> None:
    from conceptscope_cli.config.sections import SAEConfig
    from conceptscope_cli.sae.recipe import resolve_recipe

    # The case: the old 100M-token default on a 120-image dataset (24,415 steps).
    far = resolve_recipe(dataclasses.replace(SAEConfig(), total_tokens=100_000_000), 128, 120 * 65)
    assert len(far.warnings) == 1 and "24,415 steps" in far.warnings[0] and "4,096,000" in far.warnings[0]
    near = resolve_recipe(dataclasses.replace(SAEConfig(), total_tokens=8_000_000), 128, 120 * 65)
    assert near.warnings == []
    too_short = resolve_recipe(dataclasses.replace(SAEConfig(), total_tokens=100_000), 128, 120 * 65)
    assert len(too_short.warnings) == 1


def _stats(scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Image-level statistics of 200 latents: peaks spread over two decades, some broad (noisy) latents."""
    rng = np.random.default_rng(seed)
    peaks = np.exp(rng.normal(0, 1.2, size=200))
    top = np.sort(peaks[:, None] * rng.uniform(0.2, 1.0, size=(200, 20)), axis=1)[:, ::-1]
    top[:, 0] = peaks
    mean_when_active = peaks * rng.uniform(0.01, 0.6, size=200)
    return {"top_values": (top * scale).astype(np.float32), "mean_when_active": mean_when_active * scale}


def test_relative_rule_is_scale_free_and_reference_rule_is_not() -> None:
    from conceptscope_cli.config.sections import DictConfig
    from conceptscope_cli.dictionary.latents import select_valid_latents
    from conceptscope_cli.dictionary.valid import valid_thresholds

    def valid(cfg: DictConfig, stats: dict[str, np.ndarray]) -> np.ndarray:
        t = valid_thresholds(cfg, stats["top_values"])
        return select_valid_latents(stats, noisy_threshold=t["noisy_threshold"], strong_value=t["strong_value"],
                                    min_strong_images=cfg.min_strong_images)[0]

    relative = DictConfig()
    assert relative.valid_rule == "relative"
    small, large = _stats(0.01), _stats(100.0)  # a 128-dim toy model and a ViT-L-like scale
    kept = valid(relative, small)
    assert 0 < len(kept) < 200
    np.testing.assert_array_equal(kept, valid(relative, large))
    reference = DictConfig(valid_rule="reference")  # ConceptScope's absolute 0.1 / 0.5
    assert len(valid(reference, small)) == 0 and len(valid(reference, large)) == 0  # nothing, or all noisy
    t = valid_thresholds(relative, small["top_values"])
    peaks = small["top_values"][:, 0]
    assert t["scale"] == pytest.approx(np.quantile(peaks, 0.9))
    assert t["strong_value"] == pytest.approx(0.05 * t["scale"]) and t["noisy_threshold"] == pytest.approx(0.5 * t["scale"])


def test_result_checks_name_the_reason_and_the_key() -> None:
    from conceptscope_cli import checks

    [empty] = checks.check_valid_latents(0, 512, 323, 214, "reference", {"noisy_threshold": 0.1, "strong_value": 0.5},
                                         "tiny/train")
    assert "0 valid latents of 512: 323 noisy" in empty.message and "214 without enough strong images" in empty.message
    assert "valid_rule" in empty.keys and "noisy_threshold" in empty.keys
    assert checks.check_valid_latents(3, 512, 323, 214, "reference", {}, "x") == []
    found = checks.check_sae({"fvu": 0.61, "dead_fraction": 0.7}, "tiny/train")
    assert [w.stage for w in found] == ["train", "train"]
    assert "FVU 0.61" in found[0].message and "70% of the latents" in found[1].message
    assert checks.check_sae({"fvu": 0.2, "dead_fraction": 0.1}, "x") == []
    # 102 held-out tokens x L0 16 over 512 latents: 3 expected firings each, "never fired" proves nothing.
    assert checks.check_sae({"fvu": 0.2, "dead_fraction": 0.51, "tokens": 102, "l0": 16.0}, "x", 512) == []
    assert len(checks.check_sae({"fvu": 0.2, "dead_fraction": 0.51, "tokens": 10_000, "l0": 16.0}, "x", 512)) == 1
    [no_candidates] = checks.check_categories({"cat": {"target": [], "context": [], "bias": []},
                                               "dog": {"target": [{"latent": 1}], "context": [], "bias": []}}, "x")
    assert "1 class(es) without candidate latents: cat" in no_candidates.message


@pytest.mark.slow
def test_zero_valid_latents_warns_and_strict_exits_1(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A dictionary that keeps nothing: a warning with the counts and keys; --strict makes it exit 1;
    an up-to-date re-run repeats the warning; the relative rule keeps latents on the same data."""
    from helpers import FAST_STAGES, make_tiny_project

    project = make_tiny_project(tmp_path, tiny_model_dir, FAST_STAGES.replace("strong_value = 0.0", "strong_value = 1e9"))
    strict = run_cli(["--strict", "dict"], project)
    assert strict.exit_code == 1, strict.output
    assert "warning: dict: shapes/train: 0 valid latents of 128" in strict.stderr
    assert "without enough strong images" in strict.stderr and "strong_value" in strict.stderr
    assert "--strict" in strict.stderr
    again = run_cli(["dict"], project)  # up to date: same warning, exit 0 without --strict
    assert again.exit_code == 0, again.output
    assert "up to date" in again.stdout and "0 valid latents of 128" in again.stderr
    text = (project / "cscope.toml").read_text().replace('valid_rule = "reference"\n', "")
    (project / "cscope.toml").write_text(text)
    relative = run_cli(["dict"], project)
    assert relative.exit_code == 0, relative.output
    assert "0 valid latents" not in relative.stderr
