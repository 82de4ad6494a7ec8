"""Sparse kernels for TopK and BatchTopK SAEs on CPU/GPU.

A dense TopK step spends most of its time in matmuls whose operands are almost all
zero: the decoder product f W_dec, and in the backward pass grad_f = g W_decᵀ,
grad_W_dec = fᵀ g, grad_W_enc = xᵀ grad_pre and grad_x = grad_pre W_encᵀ. With only a
few of m latents active per token all of those can be done on the active entries alone.
TopK keeps k per token, BatchTopK k·B across the batch (a variable number per token), and
AuxK the top dead latents per token: all three are a sparse set of (token, latent) entries,
held here as a `SparseRows` pattern (token-major COO with bag offsets) plus their values.

* `SparseEncode`  forward: the dense encoder matmul (unavoidable) + the selection;
                  backward: touches only the selected columns of W_enc.
* `SparseDecode`  forward: `embedding_bag` over decoder rows weighted by the values;
                  backward: gathers only the selected rows of W_dec.

Entries whose value is 0 (ReLU of a non-positive pre-activation) are dropped at selection:
they add nothing to the reconstruction and their ReLU gradient is 0, so the forward values
and all gradients equal the dense path's (up to float summation order).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

Selection = Literal["topk", "batchtopk"]


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # CSR @ dense is all we need; silence the "beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def stable_argsort(keys: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
    """torch.sort(keys, stable=True).indices, on one thread on CPU: ATen's parallel sort costs a
    fixed ~120-150 ms per call with 2 intra-op threads on our shared 2-core machine (measured at a
    load average of ~7: 131,072 int32 keys 2.6 ms on one thread, 143 ms on two; 2,097,152: 117 vs
    208 ms), more than the rest of the selection. A sort's result does not depend on its threads."""
    if keys.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.sort(keys, stable=True).indices
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.sort(keys, stable=True).indices
    finally:
        torch.set_num_threads(threads)


class SparseRows:
    """The (token, latent) pattern of a sparse S (B, m): entries grouped by token (rows sorted).

    rows, cols (nnz,) int64; offsets (B,) start of each token's entries (an `embedding_bag`
    bag; empty bags are allowed). The latent-major form (the structure of Sᵀ in CSR) needs a
    sort, so it is built once on first use and shared by every product of a step (the encoder
    and decoder backward passes see the same pattern).
    """

    def __init__(self, rows: Int[Tensor, " nnz"], cols: Int[Tensor, " nnz"], n_rows: int, n_cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        counts = torch.bincount(rows, minlength=self.n_rows)
        self.offsets = torch.zeros(self.n_rows, dtype=torch.int64, device=rows.device)
        if self.n_rows > 1:
            self.offsets[1:] = counts.cumsum(0)[:-1]
        self._latent_major: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @classmethod
    def from_indices(cls, indices: Int[Tensor, "B K"], n_cols: int) -> SparseRows:
        """Fixed K entries per token: indices (B, K) -> pattern of B·K entries."""
        batch, per_row = indices.shape
        rows = torch.arange(batch, device=indices.device).repeat_interleave(per_row)
        return cls(rows, indices.reshape(-1), batch, n_cols)

    @property
    def nnz(self) -> int:
        return int(self.cols.numel())

    def select(self, keep: Bool[Tensor, " nnz"]) -> SparseRows:
        """The entries where keep (nnz,) is true (token order is preserved)."""
        return SparseRows(self.rows[keep], self.cols[keep], self.n_rows, self.n_cols)

    def _build(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._latent_major is None:
            # int32 keys sort ~2-3x faster than int64 on CPU; stable keeps tokens in order per latent.
            keys = self.cols.to(torch.int32) if self.n_cols < 2**31 else self.cols
            order = stable_argsort(keys)
            crow = torch.zeros(self.n_cols + 1, dtype=torch.int64, device=self.cols.device)
            crow[1:] = torch.bincount(self.cols, minlength=self.n_cols).cumsum(0)
            self._latent_major = (order, crow, self.rows[order])
        return self._latent_major

    def transpose_matmul(self, weights: Float[Tensor, " nnz"], dense: Float[Tensor, "B d"]) -> Float[Tensor, "m d"]:
        """Sᵀ @ dense where S holds weights (nnz,) at the pattern; dense (B, d) -> (m, d).

        Row l of the result is Σ over latent l's entries of weight · dense[token]: one
        `embedding_bag` over the latent-major pattern (bags = latents, the (B, d) operand as
        the table). A CSR @ dense product computes the same sums but zero-fills and copies its
        (m, d) output on CPU, which cost as much as the products themselves."""
        order, crow, tokens = self._build()
        return F.embedding_bag(tokens, dense, crow[:-1], mode="sum", per_sample_weights=weights[order].to(dense.dtype))

    def row_dots(self, table: Float[Tensor, "m d"], vectors: Float[Tensor, "B d"]) -> Float[Tensor, " nnz"]:
        """out[e] = table[cols[e]] · vectors[rows[e]]; table (m, d), vectors (B, d) -> (nnz,).

        A sampled product evaluated in latent-major order so the (m, d) table is used as stored
        (no transposed copy, no (nnz, d) gather); results are scattered back to token order."""
        order, crow, tokens = self._build()
        ones = torch.ones(self.nnz, dtype=vectors.dtype, device=vectors.device)
        pattern = _csr(crow, tokens, ones, (self.n_cols, self.n_rows))
        sampled = torch.sparse.sampled_addmm(pattern, table.to(vectors.dtype), vectors.t(), beta=0.0).values()
        out = torch.empty(self.nnz, dtype=vectors.dtype, device=vectors.device)
        out[order] = sampled
        return out

    def weighted_row_sum(self, weights: Float[Tensor, " nnz"], table: Float[Tensor, "m d"]) -> Float[Tensor, "B d"]:
        """S @ table: out[b] = Σ_e∈b weights[e] table[cols[e]]; table (m, d) -> (B, d)."""
        return F.embedding_bag(self.cols, table, self.offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


def select_topk(pre: Float[Tensor, "B m"], k: int
                ) -> tuple[Int[Tensor, " nnz"], Int[Tensor, " nnz"], Float[Tensor, " nnz"]]:
    """The k largest entries of every row of pre (B, m) -> (rows, cols, values), each (B·k,)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, indices.reshape(-1), values.reshape(-1)


def select_batch_topk(pre: Float[Tensor, "B m"], k: int, first_width: Optional[int] = None
                      ) -> tuple[Int[Tensor, " nnz"], Int[Tensor, " nnz"], Float[Tensor, " nnz"]]:
    """The n = min(k·B, B·m) largest entries of pre (B, m) across the whole batch, exactly.

    A flat topk over all B·m entries costs ~6x a per-row topk of k on CPU. Instead every row
    offers its top w candidates (w = 2k first); τ is the n-th largest candidate. A row whose
    w-th candidate is still ≥ τ may hold more entries above τ, so only such rows offer more
    (w ×8, up to the whole row) and τ is recomputed. Once no row is in doubt, every entry
    above τ is a candidate, so the candidates' top n are the batch's top n: every candidate
    above τ, and of those equal to τ the first ones up to n (ties at τ are broken arbitrarily,
    as by a flat topk). Returns (rows sorted, cols, values).
    """
    batch, m = pre.shape
    n_keep = min(k * batch, batch * m)
    width = min(m, first_width or 2 * k)
    done_rows: list[torch.Tensor] = []
    done_cols: list[torch.Tensor] = []
    done_vals: list[torch.Tensor] = []
    pending = torch.arange(batch, device=pre.device)
    while True:
        values, cols = pre[pending].topk(width, dim=-1, sorted=False) if pending.numel() < batch else \
            pre.topk(width, dim=-1, sorted=False)
        all_vals = torch.cat(done_vals + [values.reshape(-1)]) if done_vals else values.reshape(-1)
        threshold = all_vals.topk(n_keep, sorted=False).values.min()  # τ, the n-th largest candidate
        in_doubt = (values.min(dim=-1).values >= threshold) if width < m else torch.zeros_like(pending, dtype=torch.bool)
        if not bool(in_doubt.any()):
            done_rows.append(pending.repeat_interleave(width))
            done_cols.append(cols.reshape(-1))
            done_vals.append(values.reshape(-1))
            break
        settled = ~in_doubt
        done_rows.append(pending[settled].repeat_interleave(width))
        done_cols.append(cols[settled].reshape(-1))
        done_vals.append(values[settled].reshape(-1))
        pending, width = pending[in_doubt], min(m, width * 8)
    single = len(done_rows) == 1  # one pass: the candidates are already in token order
    rows, cols, vals = (done_rows[0], done_cols[0], done_vals[0]) if single else \
        (torch.cat(done_rows), torch.cat(done_cols), torch.cat(done_vals))
    above = vals > threshold
    ties = (vals == threshold).nonzero().squeeze(-1)[: n_keep - int(above.sum())]
    above[ties] = True
    chosen = above.nonzero().squeeze(-1)  # ascending candidate order
    if not single:
        chosen = chosen[stable_argsort(rows[chosen].to(torch.int32))]  # token-major for embedding_bag
    return rows[chosen], cols[chosen], vals[chosen]


# AuxK entries are held as a dense (B, n_dead) block over the dead latents, instead of a sparse
# pattern, once at least 1 in AUX_BLOCK_DENSITY of the block is kept: dense matmuls on the block
# run ~15x more multiply-adds per second than the gathers of the sparse kernels and need no
# latent-major sort. Measured on CPU (`benchmarks/train.py --only topk:ours --dead-fraction F
# --aux-form pattern|block`: d 768, m 24,576, 4,096 tokens, aux_k 512, load ~6; CPU s per step,
# block vs pattern): 3.6-3.7 vs 5.5-5.6 with 4,915 dead latents (10% kept), 5.7-7.0 vs 4.3-4.6
# with 12,288 (4%); the costs cross near 5-6%.
AUX_BLOCK_DENSITY = 16


class DeadBlock:
    """AuxK entries as a dense block: `latents` (n_dead,) the dead latent ids, the block's
    values (B, n_dead) held beside it (zero outside each token's kept top aux_k)."""

    def __init__(self, latents: Int[Tensor, " n_dead"], n_rows: int) -> None:
        self.latents, self.n_rows = latents, int(n_rows)


class SparseEncode(torch.autograd.Function):
    """Dense encoder matmul + a sparse selection of ReLU(pre), with a sparse backward.

    Inputs: x (B, d) activations, b_dec (d,), W_enc (d, m), b_enc (m,), k, selection
    ("topk": k per token; "batchtopk": k·B across the batch), aux_latents (n_dead,) candidate
    ids for AuxK or None, aux_k, and `out`, a dict that receives the patterns ("active":
    `SparseRows`; "aux": `SparseRows`, or a `DeadBlock` when dense enough, see
    AUX_BLOCK_DENSITY). Returns (values (nnz,), aux_values (nnz_aux,) or, for a `DeadBlock`,
    (B, n_dead) with zeros outside the kept entries), the kept entries all positive.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                k: int, selection: Selection, aux_latents: Optional[torch.Tensor], aux_k: int,
                out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        centred = x - b_dec
        pre = torch.addmm(b_enc, centred, W_enc)  # (B, m)
        batch, m = pre.shape
        if selection == "topk":
            rows, cols, raw = select_topk(pre, k)
        else:
            rows, cols, raw = select_batch_topk(pre, k)
        values = raw.float()  # float32 even when the matmul ran under bf16 autocast
        keep = values > 0
        active = SparseRows(rows[keep], cols[keep], batch, m)
        values = values[keep]
        aux: SparseRows | DeadBlock
        ctx.aux_mask = None
        if aux_latents is not None and aux_k > 0:
            # index_select copies the dead columns ~2x faster than advanced indexing on CPU.
            dead_pre = pre.index_select(1, aux_latents)  # (B, n_dead)
            aux_raw, aux_idx = dead_pre.topk(aux_k, dim=-1, sorted=False)
            aux_vals = aux_raw.float()
            aux_keep = aux_vals > 0
            if int(aux_keep.sum()) * AUX_BLOCK_DENSITY >= dead_pre.numel():
                aux = DeadBlock(aux_latents, batch)
                aux_vals = torch.zeros(dead_pre.shape, dtype=torch.float32, device=pre.device).scatter_(
                    1, aux_idx, aux_vals.clamp_min(0.0))
                ctx.aux_mask = aux_vals > 0  # the kept entries: the only ones ReLU passes a gradient to
            else:
                aux = SparseRows.from_indices(aux_latents[aux_idx], m).select(aux_keep.reshape(-1))
                aux_vals = aux_vals.reshape(-1)[aux_keep.reshape(-1)]
        else:
            aux = SparseRows(rows[:0], cols[:0], batch, m)
            aux_vals = values[:0]
        out["active"], out["aux"] = active, aux
        ctx.active, ctx.aux = active, aux
        ctx.save_for_backward(centred, W_enc)
        return values, aux_vals

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor, grad_aux: Optional[torch.Tensor]) -> tuple:
        centred, W_enc = ctx.saved_tensors
        m = W_enc.shape[1]
        # Every kept entry is positive, so the ReLU/clamp mask is 1 and grad_pre = grad_values.
        parts = [(ctx.active, grad_values)]
        block = None  # (dead latent ids, grad_pre on the dead block (B, n_dead)) for a DeadBlock
        if isinstance(ctx.aux, DeadBlock):
            if grad_aux is not None:
                block = (ctx.aux.latents, grad_aux * ctx.aux_mask)
        elif ctx.aux.nnz > 0 and grad_aux is not None:
            parts.append((ctx.aux, grad_aux))
        grad_x = grad_b_dec = grad_W_enc = grad_b_enc = None
        grad_b_enc_full = torch.zeros(m, dtype=grad_values.dtype, device=grad_values.device)
        for pattern, grad in parts:
            grad_b_enc_full.index_add_(0, pattern.cols, grad)
        if block is not None:
            grad_b_enc_full.index_add_(0, block[0], block[1].sum(0))
        if ctx.needs_input_grad[3]:
            grad_b_enc = grad_b_enc_full
        if ctx.needs_input_grad[2]:
            rows_of_grad = sum(pattern.transpose_matmul(grad, centred) for pattern, grad in parts)
            if block is not None:  # (n_dead, d) rows of the dead latents, one dense matmul
                rows_of_grad.index_add_(0, block[0], block[1].t() @ centred.to(block[1].dtype))
            grad_W_enc = rows_of_grad.t()  # (m, d) per-latent rows: the latent-major layout of W_enc
        if ctx.needs_input_grad[1]:
            # centred = x - b_dec, so grad_b_dec = -sum_b grad_pre_b W_encᵀ = -W_enc @ grad_b_enc.
            grad_b_dec = -(W_enc @ grad_b_enc_full)
        if ctx.needs_input_grad[0]:
            table = W_enc.t()  # (m, d), contiguous in our layout
            grad_x = sum(pattern.weighted_row_sum(grad, table) for pattern, grad in parts)
            if block is not None:
                grad_x = grad_x + block[1] @ table.index_select(0, block[0]).to(block[1].dtype)
        return grad_x, grad_b_dec, grad_W_enc, grad_b_enc, None, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """ẑ = S W_dec + b_dec with S (B, m) given by a `SparseRows` pattern and its values (nnz,);
    W_dec (m, d); b_dec (d,) -> (B, d). Sparse backward."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                pattern: SparseRows) -> torch.Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        return pattern.weighted_row_sum(values, W_dec) + b_dec

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        values, W_dec = ctx.saved_tensors
        pattern: SparseRows = ctx.pattern
        grad_values = grad_W_dec = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = pattern.row_dots(W_dec, grad_out)
        if ctx.needs_input_grad[1]:
            grad_W_dec = pattern.transpose_matmul(values, grad_out)
        if ctx.needs_input_grad[2]:
            grad_b_dec = grad_out.sum(0)
        return grad_values, grad_W_dec, grad_b_dec, None


def sparse_decode(pattern: SparseRows, values: Float[Tensor, " nnz"], W_dec: Float[Tensor, "m d"],
                  b_dec: Optional[Float[Tensor, " d"]] = None) -> Float[Tensor, "B d"]:
    """Decode the entries of pattern with values (nnz,) through W_dec (m, d) (+ b_dec when given) -> (B, d)."""
    bias = b_dec if b_dec is not None else torch.zeros(W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    return SparseDecode.apply(values, W_dec, bias, pattern)
