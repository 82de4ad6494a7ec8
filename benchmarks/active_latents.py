"""How many latents an image-level latent vector holds: n = |union over an image's T tokens of
each token's top-k latents|, measured on the models here, against the tokens per image and k.

    python benchmarks/active_latents.py [--ks 8 16 32 64] [--expansion 32] [--steps 200]

The sparse latents cost (2 + 4)·n + 24 bytes per image (uint16 ids + float32 values; see
conceptscope_cli/FORMATS.md), so n decides the disk of `cscope dict` at scale. n lies between k
(every token fires the same latents) and min(m, T·k) (no two tokens share one). This script
trains one TopK SAE per k (seeded, `training_step`, expansion `--expansion`) on the embedded
example's block-L tokens (tiny CLIP: d = 128, 64 patches + CLS, 1,200 images of shapes on
backgrounds), then for T = 1, 2, 4, ..., all tokens averages n over the images (T tokens drawn
at random per image, seeded) and prints n, n/k and the sharing n/(T·k). Its last lines fit
n ∝ T^b over T >= 16 per k and apply it to ViT-L/14 (T = 257, k = 64, m = 32,768)
under the stated assumption that the sharing exponent b carries over; the bound min(m, T·k)
is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def example_tokens(work: Path) -> np.ndarray:
    """(N, T, d) float32 block-L tokens of the embedded example's train split (every token)."""
    from conceptscope_cli.extract.activations import extract_activations
    from conceptscope_cli.extract.store import ActivationReader
    from conceptscope_cli.pipeline.init import init_project
    from conceptscope_cli.project import Project

    init_project(work / "demo", example=True)
    project = Project.open(work / "demo")
    entry = extract_activations(project, None, "train").entry
    reader = ActivationReader(entry.path)
    return np.concatenate([acts for acts, _, _ in reader.iter_chunks(256)]).astype(np.float32)


def train_topk(tokens: torch.Tensor, m: int, k: int, steps: int, batch: int, seed: int):  # noqa: ANN201
    from conceptscope_cli.config.sections import SAEConfig
    from conceptscope_cli.sae.metrics import FiringTracker
    from conceptscope_cli.sae.model import SparseAutoencoder
    from conceptscope_cli.sae.trainer import make_optimizer, training_step

    cfg = SAEConfig(architecture="topk", d_sae=m, k=k)
    sae = SparseAutoencoder(tokens.shape[1], m, "topk", k, sparse_kernels=cfg.uses_sparse_kernels(),
                            generator=torch.Generator().manual_seed(seed))
    optimizer = make_optimizer(sae, cfg, torch.device("cpu"))
    tracker = FiringTracker(m, cfg.dead_metric_tokens)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = tokens[torch.randint(len(tokens), (batch,), generator=generator)]
        training_step(sae, sae, optimizer, tracker, x, cfg, lr=cfg.lr)
    return sae.eval()


@torch.no_grad()
def union_sizes(sae, acts: np.ndarray, sizes: list[int], seed: int) -> dict[int, float]:  # noqa: ANN001
    """Mean over images of |union of the active latents of T randomly chosen tokens|, per T."""
    n, t, d = acts.shape
    active = (sae.encode(torch.from_numpy(acts.reshape(-1, d))) > 0).reshape(n, t, -1)  # (N, T, m)
    rng = np.random.default_rng(seed)
    out = {}
    for size in sizes:
        picks = np.argsort(rng.random((n, t)), axis=1)[:, :size]  # T distinct tokens per image
        chosen = torch.gather(active, 1, torch.from_numpy(picks)[..., None].expand(-1, -1, active.shape[-1]))
        out[size] = float(chosen.any(1).sum(1).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="cscope-bench-active-"))
    acts = example_tokens(work)
    n_images, n_tokens, d = acts.shape
    flat = torch.from_numpy(acts.reshape(-1, d))
    flat = flat / flat.norm(dim=-1).mean() * d ** 0.5  # saev's input scaling: mean norm sqrt(d)
    acts = flat.numpy().reshape(n_images, n_tokens, d)
    m = d * args.expansion
    sizes = sorted({1, 2, 4, 8, 16, 32, n_tokens} | {s for s in (64,) if s < n_tokens})
    print(f"embedded example, tiny CLIP block L: {n_images} images x {n_tokens} tokens x d {d}; TopK SAEs m = {m}, "
          f"{args.steps} steps x {args.batch} tokens, seed {args.seed}, {torch.get_num_threads()} thread(s)")
    print(f"{'k':>4} {'T':>4} {'n':>8} {'n/k':>7} {'n/(T*k)':>8} {'n/m':>6}")
    fits = {}
    for k in args.ks:
        start = time.perf_counter()
        sae = train_topk(flat, m, k, args.steps, args.batch, args.seed)
        sizes_n = union_sizes(sae, acts, sizes, args.seed)
        for size, value in sizes_n.items():
            print(f"{k:>4} {size:>4} {value:>8.1f} {value / k:>7.2f} {value / (size * k):>8.3f} {value / m:>6.3f}")
        tail = [s for s in sizes if s >= 16]  # the regime the extrapolation continues
        exponent = float(np.polyfit(np.log(tail), np.log([sizes_n[s] for s in tail]), 1)[0])
        fits[k] = (sizes_n[sizes[-1]], exponent)
        print(f"     (trained and measured in {time.perf_counter() - start:.0f} s; n ~ T^b with b = {exponent:.2f}, "
              f"least squares over T = {', '.join(map(str, tail))})")
    print()
    big_t, big_k, big_m = 257, 64, 32_768
    k_ref = max(fits)
    n_ref, b_ref = fits[k_ref]
    # n scales with k at fixed sharing (n/(T·k) measured per k), and with T as T^b.
    estimate = n_ref * (big_k / k_ref) * (big_t / n_tokens) ** b_ref
    bound = min(big_m, big_t * big_k)
    print(f"ViT-L/14 estimate (T = {big_t}, k = {big_k}, m = {big_m:,}), assuming the sharing exponent b = {b_ref:.2f} "
          f"measured at k = {k_ref} carries over and n grows linearly in k at fixed T: n ~ {estimate:,.0f} "
          f"active latents per image ({6 * estimate + 24:,.0f} B/image in uint16 + float32); "
          f"bound min(m, T*k) = {bound:,} ({6 * bound + 24:,} B/image)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
