"""Streaming SAE quality metrics (accumulate over batches, read at the end)."""

from __future__ import annotations

from typing import Optional

import torch


class ReconstructionMetrics:
    """Accumulates MSE, FVU and L0 over batches of (z (B, d), ẑ (B, d), l0 per token).

    FVU = SSE / SST with SST about the per-dimension mean: Σ_ij (z_ij − mean_j)², computed
    from running sums in float64 (Σz, Σz² per dimension) so batches can stream.
    """

    def __init__(self, d_in: int) -> None:
        self.tokens = 0
        self.sum_squared_error = 0.0
        self.sum_l0 = 0.0
        self.sum_z = torch.zeros(d_in, dtype=torch.float64)
        self.sum_z_squared = torch.zeros(d_in, dtype=torch.float64)

    @torch.no_grad()
    def update(self, target: torch.Tensor, recon: torch.Tensor, active_per_token: Optional[torch.Tensor] = None) -> None:
        target64 = target.detach().double().cpu()
        recon64 = recon.detach().double().cpu()
        self.tokens += target64.shape[0]
        self.sum_squared_error += float((recon64 - target64).pow(2).sum())
        self.sum_z += target64.sum(0)
        self.sum_z_squared += target64.pow(2).sum(0)
        if active_per_token is not None:
            self.sum_l0 += float(active_per_token.detach().double().sum())

    def mse(self) -> float:
        """Mean over tokens and dimensions of (ẑ − z)²."""
        return self.sum_squared_error / max(self.tokens * self.sum_z.numel(), 1)

    def fvu(self) -> float:
        n = max(self.tokens, 1)
        total_variance = float((self.sum_z_squared - self.sum_z.pow(2) / n).sum())
        return self.sum_squared_error / max(total_variance, 1e-30)

    def l0(self) -> float:
        return self.sum_l0 / max(self.tokens, 1)

    def as_dict(self) -> dict[str, float]:
        return {"mse": self.mse(), "fvu": self.fvu(), "explained_variance": 1.0 - self.fvu(),
                "l0": self.l0(), "tokens": float(self.tokens)}


class FiringTracker:
    """Tracks which latents fire.

    * steps_since_fired (m,): steps since the latent was last active on any token; drives
      ghost grads / AuxK ("dead" = not fired for more than dead_window steps).
    * tokens_since_fired (m,): same in tokens; the reported dead fraction is the share of
      latents silent for at least `window_tokens` tokens (once that many have been seen).
    * dense fraction: share of latents active on more than `dense_threshold` of the tokens of
      the current window (the last full window once one has completed).
    """

    def __init__(self, d_sae: int, window_tokens: int, dense_threshold: float = 0.01) -> None:
        self.d_sae = d_sae
        self.window_tokens = int(window_tokens)
        self.dense_threshold = dense_threshold
        self.steps_since_fired = torch.zeros(d_sae, dtype=torch.int64)
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64)
        self.tokens_seen = 0
        self.window_counts = torch.zeros(d_sae, dtype=torch.int64)
        self.window_seen = 0
        self.last_window_counts: Optional[torch.Tensor] = None
        self.last_window_seen = 0

    @torch.no_grad()
    def update(self, fire_counts: torch.Tensor, n_tokens: int) -> None:
        """fire_counts (m,): tokens on which each latent was active in this step's n_tokens."""
        counts = fire_counts.detach().to("cpu", torch.int64)
        fired = counts > 0
        self.steps_since_fired += 1
        self.steps_since_fired[fired] = 0
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0
        self.tokens_seen += n_tokens
        self.window_counts += counts
        self.window_seen += n_tokens
        if self.window_seen >= self.window_tokens:
            self.last_window_counts, self.last_window_seen = self.window_counts.clone(), self.window_seen
            self.window_counts.zero_()
            self.window_seen = 0

    def dead_mask(self, dead_window_steps: int) -> torch.Tensor:
        """(m,) bool: not fired for more than dead_window_steps steps."""
        return self.steps_since_fired > dead_window_steps

    def dead_fraction(self) -> float:
        window = min(self.window_tokens, self.tokens_seen)
        if window == 0:
            return 0.0
        return float((self.tokens_since_fired >= window).double().mean())

    def dense_fraction(self) -> float:
        if self.last_window_counts is not None:
            counts, seen = self.last_window_counts, self.last_window_seen
        else:
            counts, seen = self.window_counts, self.window_seen
        if seen == 0:
            return 0.0
        return float((counts.double() / seen > self.dense_threshold).double().mean())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {"steps_since_fired": self.steps_since_fired, "tokens_since_fired": self.tokens_since_fired,
                 "window_counts": self.window_counts,
                 "scalars": torch.tensor([self.tokens_seen, self.window_seen, self.last_window_seen], dtype=torch.int64)}
        if self.last_window_counts is not None:
            state["last_window_counts"] = self.last_window_counts
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.steps_since_fired = state["steps_since_fired"].clone()
        self.tokens_since_fired = state["tokens_since_fired"].clone()
        self.window_counts = state["window_counts"].clone()
        self.tokens_seen, self.window_seen, self.last_window_seen = (int(v) for v in state["scalars"])
        self.last_window_counts = state["last_window_counts"].clone() if "last_window_counts" in state else None


def firing_fractions(fire_counts: torch.Tensor, n_tokens: int, dense_threshold: float = 0.01) -> dict[str, float]:
    """Dead (never fired) and dense (> dense_threshold of tokens) fractions from total fire counts (m,)."""
    counts = fire_counts.double()
    return {"dead_fraction": float((counts == 0).double().mean()),
            "dense_fraction": float((counts / max(n_tokens, 1) > dense_threshold).double().mean())}
