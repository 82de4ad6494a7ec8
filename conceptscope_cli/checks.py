"""Result checks: an empty or absurd result is a warning with its reason and the key to change.

Stages call the `check_*` functions on what they produced (also when they reuse a cached
result, so a re-run repeats the warning) and `report` the findings; the CLI prints what was
collected when a command ends and, with `--strict`, exits with `STRICT_EXIT_CODE`.
The checks (README, "When a result is empty or absurd"):

- train: held-out FVU > 0.5 (the SAE explains less than half the variance); > 50% dead latents;
- dict: 0 valid latents, with how many were noisy / lacked strong images and the keys;
- categorize: a class without candidate latents (no valid latent is active on its images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

MAX_FVU = 0.5
MAX_DEAD_FRACTION = 0.5
# "Never fired on held-out tokens" means dead only when the held-out sample would have shown the
# average latent this many times (tokens x L0 / m); on a few held-out images it means nothing.
MIN_EXPECTED_FIRINGS = 20
STRICT_EXIT_CODE = 1  # --strict: warnings count as a user error (README, "Exit codes")


@dataclass(frozen=True)
class ResultWarning:
    stage: str
    message: str
    keys: str  # the manifest key(s) that change the outcome

    def text(self) -> str:
        return f"{self.stage}: {self.message} (change {self.keys})"


_collected: list[ResultWarning] = []


def report(warnings: Iterable[ResultWarning]) -> list[ResultWarning]:
    """Record warnings for the end-of-command summary (each once per process)."""
    new = [w for w in warnings if w not in _collected]
    _collected.extend(new)
    return new


def collected() -> list[ResultWarning]:
    return list(_collected)


def clear() -> None:
    _collected.clear()


def check_sae(eval_metrics: dict[str, Any], where: str, n_latents: int | None = None) -> list[ResultWarning]:
    """Warnings about a trained SAE from its held-out metrics (`fvu`, `dead_fraction`, `tokens`, `l0`)."""
    out = []
    fvu = eval_metrics.get("fvu")
    if isinstance(fvu, (int, float)) and fvu > MAX_FVU:
        out.append(ResultWarning(
            "train", f"{where}: the SAE leaves {fvu:.0%} of the activation variance unexplained (FVU {fvu:.3g} > "
            f"{MAX_FVU}): its latents describe little of what the model sees",
            '[sae] k or expansion (larger), total_tokens (longer), or architecture = "topk"'))
    dead = eval_metrics.get("dead_fraction")
    tokens, l0 = eval_metrics.get("tokens"), eval_metrics.get("l0")
    enough = (n_latents is None or not isinstance(tokens, (int, float)) or not isinstance(l0, (int, float))
              or tokens * l0 / max(n_latents, 1) >= MIN_EXPECTED_FIRINGS)
    if isinstance(dead, (int, float)) and dead > MAX_DEAD_FRACTION and enough:
        out.append(ResultWarning(
            "train", f"{where}: {dead:.0%} of the latents never fire on held-out tokens (> {MAX_DEAD_FRACTION:.0%} dead)",
            '[sae] expansion (smaller, or "auto") or total_tokens (longer)'))
    return out


def check_valid_latents(n_valid: int, n_latents: int, n_noisy: int, n_not_strong: int, rule: str,
                        thresholds: dict[str, float], where: str) -> list[ResultWarning]:
    """A dictionary with no valid latent: say which half of the rule removed them."""
    if n_valid > 0:
        return []
    shown = ", ".join(f"{k} {v:.3g}" for k, v in thresholds.items())
    return [ResultWarning(
        "dict", f"{where}: 0 valid latents of {n_latents}: {n_noisy} noisy (mean when active above the noisy "
        f"threshold), {n_not_strong} without enough strong images (valid_rule \"{rule}\": {shown})",
        '[dict] valid_rule = "relative", noisy_threshold, strong_value or min_strong_images')]


def check_categories(classes: dict[str, dict[str, Any]], where: str) -> list[ResultWarning]:
    """Classes whose categorization has no concept at all (no valid latent active on their images)."""
    empty = [name for name, info in classes.items()
             if not any(info.get(kind) for kind in ("target", "context", "uncertain", "bias"))]
    if not empty:
        return []
    shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    return [ResultWarning(
        "categorize", f"{where}: {len(empty)} class(es) without candidate latents: {shown}",
        '[dict] valid_rule / thresholds (more valid latents), or [categorize] candidates')]
