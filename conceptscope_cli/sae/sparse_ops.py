"""Sparse kernels for TopK SAEs on CPU/GPU.

A dense TopK step spends most of its time in matmuls whose operands are almost all
zero: the decoder product f W_dec, and in the backward pass grad_f = g W_decᵀ,
grad_W_dec = fᵀ g, grad_W_enc = xᵀ grad_pre and grad_x = grad_pre W_encᵀ. With only
k of m latents active per token all of those can be done on (indices, values):

* `TopKEncode`  forward: the dense encoder matmul (unavoidable) + topk;
                backward: touches only the selected columns of W_enc.
* `SparseDecode` forward: `embedding_bag` over decoder rows weighted by the values;
                 backward: gathers only the selected rows of W_dec.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F


def _transposed_csr(indices: torch.Tensor, weights: torch.Tensor, n_latents: int) -> torch.Tensor:
    """CSR matrix Sᵀ of shape (m, B) where S (B, m) has `weights[b, j]` at column `indices[b, j]`.

    indices, weights: (B, K).
    """
    batch, per_row = indices.shape
    columns = indices.reshape(-1)
    order = torch.argsort(columns, stable=True)
    token_of_entry = torch.arange(batch, device=indices.device).repeat_interleave(per_row)
    counts = torch.bincount(columns, minlength=n_latents)
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
    crow[1:] = counts.cumsum(0)
    with warnings.catch_warnings():  # CSR @ dense is all we need; silence the "beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, token_of_entry[order], weights.reshape(-1)[order],
                                       size=(n_latents, batch), check_invariants=False)


def sparse_transpose_matmul(indices: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor,
                            n_latents: int) -> torch.Tensor:
    """Sᵀ @ dense for the sparse S (B, m) given by (indices, weights) (B, K); dense (B, d) -> (m, d)."""
    if dense.device.type == "cuda":
        # index_add_ is fast and deterministic enough on GPU; avoids cuSPARSE setup costs.
        out = torch.zeros(n_latents, dense.shape[1], dtype=dense.dtype, device=dense.device)
        rows = (weights.unsqueeze(-1) * dense.unsqueeze(1)).reshape(-1, dense.shape[1])
        return out.index_add_(0, indices.reshape(-1), rows)
    return _transposed_csr(indices, weights.to(dense.dtype), n_latents) @ dense


def gather_row_dots(indices: torch.Tensor, table: torch.Tensor, vectors: torch.Tensor,
                    chunk: int = 512) -> torch.Tensor:
    """out[b, j] = table[indices[b, j]] · vectors[b].

    indices (B, K), table (m, d), vectors (B, d) -> (B, K). Chunked over B so the gathered
    (chunk, K, d) block stays small.
    """
    batch, per_row = indices.shape
    out = torch.empty(batch, per_row, dtype=vectors.dtype, device=vectors.device)
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        rows = table[indices[start:stop]]  # (c, K, d)
        out[start:stop] = torch.bmm(rows, vectors[start:stop].unsqueeze(-1)).squeeze(-1)
    return out


class TopKEncode(torch.autograd.Function):
    """Dense encoder matmul + per-token topk, with a sparse backward.

    Inputs: x (B, d) raw activations, b_dec (d,), W_enc (d, m), b_enc (m,), k,
    optional extra_indices_fn producing more indices (e.g. AuxK) from the detached
    pre-activations. Returns (indices (B, K'), values (B, K')) with values = ReLU(pre) at
    those indices; K' = k + extra.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                k: int, aux_mask: Optional[torch.Tensor], aux_k: int):  # type: ignore[override]
        centred = x - b_dec
        pre = torch.addmm(b_enc, centred, W_enc)  # (B, m)
        top_values, top_indices = pre.topk(k, dim=-1, sorted=False)
        if aux_mask is not None and aux_k > 0:
            masked = pre.masked_fill(~aux_mask, float("-inf"))
            aux_values, aux_indices = masked.topk(aux_k, dim=-1, sorted=False)
            top_values = torch.cat([top_values, aux_values], dim=-1)
            top_indices = torch.cat([top_indices, aux_indices], dim=-1)
        values = top_values.clamp_min(0.0)
        ctx.save_for_backward(centred, W_enc, top_indices, values)
        ctx.mark_non_differentiable(top_indices)
        return top_indices, values

    @staticmethod
    def backward(ctx, _grad_indices, grad_values):  # type: ignore[override]
        centred, W_enc, indices, values = ctx.saved_tensors
        n_latents = W_enc.shape[1]
        grad_pre = grad_values * (values > 0).to(grad_values.dtype)  # ReLU mask, (B, K)
        grad_x = grad_b_dec = grad_W_enc = grad_b_enc = None
        # d pre / d b_enc summed over tokens: per-latent sum of grad_pre.
        grad_b_enc_full = torch.zeros(n_latents, dtype=grad_pre.dtype, device=grad_pre.device)
        grad_b_enc_full.index_add_(0, indices.reshape(-1), grad_pre.reshape(-1))
        if ctx.needs_input_grad[3]:
            grad_b_enc = grad_b_enc_full
        if ctx.needs_input_grad[2]:
            grad_W_enc = sparse_transpose_matmul(indices, grad_pre, centred, n_latents).t()
        if ctx.needs_input_grad[1]:
            # centred = x - b_dec, so grad_b_dec = -sum_b grad_pre_b W_encᵀ = -W_enc @ grad_b_enc.
            grad_b_dec = -(W_enc @ grad_b_enc_full)
        if ctx.needs_input_grad[0]:
            grad_x = gather_row_dots_transposed(indices, grad_pre, W_enc)
        return grad_x, grad_b_dec, grad_W_enc, grad_b_enc, None, None, None


def gather_row_dots_transposed(indices: torch.Tensor, weights: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """sum_j weights[b, j] * W_enc[:, indices[b, j]] -> (B, d)."""
    return F.embedding_bag(indices, W_enc.t().contiguous(), per_sample_weights=weights, mode="sum")


class SparseDecode(torch.autograd.Function):
    """ẑ = Σ_j values[b, j] W_dec[indices[b, j]] + b_dec with a sparse backward.

    indices, values (B, K); W_dec (m, d); b_dec (d,) -> (B, d).
    """

    @staticmethod
    def forward(ctx, indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor,
                b_dec: torch.Tensor):  # type: ignore[override]
        out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
        ctx.save_for_backward(indices, values, W_dec)
        return out + b_dec

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        indices, values, W_dec = ctx.saved_tensors
        grad_values = grad_W_dec = grad_b_dec = None
        if ctx.needs_input_grad[1]:
            grad_values = gather_row_dots(indices, W_dec, grad_out)
        if ctx.needs_input_grad[2]:
            grad_W_dec = sparse_transpose_matmul(indices, values, grad_out, W_dec.shape[0])
        if ctx.needs_input_grad[3]:
            grad_b_dec = grad_out.sum(0)
        return None, grad_values, grad_W_dec, grad_b_dec


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode (B, K) indices/values with W_dec (m, d) (+ b_dec when given) -> (B, d)."""
    bias = b_dec if b_dec is not None else torch.zeros(W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    return SparseDecode.apply(indices, values, W_dec, bias)
