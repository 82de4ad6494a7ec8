"""SAE architectures on hand-checkable inputs, decoder constraints, sparse TopK/BatchTopK kernels, scale folding."""

import pytest
import torch

from conceptscope_cli.sae import sparse_ops
from conceptscope_cli.sae.losses import auxk_loss, reconstruction_loss
from conceptscope_cli.sae.model import (
    SparseAutoencoder,
    fold_input_scale,
    normalize_decoder_rows_,
    remove_parallel_grad_,
    update_threshold_,
)
from conceptscope_cli.sae.sparse_ops import select_batch_topk

torch.set_num_threads(1)


def hand_sae(architecture: str, k: int = 1) -> SparseAutoencoder:
    sae = SparseAutoencoder(2, 3, architecture, k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, 1.0]))
    return sae


# token A: z − b_dec = [1, 2] → pre = [1, 2, −1.5];  token B: z − b_dec = [0.5, −2] → pre = [0.5, −2, 2]
Z = torch.tensor([[2.0, 3.0], [1.5, -1.0]])


def test_relu_encode_decode_by_hand():
    sae = hand_sae("relu")
    f = sae.encode(Z)
    assert torch.allclose(f, torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 2.0]]))
    # ẑ = f W_dec + b_dec
    assert torch.allclose(sae.decode(f), torch.tensor([[2.0, 3.0], [3.5, 3.0]]))
    out = sae(Z)
    assert torch.allclose(out.recon, sae.decode(f))
    assert out.fire_counts.tolist() == [2, 1, 1]
    assert float(out.l0) == 2.0


def test_topk_keeps_largest_per_token():
    sae = hand_sae("topk", k=1)
    assert torch.allclose(sae.encode(Z), torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]))
    # all pre-activations negative → the kept one is ReLU'd to zero
    negative = torch.tensor([[1.0 - 5.0, 1.0 - 5.0]])  # z − b_dec = [−5, −5] → pre = [−5, −5, −0.5]
    assert torch.all(sae.encode(negative) == 0)


def test_batchtopk_training_and_threshold_inference():
    sae = hand_sae("batchtopk", k=1).train()
    out = sae(Z)  # keep k·B = 2 largest of {1, 2, 0.5, 2} across the batch → the two 2s
    assert torch.allclose(out.features, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]))
    assert float(out.threshold_observation) == 2.0
    update_threshold_(sae, torch.tensor(0.75), momentum=0.9)  # first observation initialises θ
    assert abs(float(sae.threshold) - 0.75) < 1e-7
    update_threshold_(sae, torch.tensor(1.75), momentum=0.9)
    assert abs(float(sae.threshold) - 0.85) < 1e-6
    sae.eval()  # inference: f = ReLU(pre) · [ReLU(pre) > θ] with θ = 0.85
    assert torch.allclose(sae.encode(Z), torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 2.0]]))


def test_decoder_renorm_and_parallel_grad_removal():
    W = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    normalize_decoder_rows_(W)
    assert torch.allclose(W.data, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    W.grad = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    remove_parallel_grad_(W)
    # row 0: g − (g·w)w = [1,0] − 0.6·[0.6,0.8] = [0.64, −0.48]; row 1: [1,1] − 1·[0,1] = [1, 0]
    assert torch.allclose(W.grad, torch.tensor([[0.64, -0.48], [1.0, 0.0]]), atol=1e-6)
    assert torch.allclose((W.grad * W.data).sum(-1), torch.zeros(2), atol=1e-6)


def test_init_unit_decoder_rows_and_tied_topk_encoder():
    sae = SparseAutoencoder(16, 64, "topk", 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert torch.equal(sae.W_enc.data, sae.W_dec.data.t())
    relu = SparseAutoencoder(16, 64, "relu", generator=torch.Generator().manual_seed(0))
    assert float(relu.W_enc.detach().abs().max()) <= (6 / 64) ** 0.5 + 1e-6


def _grads_of(sae: SparseAutoencoder, z: torch.Tensor, dead: torch.Tensor, aux_k: int) -> tuple:
    """The trainer's loss (reference-normalised MSE + AuxK) and its gradients."""
    sae.zero_grad()
    out = sae(z, dead_mask=dead, aux_k=aux_k)
    loss = reconstruction_loss(out.recon, z)
    if aux_k:
        loss = loss + 0.3 * auxk_loss(z, out.recon, out.aux, out.aux_values, sae.W_dec, int(dead.sum()), aux_k)
    loss.backward()
    return out, loss.detach(), tuple(p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("aux_form", ["pattern", "block"])
def test_sparse_path_matches_dense_loss_and_gradients(architecture, negative, aux_form, monkeypatch):
    """negative: b_enc shifted so that some selected pre-activations are ≤ 0 (dropped by the sparse path).
    aux_form: the AuxK entries as a sparse pattern or as a dense block over the dead latents."""
    monkeypatch.setattr(sparse_ops, "AUX_BLOCK_DENSITY", 0 if aux_form == "pattern" else 10**9)
    shift = (-2.5 if architecture == "topk" else -5.0) if negative else 0.0
    torch.manual_seed(0)
    dense = SparseAutoencoder(24, 96, architecture, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense.b_dec.normal_()
        dense.b_enc.normal_(std=0.3).add_(shift)
    sparse = SparseAutoencoder(24, 96, architecture, 5, sparse_kernels=True)
    sparse.load_state_dict(dense.state_dict())
    # Uneven token norms: under BatchTopK some tokens keep many more than k latents, others none.
    z = torch.randn(40, 24) * torch.linspace(0.2, 3.0, 40).unsqueeze(-1)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    for aux_k in (0, 7):
        out_dense, loss_dense, grads_dense = _grads_of(dense, z, dead, aux_k)
        out_sparse, loss_sparse, grads_sparse = _grads_of(sparse, z, dead, aux_k)
        assert out_sparse.features is None and out_sparse.active is not None  # really the sparse path
        if aux_k:  # and really the AuxK form asked for
            assert isinstance(out_sparse.aux, sparse_ops.DeadBlock if aux_form == "block" else sparse_ops.SparseRows)
        assert torch.allclose(out_dense.recon, out_sparse.recon, atol=1e-5)
        assert torch.allclose(loss_dense, loss_sparse, rtol=1e-5, atol=1e-7)
        assert torch.equal(out_dense.fire_counts, out_sparse.fire_counts)
        assert float(out_dense.l0) == pytest.approx(float(out_sparse.l0))
        if negative:  # the case is real: some selected entries were non-positive
            assert int(out_sparse.fire_counts.sum()) < 5 * 40
        if architecture == "batchtopk":
            assert float(out_dense.threshold_observation) == pytest.approx(float(out_sparse.threshold_observation))
            kept = torch.bincount(out_sparse.active.rows, minlength=40)
            if not negative:
                assert int(kept.sum()) == 5 * 40  # k·B kept across the batch (all positive here) ...
                assert int(kept.max()) > 2 * 5  # ... unevenly: a token holds more than the first 2k candidates
        for g_dense, g_sparse in zip(grads_dense, grads_sparse):
            assert torch.allclose(g_dense, g_sparse, atol=1e-5, rtol=1e-4)


def test_batch_topk_selection_is_the_flat_topk():
    generator = torch.Generator().manual_seed(3)
    pre = torch.randn(64, 300, generator=generator)
    pre[:3] += 4.0  # three rows hold most of the batch's top entries: the candidate rounds must widen
    for k in (1, 4, 20):
        rows, cols, values = select_batch_topk(pre, k)
        expected = pre.reshape(-1).topk(k * 64).indices
        assert torch.equal(torch.sort(rows * 300 + cols).values, torch.sort(expected).values)
        assert torch.equal(values, pre[rows, cols])
        assert bool((rows[1:] >= rows[:-1]).all())  # token-major, as embedding_bag offsets need


def test_batch_topk_selection_breaks_ties_at_the_threshold_to_exactly_k_b():
    # Values on a coarse grid: many entries equal the k·B-th largest, τ > 0; exactly k·B are
    # kept, every one above τ and enough of those at τ, as a flat topk would keep.
    pre = torch.randint(0, 6, (32, 50), generator=torch.Generator().manual_seed(5)).float()
    for k in (3, 7):
        rows, cols, values = select_batch_topk(pre, k)
        flat = pre.reshape(-1).topk(k * 32).values
        assert len(rows) == k * 32 and float(flat.min()) > 0 and int((pre == flat.min()).sum()) > 1
        assert torch.equal(torch.sort(values).values, torch.sort(flat).values)
        assert torch.equal(values, pre[rows, cols])
        assert len(torch.unique(rows * 50 + cols)) == len(rows)  # no entry twice
        assert bool((rows[1:] >= rows[:-1]).all())


def test_folded_scale_on_raw_inputs_equals_scaled_inputs():
    torch.manual_seed(0)
    for architecture in ("relu", "topk", "batchtopk"):
        sae = SparseAutoencoder(8, 32, architecture, 4, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_(std=0.1)
            sae.threshold.fill_(0.05)
        sae.eval()
        z = torch.randn(10, 8) * 7.0
        s = 0.137
        f_scaled = sae.encode(z * s)
        recon_scaled = sae.decode(f_scaled)
        fold_input_scale(sae, s)
        f_raw = sae.encode(z)
        assert torch.allclose(f_raw, f_scaled, atol=1e-5)
        assert torch.allclose(sae.decode(f_raw), recon_scaled / s, atol=1e-4)
