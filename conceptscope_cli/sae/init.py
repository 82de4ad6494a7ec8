"""Decoder-bias initialisation."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(points: torch.Tensor, maxiter: int = 100, eps: float = 1e-6, ftol: float = 1e-20) -> torch.Tensor:
    """Point minimising the sum of Euclidean distances to points (N, d) -> (d,), by Weiszfeld.

    Each iteration re-weights the points by 1/max(‖x_i − y‖, eps) (eps avoids the
    singularity when y lands on a data point) and stops when the relative change of the
    objective falls below ftol.
    """
    points = points.double()
    median = points.mean(0)
    objective = (points - median).norm(dim=-1).sum()
    for _ in range(maxiter):
        distances = (points - median).norm(dim=-1)
        weights = 1.0 / distances.clamp_min(eps)
        median = (weights.unsqueeze(-1) * points).sum(0) / weights.sum()
        new_objective = (points - median).norm(dim=-1).sum()
        if torch.abs(objective - new_objective) <= ftol * new_objective:
            break
        objective = new_objective
    return median.float()


def initial_b_dec(sample: torch.Tensor, method: str, maxiter: int = 100) -> torch.Tensor:
    """b_dec (d,) from a sample (N, d): "geometric_median", "mean" or "zeros"."""
    if method == "geometric_median":
        return geometric_median(sample, maxiter=maxiter)
    if method == "mean":
        return sample.float().mean(0)
    if method == "zeros":
        return torch.zeros(sample.shape[-1])
    raise ValueError(f"unknown b_dec_init {method!r}")


def estimate_input_scale(sample: torch.Tensor) -> float:
    """s such that s·z has unit mean squared norm: s = 1/sqrt(mean ‖z‖²); sample (N, d)."""
    mean_squared_norm = sample.double().pow(2).sum(-1).mean().item()
    if mean_squared_norm <= 0:
        raise ValueError("cannot estimate an input scale from all-zero activations")
    return float(mean_squared_norm ** -0.5)
