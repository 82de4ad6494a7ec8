"""Losses, b_dec initialisation and streaming metrics against direct computations."""

import math

import torch

from conceptscope_cli.sae.init import estimate_input_scale, geometric_median, initial_b_dec
from conceptscope_cli.sae.losses import auxk_loss, ghost_grad_loss, l1_loss, reconstruction_loss
from conceptscope_cli.sae.metrics import FiringTracker, ReconstructionMetrics, firing_fractions
from conceptscope_cli.sae.sparse_ops import SparseRows

torch.set_num_threads(1)


def test_reconstruction_losses_by_hand():
    target = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    recon = torch.tensor([[3.0, 2.0], [1.0, 1.0]])  # squared errors [0, 4], [1, 0]
    assert math.isclose(float(reconstruction_loss(recon, target, "none")), 5.0 / 4)
    # reference: (0 + 4)/5 and (1 + 0)/1 → mean over 4 entries = (0.8 + 1) / 4
    assert math.isclose(float(reconstruction_loss(recon, target, "reference")), 1.8 / 4, rel_tol=1e-6)
    assert math.isclose(float(l1_loss(torch.tensor([[1.0, -2.0], [0.0, 3.0]]))), 3.0)


def _direct_ghost(target, recon, pre, W_dec, dead, mse):
    """Token-by-token transcription of REFERENCE §2."""
    terms = []
    for b in range(target.shape[0]):
        r = (target[b] - recon[b]).detach()
        g = torch.zeros_like(r)
        for j in torch.nonzero(dead).flatten().tolist():
            g = g + torch.exp(pre[b, j]) * W_dec[j]
        g = g * (r.norm() / (2 * g.norm() + 1e-6)).detach()
        terms.append(((g - r) ** 2 / r.norm()))
    raw = torch.stack(terms).mean()
    return raw * (mse / (raw + 1e-6)).detach()


def test_ghost_grad_loss_matches_direct_computation():
    torch.manual_seed(0)
    target = torch.randn(6, 5)
    recon = torch.randn(6, 5, requires_grad=True)
    pre = torch.randn(6, 7, requires_grad=True)
    W_dec = torch.randn(7, 5, requires_grad=True)
    dead = torch.tensor([True, False, True, False, False, True, False])
    mse = reconstruction_loss(recon, target, "reference")
    ours = ghost_grad_loss(target, recon, pre, W_dec, dead, mse)
    grads_ours = torch.autograd.grad(ours, (pre, W_dec))
    direct = _direct_ghost(target, recon, pre, W_dec, dead, mse)
    grads_direct = torch.autograd.grad(direct, (pre, W_dec))
    assert torch.allclose(ours, direct, atol=1e-6)
    for a, b in zip(grads_ours, grads_direct):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.all(grads_ours[0][:, ~dead] == 0)  # only dead latents learn from it
    # r is detached: no gradient reaches the reconstruction through the ghost term
    assert torch.autograd.grad(ghost_grad_loss(target, recon, pre, W_dec, dead, mse.detach()), recon,
                               allow_unused=True)[0] is None
    assert float(ghost_grad_loss(target, recon, pre, W_dec, torch.zeros(7, dtype=torch.bool), mse)) == 0.0


def test_auxk_loss_by_hand():
    W_dec = torch.eye(3)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    recon = torch.zeros(2, 3)
    # residual e = target; ê picks row 1 of W_dec (=e_1) with value 2 for token 1, nothing useful for token 0
    indices = SparseRows.from_indices(torch.tensor([[2], [1]]), 3)
    values = torch.tensor([0.0, 2.0])
    # ‖e − ê‖² = 1 (token 0) + 0; variance about the mean: mean e = [0.5, 1, 0] → 0.25+1 + 0.25+1 = 2.5
    loss = auxk_loss(target, recon, indices, values, W_dec, n_dead=4, aux_k_requested=2)
    assert math.isclose(float(loss), 1.0 / 2.5, rel_tol=1e-6)
    half = auxk_loss(target, recon, indices, values, W_dec, n_dead=1, aux_k_requested=2)
    assert math.isclose(float(half), 0.5 / 2.5, rel_tol=1e-6)


def test_geometric_median_matches_brute_force_minimiser():
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(40, 2, generator=generator), torch.randn(5, 2, generator=generator) * 20 + 50])
    median = geometric_median(points)

    def objective(y):
        return (points.double() - y).norm(dim=-1).sum()

    # brute force: fine grid around the coordinate-wise median, then refine with gradient descent
    centre = points.median(0).values.double()
    axis = torch.linspace(-2, 2, 201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2) + centre
    values = (points.double()[None] - grid[:, None]).norm(dim=-1).sum(-1)
    best = grid[values.argmin()].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([best], lr=1e-3)
    for _ in range(1500):
        optimizer.zero_grad()
        objective(best).backward()
        optimizer.step()
    assert float(objective(median.double())) <= float(objective(best.detach())) + 1e-6
    assert torch.allclose(median.double(), best.detach(), atol=5e-3)
    assert not torch.allclose(median, points.mean(0), atol=1.0)  # outliers pull the mean, not the median


def test_b_dec_init_options_and_scale():
    sample = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.equal(initial_b_dec(sample, "zeros"), torch.zeros(2))
    assert torch.allclose(initial_b_dec(sample, "mean"), torch.tensor([2.0, 4.0]))
    s = estimate_input_scale(sample)  # mean ‖z‖² = (5 + 45)/2 = 25 → s = 1/5
    assert math.isclose(s, 0.2, rel_tol=1e-9)


def test_reconstruction_metrics_streaming_fvu():
    torch.manual_seed(0)
    z = torch.randn(100, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 10.0  # large mean: SST must be centred
    recon = z + 0.1 * torch.randn(100, 4)
    streaming = ReconstructionMetrics(4)
    for start in range(0, 100, 30):
        streaming.update(z[start:start + 30], recon[start:start + 30], torch.full((len(z[start:start + 30]),), 3.0))
    sse = ((recon - z) ** 2).double().sum()
    sst = ((z - z.mean(0)) ** 2).double().sum()
    assert math.isclose(streaming.fvu(), float(sse / sst), rel_tol=1e-6)
    assert math.isclose(streaming.mse(), float(sse / 400), rel_tol=1e-6)
    assert streaming.l0() == 3.0
    perfect = ReconstructionMetrics(4)
    perfect.update(z, z)
    assert perfect.fvu() == 0.0
    mean_only = ReconstructionMetrics(4)
    mean_only.update(z, z.mean(0).expand_as(z))
    assert math.isclose(mean_only.fvu(), 1.0, rel_tol=1e-6)


def test_firing_tracker_dead_and_dense():
    tracker = FiringTracker(4, window_tokens=300)
    # latent 0 fires on 50% of tokens, latent 1 on 0.5%, latent 2 only in the first step, latent 3 never
    tracker.update(torch.tensor([50, 0, 1, 0]), 100)
    for _ in range(3):
        tracker.update(torch.tensor([50, 1, 0, 0]), 100)
    assert tracker.dead_mask(2).tolist() == [False, False, True, True]
    assert tracker.dead_mask(3).tolist() == [False, False, False, True]
    # window = 300 tokens: latent 2 silent for 300 tokens, latent 3 for 400 → both dead
    assert tracker.dead_fraction() == 0.5
    # first full window (300 tokens): counts [150, 2, 1, 0] → only latent 0 above 1%
    assert tracker.dense_fraction() == 0.25
    restored = FiringTracker(4, window_tokens=300)
    restored.load_state_tensors(tracker.state_tensors())
    assert restored.dead_fraction() == tracker.dead_fraction() and restored.dense_fraction() == 0.25
    assert firing_fractions(torch.tensor([0, 5, 200, 1]), 1000) == {"dead_fraction": 0.25, "dense_fraction": 0.25}
