"""The valid-latent thresholds of `[dict]`, absolute (ConceptScope) or relative to the model.

ConceptScope keeps a latent when it is not noisy (mean image-level activation when active
≤ 0.1) and has at least 2 images above 0.5. Those numbers were chosen for ViT-L/14's
activation scale; another backbone (or another SAE recipe) puts image-level activations on
another scale, and the same numbers then keep nothing or everything.

`valid_rule = "relative"` (the default) measures the scale on the split itself:

    s = 90th percentile, over the latents that fire on some image, of the latent's largest
        image-level activation (the peak of a strong latent);
    noisy_threshold = relative_noisy · s  (0.5),   strong_value = relative_strong · s  (0.05).

So "noisy" reads "active with a mean above half a strong latent's peak" (fires broadly at full
strength, not selectively) and "strong image" reads "above 5% of a strong latent's peak". The
rule is unchanged when activations are multiplied by any constant (a test checks it).
The 90th percentile rather than the median: most latents of a fresh dictionary are weak, and
a scale set by them would flag the background latents (large and broad by nature) as noisy.
`"reference"` uses `noisy_threshold` and `strong_value` as absolute values, for exact
reproduction of ConceptScope.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCALE_QUANTILE = 0.9


def activation_scale(top_values: np.ndarray) -> float:
    """s: the SCALE_QUANTILE over firing latents of their largest image-level activation.

    top_values: (m, K) each latent's strongest image values, descending (−1 / 0 pad)."""
    peaks = top_values[:, 0] if top_values.size else np.zeros(0)
    peaks = peaks[peaks > 0]
    return float(np.quantile(peaks, SCALE_QUANTILE)) if peaks.size else 0.0


def valid_thresholds(cfg: Any, top_values: np.ndarray) -> dict[str, float]:
    """{"noisy_threshold", "strong_value"} in activation units, and the scale s they came from.

    cfg: a DictConfig (valid_rule, noisy_threshold, strong_value, relative_noisy, relative_strong)."""
    if cfg.valid_rule == "reference":
        return {"noisy_threshold": float(cfg.noisy_threshold), "strong_value": float(cfg.strong_value)}
    scale = activation_scale(top_values)
    return {"noisy_threshold": cfg.relative_noisy * scale, "strong_value": cfg.relative_strong * scale,
            "scale": scale}
