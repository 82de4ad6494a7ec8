"""Sparse autoencoder over residual-stream activations.

Notation (shapes, the letter key of CONTRIBUTING.md): B rows of a batch (here tokens), d activation
width (d_in), m latents (d_sae); the jaxtyping annotations spell the same shapes.

    pre  = (z − b_dec) W_enc + b_enc          (B, m)
    f    = σ(pre)                             (B, m)   σ depends on the architecture
    ẑ    = f W_dec + b_dec                    (B, d)

relu      σ = ReLU
topk      keep the k largest pre-activations per token, ReLU them, zero the rest
batchtopk training: keep the k·B largest ReLU(pre) across the whole batch;
          inference: f = ReLU(pre) · [ReLU(pre) > θ] with θ a learned running estimate
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .sparse_ops import DeadBlock, SparseEncode, SparseRows, sparse_decode

ARCHITECTURES = ("relu", "topk", "batchtopk")


@dataclass
class SAEOutput:
    """Everything the losses and trackers need from one forward pass.

    recon (B, d); features (B, m) dense latents or None on the sparse path;
    pre_acts (B, m) pre-activations (relu: with grad, used by ghost grads) or None;
    active/values: the active latents as a pattern and its values (nnz,) on the sparse path;
    aux/aux_values: the AuxK entries for the AuxK loss, on both paths: a pattern and its values (nnz,), or
      on the sparse path a `DeadBlock` and its (B, n_dead) values when the entries are dense enough;
    fire_counts (m,) number of tokens each latent fired on;
    threshold_observation: for batchtopk training, the smallest positive kept activation.
    """

    recon: Float[Tensor, "B d"]
    features: Optional[Float[Tensor, "B m"]]
    pre_acts: Optional[Float[Tensor, "B m"]]
    active: Optional[SparseRows]
    values: Optional[Float[Tensor, " nnz"]]
    aux: Optional[SparseRows | DeadBlock]
    aux_values: Optional[Tensor]  # (nnz_aux,), or (B, n_dead) for a DeadBlock
    fire_counts: Int[Tensor, " m"]
    l0: Float[Tensor, ""]
    threshold_observation: Optional[Float[Tensor, ""]] = None


class SparseAutoencoder(nn.Module):
    """Untied SAE with W_enc (d, m), b_enc (m), W_dec (m, d), b_dec (d)."""

    threshold: torch.Tensor  # registered buffer (0-dim)

    def __init__(self, d_in: int, d_sae: int, architecture: str = "relu", k: int = 32,
                 sparse_kernels: bool = False, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
        if sparse_kernels and architecture == "relu":
            raise ValueError("sparse kernels are only available for the topk and batchtopk architectures")
        self.d_in = int(d_in)
        self.d_sae = int(d_sae)
        self.architecture = architecture
        self.k = int(k)
        self.sparse_kernels = bool(sparse_kernels)
        # W_enc is (d, m) but stored latent-major (memory of an (m, d) matrix): the sparse TopK
        # backward produces per-latent rows, which then accumulate without a transposed copy, and
        # dense matmuls run equally fast with the transposed operand.
        self.W_enc = nn.Parameter(torch.empty(self.d_sae, self.d_in).t())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_in))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        # BatchTopK inference threshold θ; negative means "not estimated yet".
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Kaiming-uniform init (as PatchSAE), decoder rows at unit norm.

        For topk/batchtopk the encoder starts as the decoder transpose (Gao et al.: this
        avoids many dead latents); the weights are still separate parameters.
        """
        with torch.no_grad():
            # Same bound as nn.init.kaiming_uniform_(a=0) with fan_in = tensor.size(1).
            bound_enc = math.sqrt(6.0 / self.d_sae)
            self.W_enc.uniform_(-bound_enc, bound_enc, generator=generator)
            bound_dec = math.sqrt(6.0 / self.d_in)
            self.W_dec.uniform_(-bound_dec, bound_dec, generator=generator)
            normalize_decoder_rows_(self.W_dec)
            if self.architecture != "relu":
                self.W_enc.copy_(self.W_dec.t())
            self.b_enc.zero_()
            self.b_dec.zero_()

    # ------------------------------------------------------------------ encode
    def pre_activations(self, z: Float[Tensor, "B d"]) -> Float[Tensor, "B m"]:
        """(B, d) -> (B, m)."""
        return torch.addmm(self.b_enc, z - self.b_dec, self.W_enc)

    def encode(self, z: Float[Tensor, "B d"]) -> Float[Tensor, "B m"]:
        """Dense latents f (B, m) for activations z (B, d), inference behaviour."""
        pre = self.pre_activations(z)
        if self.architecture == "relu":
            return F.relu(pre)
        if self.architecture == "topk":
            return _dense_topk(pre, self.k)
        post = F.relu(pre)
        if self.training:
            return _batch_topk(post, self.k)[0]
        theta = float(self.threshold.clamp_min(0.0))
        return post * (post > theta)


    def decode(self, f: Float[Tensor, "B m"]) -> Float[Tensor, "B d"]:
        """(B, m) -> (B, d)."""
        return torch.addmm(self.b_dec, f, self.W_dec)

    # ----------------------------------------------------------------- forward
    def forward(self, z: Float[Tensor, "B d"], dead_mask: Optional[Bool[Tensor, " m"]] = None,
                aux_k: int = 0) -> SAEOutput:
        """Training forward. z (B, d); dead_mask (m,) bool selects AuxK candidates."""
        aux_k = int(min(aux_k, int(dead_mask.sum()))) if dead_mask is not None and aux_k > 0 else 0
        # BatchTopK's inference forward (threshold θ) stays dense: it is not a training step.
        if self.sparse_kernels and (self.architecture == "topk" or self.training):
            return self._forward_sparse(z, dead_mask, aux_k)
        pre = self.pre_activations(z)
        threshold_observation = None
        fire_counts: Optional[torch.Tensor] = None
        if self.architecture == "relu":
            features = F.relu(pre)
        elif self.architecture == "topk":
            features, kept_latents, kept_values = _dense_topk(pre, self.k, return_kept=True)
            fire_counts = torch.bincount(kept_latents[kept_values > 0], minlength=self.d_sae)
        elif self.training:
            features, threshold_observation, kept_latents, kept_values = _batch_topk(F.relu(pre), self.k,
                                                                                     return_kept=True)
            fire_counts = torch.bincount(kept_latents[kept_values > 0], minlength=self.d_sae)
        else:
            post = F.relu(pre)
            features = post * (post > float(self.threshold.clamp_min(0.0)))
        recon = self.decode(features)
        aux = aux_values = None
        if aux_k > 0 and dead_mask is not None:  # aux_k > 0 only with a dead_mask
            masked = pre.masked_fill(~dead_mask.unsqueeze(0), float("-inf"))
            aux_values, aux_indices = masked.topk(aux_k, dim=-1, sorted=False)
            aux = SparseRows.from_indices(aux_indices, self.d_sae)
            aux_values = aux_values.clamp_min(0.0).reshape(-1)
        if fire_counts is None:  # only the kept entries can be positive; count them from the sparse side
            fire_counts = (features > 0).sum(0)
        return SAEOutput(recon=recon, features=features, pre_acts=pre, active=None, values=None,
                         aux=aux, aux_values=aux_values,
                         fire_counts=fire_counts, l0=fire_counts.sum() / features.shape[0],
                         threshold_observation=threshold_observation)

    def _forward_sparse(self, z: Float[Tensor, "B d"], dead_mask: Optional[Bool[Tensor, " m"]], aux_k: int) -> SAEOutput:
        """Training forward of topk / batchtopk on the sparse kernels (same values and gradients
        as the dense path)."""
        aux_latents = dead_mask.nonzero().squeeze(-1) if (dead_mask is not None and aux_k > 0) else None
        patterns: dict = {}
        values, aux_values = SparseEncode.apply(z.float(), self.b_dec, self.W_enc, self.b_enc, self.k,
                                                self.architecture, aux_latents, aux_k, patterns)
        active: SparseRows = patterns["active"]
        recon = sparse_decode(active, values, self.W_dec, self.b_dec)
        fire_counts = torch.bincount(active.cols, minlength=self.d_sae)
        threshold_observation = None
        if self.architecture == "batchtopk":  # smallest kept positive activation, as on the dense path
            threshold_observation = (values.detach().min() if values.numel()
                                     else torch.zeros((), device=z.device))
        return SAEOutput(recon=recon, features=None, pre_acts=None, active=active, values=values,
                         aux=patterns["aux"] if aux_k > 0 else None, aux_values=aux_values if aux_k > 0 else None,
                         fire_counts=fire_counts, l0=torch.tensor(active.nnz / z.shape[0]),
                         threshold_observation=threshold_observation)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, architecture={self.architecture}, k={self.k}"


def _dense_topk(pre: Float[Tensor, "B m"], k: int, return_kept: bool = False) -> Any:
    """Keep the k largest entries per row of pre (B, m), ReLU them, zero the rest -> (B, m).

    With return_kept, also the kept latent ids and values, flattened (B·k,)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    values = values.clamp_min(0.0)
    features = torch.zeros_like(pre).scatter(-1, indices, values)
    if return_kept:
        return features, indices.reshape(-1), values.detach().reshape(-1)
    return features


def _batch_topk(post: Float[Tensor, "B m"], k: int, return_kept: bool = False) -> Any:
    """Keep the k·B largest entries of post (B, m) across the batch.

    Returns (features (B, m), smallest positive kept value (0-dim)); with return_kept also the
    kept latent ids and values (k·B,).
    """
    flat = post.reshape(-1)
    n_keep = min(k * post.shape[0], flat.numel())
    values, indices = flat.topk(n_keep, sorted=False)
    features = torch.zeros_like(flat).scatter(0, indices, values).view_as(post)
    kept = values.detach()
    positive = kept[kept > 0]
    observation = positive.min() if positive.numel() else torch.zeros((), device=post.device)
    if return_kept:
        return features, observation, indices % post.shape[1], kept
    return features, observation


@torch.no_grad()
def update_threshold_(sae: SparseAutoencoder, observation: Float[Tensor, ""], momentum: float) -> None:
    """EMA update of the BatchTopK inference threshold θ ← μθ + (1−μ)·observation."""
    if float(sae.threshold) < 0:
        sae.threshold.copy_(observation.to(sae.threshold))
    else:
        sae.threshold.mul_(momentum).add_((1.0 - momentum) * observation.to(sae.threshold))


@torch.no_grad()
def normalize_decoder_rows_(W_dec: Float[Tensor, "m d"], eps: float = 1e-8) -> None:
    """Rescale every row of W_dec (m, d) to unit L2 norm, in place."""
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(eps))


@torch.no_grad()
def remove_parallel_grad_(W_dec: Float[Tensor, "m d"]) -> None:
    """Remove from W_dec.grad (m, d) the component parallel to each (unit-norm) row, in place.

    Keeps Adam from spending updates on the row norm, which renormalisation would undo.
    """
    if W_dec.grad is None:
        return
    # g ← g − (g·w / w·w) w, row-wise; einsum + addcmul avoid (m, d) temporaries. (A row-blocked
    # mul + sum is ~2.5x faster on CPU but rounds differently, and a trained SAE follows its
    # rounding: the example's measured figures were made with this form.)
    along = torch.einsum("md,md->m", W_dec.grad, W_dec) / torch.einsum("md,md->m", W_dec, W_dec).clamp_min(1e-16)
    W_dec.grad.addcmul_(W_dec, along.unsqueeze(-1), value=-1.0)


@torch.no_grad()
def fold_input_scale(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """Fold an input scale s into the weights, in place.

    The SAE was trained on s·z. Afterwards sae(z) gives the same latents as before on s·z
    and reconstructs z itself:  W_enc ← s·W_enc, b_dec ← b_dec/s, W_dec ← W_dec/s.
    """
    s = float(scale)
    sae.W_enc.mul_(s)
    sae.b_dec.div_(s)
    sae.W_dec.div_(s)
    return sae
