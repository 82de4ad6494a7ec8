"""The default SAE recipe: settings derived from the model width d and the data size.

`[sae]` keys set to "auto" (the defaults) are resolved here, before the run is keyed and
trained, so the cache key and `cfg.json` hold the concrete values. The rules
(README, "Defaults derived from the data and the model"):

- k (active latents per token, topk / batchtopk) = clamp(d / 8, 8, 64): 16 at d = 128,
  64 at ViT-B (768) and ViT-L (1024).
- expansion (m = expansion · d) = the largest power of two with N·k / (m) ≥ 2,000, i.e. every
  latent fires on 2,000 training tokens on average, clamped to [4, 32]: small data gets a small
  dictionary whose latents all see enough examples; ImageNet-scale data gets 32·d (the size
  ConceptScope and PatchSAE use). N = cached training tokens.
- total_tokens = clamp(25 passes over the N training tokens, at least 1,000 steps of batch_size,
  at most 200M tokens).
- warmup_steps = min(500, a tenth of the steps).

`architecture` defaults to "topk" (a sparse code without a sparsity coefficient to tune);
ConceptScope's recipe is `architecture = "relu"` with its `l1_coefficient` (8e-5, chosen for
ViT-L/14's activation scale).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from conceptscope_cli.config.sections import SAEConfig

AUTO = "auto"
K_PER_WIDTH = 8  # k = d / 8 ...
K_RANGE = (8, 64)  # ... within these bounds
FIRINGS_PER_LATENT = 2_000  # mean training tokens each latent fires on
EXPANSION_RANGE = (4, 32)
PASSES = 25
MIN_STEPS = 1_000
MAX_TOKENS = 200_000_000
MAX_WARMUP = 500
FAR_OFF = 10.0  # an explicit budget this many times above/below the rule is warned about


@dataclass
class Recipe:
    config: SAEConfig  # every "auto" replaced by its value
    derived: dict[str, Any] = field(default_factory=dict)  # key -> value chosen by a rule
    warnings: list[str] = field(default_factory=list)


def auto_k(d: int) -> int:
    return int(min(K_RANGE[1], max(K_RANGE[0], d // K_PER_WIDTH)))


def auto_expansion(d: int, n_tokens: int, k: int) -> int:
    """Largest power of two e in EXPANSION_RANGE with n_tokens·k / (e·d) ≥ FIRINGS_PER_LATENT."""
    ratio = n_tokens * k / (FIRINGS_PER_LATENT * d)
    e = 2 ** math.floor(math.log2(ratio)) if ratio >= 1 else 1
    return int(min(EXPANSION_RANGE[1], max(EXPANSION_RANGE[0], e)))


def auto_total_tokens(n_tokens: int, batch_size: int) -> int:
    return int(min(MAX_TOKENS, max(PASSES * n_tokens, MIN_STEPS * batch_size)))


def resolve_recipe(cfg: SAEConfig, d: int, n_train_tokens: int) -> Recipe:
    """`cfg` with its "auto" values chosen for width d and n_train_tokens training tokens,
    plus warnings for explicit values far from what the rules would choose."""
    derived: dict[str, Any] = {}
    warnings: list[str] = []
    k = auto_k(d) if cfg.k == AUTO else int(cfg.k)
    if cfg.k == AUTO:
        derived["k"] = k
    # The expansion rule counts firings, so relu (no fixed k) uses the k the rule would give.
    expansion: Any = cfg.expansion
    if cfg.expansion == AUTO and not cfg.d_sae:
        expansion = derived["expansion"] = auto_expansion(d, n_train_tokens, k)
    elif cfg.expansion == AUTO:
        expansion = EXPANSION_RANGE[0]  # unused: d_sae wins
    rule_tokens = auto_total_tokens(n_train_tokens, cfg.batch_size)
    if cfg.total_tokens == AUTO:
        total_tokens = derived["total_tokens"] = rule_tokens
    else:
        total_tokens = int(cfg.total_tokens)
        passes = total_tokens / max(n_train_tokens, 1)
        if total_tokens > FAR_OFF * rule_tokens or total_tokens * FAR_OFF < rule_tokens:
            warnings.append(
                f"[sae] total_tokens = {total_tokens:,} is {passes:,.1f} passes over the {n_train_tokens:,} cached "
                f"training tokens ({-(-total_tokens // cfg.batch_size):,} steps); the default rule "
                f"(total_tokens = \"auto\") would train {rule_tokens:,} tokens")
    steps = -(-total_tokens // cfg.batch_size)
    if cfg.warmup_steps == AUTO:
        warmup = derived["warmup_steps"] = int(min(MAX_WARMUP, steps // 10))
    else:
        warmup = int(cfg.warmup_steps)
        if warmup >= steps:
            warnings.append(f"[sae] warmup_steps = {warmup:,} is not below the {steps:,} training steps: the "
                            "learning rate never reaches lr (set warmup_steps = \"auto\")")
    resolved = dataclasses.replace(cfg, k=k, expansion=expansion, total_tokens=total_tokens, warmup_steps=warmup)
    return Recipe(resolved, derived, warnings)


def is_resolved(cfg: SAEConfig) -> bool:
    return AUTO not in (cfg.k, cfg.expansion, cfg.total_tokens, cfg.warmup_steps)
