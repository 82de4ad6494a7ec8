"""Throughput of the SAE training step: our `training_step` against a bare PyTorch step.

    python benchmarks/train.py                       # d=768, expansion 32, batch 4096, 3 steps
    python benchmarks/train.py --d 128 --steps 5     # quick smaller run
    python benchmarks/train.py --arch topk batchtopk --dead-fraction 0.25   # AuxK active on a quarter
    python benchmarks/train.py --arch topk --dead-fraction 0.5 --aux-form pattern   # AuxK's form forced

The summary prints batchtopk/topk (ours, target >= 0.9x) and each sparse architecture against the
bare dense TopK step (target >= 3x).

For each architecture two variants run, each in its own subprocess so peak memory is its own:

* bare: the same math written directly — dense encoder/decoder matmuls (dense TopK/BatchTopK by
  scatter into a dense latent matrix), decoder renorm, parallel-gradient removal, Adam — no
  trackers, no logging.
* ours: `conceptscope_cli.sae.trainer.training_step` with SAEConfig defaults (ghost grads /
  AuxK switched on, idle while no latent is dead; `--dead-fraction` marks that share of the latents
  dead before every step so AuxK runs; sparse kernels for topk and batchtopk, AuxK as a sparse
  pattern or a dense block over the dead latents by density, `--aux-form` forces one), firing tracker,
  metrics. With `--dead-fraction` the bare step computes the same AuxK loss densely (dense
  top-aux_k of the dead latents scattered into a (B, m) matrix, dense decode); `--no-bare-aux`
  leaves it out, so that a dead fraction only makes ours slower.

Both use the same Adam implementation (fused when available), random inputs, float32.
On a shared CPU, wall time swings with other users' load; the CPU-seconds column and
`--rounds` (best of rounds, each running every architecture and variant in turn) make the
comparison steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def bare_step_factory(d: int, m: int, k: int, architecture: str, device: torch.device, dead_fraction: float = 0.0,
                      aux_k: int = 512, aux_coefficient: float = 1 / 32):
    generator = torch.Generator().manual_seed(0)
    W_enc = torch.nn.Parameter((torch.rand(d, m, generator=generator) * 2 - 1).mul_((6 / m) ** 0.5).to(device))
    W_dec = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(m, d, generator=generator), dim=-1).to(device))
    b_enc = torch.nn.Parameter(torch.zeros(m, device=device))
    b_dec = torch.nn.Parameter(torch.zeros(d, device=device))
    try:
        optimizer = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=4e-4, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=4e-4)

    # AuxK (Gao et al. 2024) written densely, as ours computes it sparsely: the top aux_k dead
    # latents of each token reconstruct the detached residual, no decoder bias, normalised by its variance.
    dead = torch.randperm(m, generator=torch.Generator().manual_seed(2))[: int(dead_fraction * m)].to(device)
    n_aux = min(aux_k, len(dead))

    def step(x: torch.Tensor) -> None:
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True))
        pre = (x - b_dec) @ W_enc + b_enc
        if architecture == "relu":
            f = torch.relu(pre)
        elif architecture == "topk":
            values, indices = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        else:
            post = torch.relu(pre).flatten()
            values, indices = post.topk(k * x.shape[0])
            f = torch.zeros_like(post).scatter(0, indices, values).view_as(pre)
        recon = f @ W_dec + b_dec
        loss = ((recon - x).pow(2) / x.norm(dim=-1, keepdim=True)).mean()
        if architecture == "relu":
            loss = loss + 8e-5 * f.sum(-1).mean()
        elif n_aux:
            aux_values, aux_pos = pre[:, dead].topk(n_aux, dim=-1, sorted=False)
            f_aux = torch.zeros_like(pre).scatter(-1, dead[aux_pos], torch.relu(aux_values))
            residual = (x - recon).detach()
            variance = (residual - residual.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-8)
            aux = (f_aux @ W_dec - residual).pow(2).sum() / variance
            loss = loss + aux_coefficient * min(len(dead) / aux_k, 1.0) * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
        optimizer.step()

    return step


def ours_step_factory(d: int, m: int, k: int, architecture: str, device: torch.device, dead_fraction: float = 0.0,
                      aux_form: str = "auto"):
    from conceptscope_cli.config.sections import SAEConfig
    from conceptscope_cli.sae import sparse_ops
    from conceptscope_cli.sae.metrics import FiringTracker
    from conceptscope_cli.sae.model import SparseAutoencoder
    from conceptscope_cli.sae.trainer import make_optimizer, training_step

    if aux_form != "auto":  # force AuxK's form: a sparse pattern, or the dense block over the dead latents
        sparse_ops.AUX_BLOCK_DENSITY = 0 if aux_form == "pattern" else 10**9
    cfg = SAEConfig(architecture=architecture, d_sae=m, k=k)
    sae = SparseAutoencoder(d, m, architecture, k, sparse_kernels=cfg.uses_sparse_kernels(),
                            generator=torch.Generator().manual_seed(0)).to(device)
    optimizer = make_optimizer(sae, cfg, device)
    tracker = FiringTracker(m, cfg.dead_metric_tokens)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    dead = torch.randperm(m, generator=torch.Generator().manual_seed(2))[: int(dead_fraction * m)]

    def step(x: torch.Tensor) -> None:
        tracker.steps_since_fired[dead] = 10**9  # dead for AuxK however the last step went
        training_step(sae, sae, optimizer, tracker, x, cfg, lr=cfg.lr, autocast=autocast)

    return step


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(args: argparse.Namespace, architecture: str, variant: str) -> dict[str, float]:
    """Per-step wall and CPU seconds (medians over the timed steps) and peak memory of one variant."""
    device = torch.device(args.device)
    m = args.d * args.expansion
    if variant == "bare":
        step = bare_step_factory(args.d, m, args.k, architecture, device,
                                 args.dead_fraction if args.bare_aux else 0.0)
    else:
        step = ours_step_factory(args.d, m, args.k, architecture, device, args.dead_fraction, args.aux_form)
    x = torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(1)).to(device)
    for _ in range(args.warmup):
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = [], []
    for _ in range(args.steps):
        start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
        step(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(_cpu_seconds() - start_cpu)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate bare/ours this many times and keep each variant's best round "
                             "(guards against load from other processes on a shared machine)")
    parser.add_argument("--arch", nargs="+", default=["relu", "topk", "batchtopk"])
    parser.add_argument("--dead-fraction", type=float, default=0.0,
                        help="share of latents marked dead before every step of ours (AuxK on them)")
    parser.add_argument("--bare-aux", action=argparse.BooleanOptionalAction, default=True,
                        help="the bare step computes AuxK too (densely) when --dead-fraction > 0, so both run "
                             "the same math; --no-bare-aux compares against the bare step without AuxK")
    parser.add_argument("--aux-form", choices=["auto", "pattern", "block"], default="auto",
                        help="AuxK entries of ours as a sparse pattern or a dense block over the dead latents "
                             "(auto: by density, sparse_ops.AUX_BLOCK_DENSITY)")
    parser.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="fix the C heap's mmap threshold at BYTES in every variant's process, as cscope does "
                             "under CSCOPE_MMAP_THRESHOLD; 0: glibc's own")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # "arch:variant", used for the subprocesses
    args = parser.parse_args()

    if args.mmap_threshold:  # the C heap as cscope sets it under CSCOPE_MMAP_THRESHOLD (heap.py)
        from conceptscope_cli.heap import fix_mmap_threshold

        fix_mmap_threshold(args.mmap_threshold)
    if args.only:
        architecture, variant = args.only.split(":")
        print(json.dumps(measure(args, architecture, variant)))
        return

    print(f"d={args.d} m={args.d * args.expansion} batch={args.batch} k={args.k} steps={args.steps} "
          f"rounds={args.rounds} dead_fraction={args.dead_fraction} bare_aux={args.bare_aux} device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("s/step = median wall seconds per step; cpu s = process CPU seconds per step (less sensitive to other")
    print("load on a shared machine); ratios are ours/bare throughput by wall time and by CPU time")
    header = (f"{'arch':<10} {'variant':<6} {'s/step':>8} {'cpu s':>7} {'tokens/s':>9} {'peak MB':>8} "
              f"{'x wall':>7} {'x cpu':>6}")
    print(header)
    print("-" * len(header))
    passthrough = [f"--d={args.d}", f"--expansion={args.expansion}", f"--batch={args.batch}", f"--k={args.k}",
                   f"--steps={args.steps}", f"--warmup={args.warmup}", f"--device={args.device}",
                   f"--dead-fraction={args.dead_fraction}", "--bare-aux" if args.bare_aux else "--no-bare-aux",
                   f"--aux-form={args.aux_form}"] + [f"--mmap-threshold={args.mmap_threshold}"]
    results: dict[str, dict[str, dict[str, float]]] = {architecture: {} for architecture in args.arch}
    # Every round runs every architecture and variant in turn, so a change of load elsewhere
    # during the run falls on all of them alike (not on the architecture measured last).
    for _ in range(args.rounds):
        for architecture in args.arch:
            best = results[architecture]
            for variant in ("bare", "ours"):
                output = subprocess.run([sys.executable, __file__, *passthrough, f"--only={architecture}:{variant}"],
                                        check=True, capture_output=True, text=True).stdout
                result = json.loads(output.strip().splitlines()[-1])
                if variant not in best or result["step_s"] < best[variant]["step_s"]:
                    best[variant] = result
    for architecture in args.arch:
        best = results[architecture]
        wall_ratio = best["bare"]["step_s"] / best["ours"]["step_s"]
        cpu_ratio = best["bare"]["cpu_s"] / best["ours"]["cpu_s"]
        for variant in ("bare", "ours"):
            r = best[variant]
            ratios = f"{wall_ratio:>6.2f}x {cpu_ratio:>5.2f}x" if variant == "ours" else ""
            print(f"{architecture:<10} {variant:<6} {r['step_s']:>8.3f} {r['cpu_s']:>7.2f} "
                  f"{args.batch / r['step_s']:>9.0f} {r['peak_mb']:>8.0f} {ratios}", flush=True)
    print_targets(results)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def print_targets(results: dict[str, dict[str, dict[str, float]]]) -> None:
    """The issue-17 targets, by wall time (and CPU time) measured in this run."""
    if "topk" not in results:
        return
    def ratio(a: dict[str, float], b: dict[str, float]) -> str:
        return f"{b['step_s'] / a['step_s']:.2f}x wall, {b['cpu_s'] / a['cpu_s']:.2f}x cpu"
    topk_ours, topk_bare = results["topk"]["ours"], results["topk"]["bare"]
    print(f"topk ours / bare dense topk step: {ratio(topk_ours, topk_bare)}  (target >= 3x)")
    if "batchtopk" in results:
        ours = results["batchtopk"]["ours"]
        print(f"batchtopk ours / bare dense topk step: {ratio(ours, topk_bare)}  (target >= 3x)")
        print(f"batchtopk ours / topk ours: {ratio(ours, topk_ours)}  (target >= 0.9x)")


if __name__ == "__main__":
    main()
