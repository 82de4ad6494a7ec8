"""Training losses. z (B, d) inputs, ẑ (B, d) reconstructions, f (B, m) latents."""

from __future__ import annotations

import torch

from .sparse_ops import DeadBlock, SparseRows, sparse_decode


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, normalization: str = "reference") -> torch.Tensor:
    """Mean over tokens and dims of (ẑ − z)², divided per token by ‖z‖₂ when normalization="reference".

    "reference" is ConceptScope's normalisation (by the norm, not its square); "none" is plain MSE.
    """
    squared = (recon - target).pow(2)
    if normalization == "reference":
        return (squared / target.norm(dim=-1, keepdim=True).clamp_min(1e-8)).mean()
    if normalization == "none":
        return squared.mean()
    raise ValueError(f"unknown mse normalization {normalization!r}")


def l1_loss(features: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """Mean over tokens of ‖f‖₁; f (B, m). With unit-norm decoder rows this is the reference penalty.

    nonnegative=True (ReLU latents) skips the abs, saving a pass over the (B, m) matrix; the value
    and the gradient are the same for f ≥ 0."""
    return (features if nonnegative else features.abs()).sum(-1).mean()


def ghost_grad_loss(target: torch.Tensor, recon: torch.Tensor, pre_acts: torch.Tensor, W_dec: torch.Tensor,
                    dead_mask: torch.Tensor, mse_loss: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Ghost-grad loss for dead latents (METHOD §2).

    r = z − ẑ (detached); g = exp(pre[:, dead]) W_dec[dead], rescaled by ‖r‖/(2‖g‖+ε) (scale detached);
    L = mean((g − r)² / ‖r‖₂) · stopgrad(L_mse / (L + ε)). Only W_enc/b_enc/W_dec of dead latents
    receive gradient. Shapes: target/recon (B, d), pre_acts (B, m), W_dec (m, d), dead_mask (m,) bool.
    """
    if not bool(dead_mask.any()):
        return torch.zeros((), dtype=recon.dtype, device=recon.device)
    residual = (target - recon).detach()
    residual_norm = residual.norm(dim=-1, keepdim=True)
    ghost = torch.exp(pre_acts[:, dead_mask]) @ W_dec[dead_mask]
    scale = residual_norm / (2.0 * ghost.norm(dim=-1, keepdim=True) + eps)
    ghost = ghost * scale.detach()
    raw = ((ghost - residual).pow(2) / residual_norm.clamp_min(eps)).mean()
    return raw * (mse_loss / (raw + eps)).detach()


def auxk_loss(target: torch.Tensor, recon: torch.Tensor, aux: SparseRows | DeadBlock, aux_values: torch.Tensor,
              W_dec: torch.Tensor, n_dead: int, aux_k_requested: int) -> torch.Tensor:
    """AuxK loss (Gao et al. 2024): reconstruct the residual e = z − ẑ (detached) with the top
    dead latents, ê = Σ aux_values W_dec[aux latents] (no bias), normalised by the residual variance:

        L_aux = ‖e − ê‖² / ‖e − mean(e)‖²   (sums over tokens and dims)

    scaled by min(n_dead / k_aux, 1) so a handful of dead latents does not dominate.
    aux: the (token, dead latent) entries, aux_values (nnz,) their activations; or a `DeadBlock`
    with aux_values (B, n_dead), zero outside the entries, decoded by one dense matmul; W_dec (m, d).
    """
    residual = (target - recon).detach().float()
    if isinstance(aux, DeadBlock):
        aux_recon = aux_values.float() @ W_dec.index_select(0, aux.latents)
    else:
        aux_recon = sparse_decode(aux, aux_values.float(), W_dec)
    variance = (residual - residual.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-8)
    scale = min(n_dead / max(aux_k_requested, 1), 1.0)
    return scale * (aux_recon - residual).pow(2).sum() / variance
