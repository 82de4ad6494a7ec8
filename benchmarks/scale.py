"""ImageNet-scale work in bounded memory: synthetic data at real sizes, no model needed.

Stages, each measured in a fresh subprocess (peak RSS = ru_maxrss of that process):

* ``loader``: a synthetic activation cache entry (FORMATS.md shards, written streaming)
  of N and 2N images, streamed through `train`'s loader (`ShuffledTokenStream`) for a
  number of token batches that covers ~1.5 epochs of the *smaller* entry (so every size
  reads a comparable amount and the small one wraps into a second epoch).
* ``stats``: a synthetic CSR ``latents.h5`` (written streaming with `CSRWriter`, ~100
  active latents per row, seeded) through `cscope dict`'s statistics pass (`compute_statistics`:
  `LatentStatistics` fed CSR row blocks); writes ``stats.h5`` like `cscope dict`.
* ``categorize``: per class, concept strength = ``class_mean[y]`` (and the lift over
  ``mean``) from that ``stats.h5``, the class's positions (`LatentMatrix.class_positions`),
  the seeded sample of `categorize` (`sample_images`, ``num_samples``) and its dense rows
  (`LatentMatrix.rows`).

Time should grow linearly with the rows, peak memory should stay flat.

    python benchmarks/scale.py                      # 160k..1.28M rows x 32768 latents, 2000/4000 images
    python benchmarks/scale.py --quick              # a few minutes on a laptop
    python benchmarks/scale.py --rows-max 320000 --latents 16384 --work /tmp/cscope-scale

Generated files are kept in --work (default: $TMPDIR/cscope-scale) and reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:  # synthetic.py, also when a test loads this file by path
    sys.path.insert(0, str(REPO / "benchmarks"))


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# ------------------------------------------------------------------ generators (streaming)
def write_activation_entry(entry: Path, n_images: int, n_tokens: int, d: int, *, images_per_shard: int = 1024,
                           chunk_images: int = 32, dtype: str = "float16", seed: int = 0) -> Path:
    """Activation cache entry in the FORMATS.md layout, written chunk by chunk (never the whole split).

    Values are seeded Gaussian noise: the loader's cost does not depend on them. Reused if
    `record.json` says it has the same shape."""
    entry = Path(entry)
    record = entry / "record.json"
    spec = {"synthetic": True, "n_images": n_images, "n_tokens": n_tokens, "d_model": d, "dtype": dtype,
            "images_per_shard": images_per_shard, "seed": seed}
    if record.is_file() and json.loads(record.read_text()) == spec:
        return entry
    from conceptscope_cli.extract.store import ShardWriter, shard_path

    (entry / "shards").mkdir(parents=True, exist_ok=True)
    for old in (entry / "shards").glob("shard-*.h5"):
        old.unlink()
    # The one shard writer of the format (FORMATS.md), so `extract.store.shard_infos` reads the entry.
    for shard_index, start in enumerate(range(0, n_images, images_per_shard)):
        stop = min(start + images_per_shard, n_images)
        writer = ShardWriter(shard_path(entry, shard_index), capacity=stop - start, n_tokens=n_tokens, d_model=d,
                             dtype=dtype, chunk_images=chunk_images)
        for lo in range(start, stop, chunk_images):
            hi = min(lo + chunk_images, stop)
            rng = np.random.default_rng([seed, lo])
            rows = np.arange(lo, hi, dtype=np.int64)
            writer.append(rng.standard_normal((hi - lo, n_tokens, d), dtype=np.float32).astype(dtype), rows % 1000,
                          rows, np.tile(np.arange(n_tokens, dtype=np.int32), (hi - lo, 1)))
        writer.close(row_start=start, row_stop=stop, skipped=[])
    record.write_text(json.dumps(spec))
    return entry


def write_latents(path: Path, n_rows: int, n_latents: int, *, active: int = 100, n_classes: int = 1000,
                  seed: int = 0, block: int = 512) -> Path:
    """CSR `latents.h5` with `CSRWriter`: ~`active` positive latents per row, seeded, block by block.

    Only one dense (block, m) block exists at a time. Latent popularity is Zipf-like and
    every class prefers its own few latents, so statistics are not degenerate. Reused if
    the file exists with the same attrs."""
    from synthetic import LatentDraws, reusable

    from conceptscope_cli.dictionary.sparse import CSRWriter

    path = Path(path)
    spec = {"n_images": n_rows, "n_latents": n_latents, "active": active, "n_classes": n_classes, "seed": seed}
    if reusable(path, spec):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    draws = LatentDraws(n_latents, n_classes, seed)
    writer = CSRWriter(path, n_latents, "float32")
    dense = np.zeros((block, n_latents), dtype=np.float32)
    for start in range(0, n_rows, block):
        b = min(block, n_rows - start)
        labels, cols, values = draws.block(start, b, active)
        dense[:b] = 0
        dense[np.arange(b)[:, None], cols] = values  # a repeated column keeps its last draw
        writer.append(dense[:b], labels, np.arange(start, start + b, dtype=np.int64))
    writer.close({k: v for k, v in spec.items() if k not in ("n_images", "n_latents")})
    return path


# ------------------------------------------------------------------ workers (one per subprocess)
def work_loader(entry: str, batch_size: int, shuffle_buffer: int, n_batches: int, seed: int = 0) -> dict:
    import torch

    from conceptscope_cli.sae.data import ShuffledTokenStream, open_cache

    base = peak_rss_mb()
    layout = open_cache(entry)
    stream = ShuffledTokenStream(layout, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed)
    total = torch.zeros(layout.d_in, dtype=torch.float64)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        total += stream.next_batch().tokens.sum(0, dtype=torch.float64)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "baseline_mb": base, "peak_mb": peak_rss_mb(), "rows": layout.n_images,
            "tokens": stream.tokens_consumed, "peak_buffer_tokens": stream.peak_buffer_tokens,
            "checksum": float(total.sum())}


def work_stats(latents: str, block: int | None, stats_out: str | None = None) -> dict:
    """`cscope dict`'s statistics pass itself (`compute_statistics`, then `write_statistics`)."""
    from conceptscope_cli.dictionary.latents import compute_statistics, write_statistics
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    base = peak_rss_mb()
    t0 = time.perf_counter()
    with LatentMatrix(Path(latents)) as matrix:
        n_classes = int(matrix.file.attrs.get("n_classes", int(matrix.labels.max()) + 1))
        n_rows, nnz = matrix.n_images, matrix.nnz
    final = compute_statistics(Path(latents), n_classes, block=block)
    if stats_out:
        write_statistics(Path(stats_out), final, n_rows)
    return {"seconds": time.perf_counter() - t0, "baseline_mb": base, "peak_mb": peak_rss_mb(), "rows": n_rows,
            "nnz": nnz}


def work_categorize(latents: str, stats_path: str, num_samples: int, seed: int = 0) -> dict:
    from conceptscope_cli.categorize.scores import sample_images
    from conceptscope_cli.dictionary.latents import load_stats
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    base = peak_rss_mb()
    t0 = time.perf_counter()
    stats = load_stats(Path(stats_path))
    checksum = 0.0
    sampled = 0
    with LatentMatrix(Path(latents)) as matrix:
        n_classes = stats["class_mean"].shape[0]
        for y in range(n_classes):
            strength = stats["class_mean"][y]  # concept strength f(c, y)
            lift = strength / np.maximum(stats["mean"], 1e-12)
            positions = matrix.class_positions(y)
            sample = sample_images(positions, num_samples, seed, y) if len(positions) else positions
            rows = matrix.rows(sample)  # (S, m) dense rows of the sampled images
            sampled += len(sample)
            checksum += float(rows.sum()) + float(lift.max())
        n_rows = matrix.n_images
    return {"seconds": time.perf_counter() - t0, "baseline_mb": base, "peak_mb": peak_rss_mb(), "rows": n_rows,
            "sampled": sampled, "checksum": checksum}


WORKERS = {"loader": work_loader, "stats": work_stats, "categorize": work_categorize}


def run_worker(stage: str, **kwargs) -> dict:
    """Run one worker in a fresh Python process; returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", stage, json.dumps(kwargs)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {stage} {kwargs} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        print(json.dumps(WORKERS[argv[1]](**json.loads(argv[2]))), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cscope-scale")
    p.add_argument("--quick", action="store_true", help="small sizes: rows 10k..40k x 8192 latents, 250/500 images x 1024 d")
    p.add_argument("--rows-min", type=int, default=160_000)
    p.add_argument("--rows-max", type=int, default=1_280_000)
    p.add_argument("--latents", type=int, default=32_768)
    p.add_argument("--active", type=int, default=100)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--block", type=int, default=None,
                   help="rows per CSR block of the statistics pass (default: cscope dict's, ~4M stored values)")
    p.add_argument("--num-samples", type=int, default=128, help="[categorize] num_samples")
    p.add_argument("--images", type=int, default=2000, help="N for the activation loader (also runs 2N)")
    p.add_argument("--tokens", type=int, default=257)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--shuffle-buffer", type=int, default=131072)
    p.add_argument("--stages", default="loader,stats,categorize")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.rows_min, args.rows_max, args.latents = 10_000, 40_000, 8192
        args.images = 250
    stages = set(args.stages.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, str, dict]] = []

    def report(stage: str, label: str, res: dict) -> None:
        results.append((stage, label, res))
        print(f"  {stage:<11} {label:>14}  {res['seconds']:9.1f} s  peak {res['peak_mb']:8.1f} MB", flush=True)

    if "loader" in stages:
        n_batches = -(-int(1.5 * args.images * args.tokens) // args.batch_size)
        for n in (args.images, 2 * args.images):
            gb = n * args.tokens * args.d * 2 / 1e9
            print(f"activation entry: {n} images x {args.tokens} x {args.d} float16 ({gb:.2f} GB)", flush=True)
            entry = write_activation_entry(args.work / f"acts-{n}x{args.tokens}x{args.d}", n, args.tokens, args.d,
                                           seed=args.seed)
            res = run_worker("loader", entry=str(entry), batch_size=args.batch_size,
                             shuffle_buffer=args.shuffle_buffer, n_batches=n_batches)
            report("loader", f"{n} img", res)

    sizes = []
    rows = args.rows_min
    while rows <= args.rows_max:
        sizes.append(rows)
        rows *= 2
    for rows in sizes:
        if not stages & {"stats", "categorize"}:
            break
        path = args.work / f"latents-{rows}x{args.latents}-a{args.active}-c{args.classes}-s{args.seed}.h5"
        t0 = time.perf_counter()
        print(f"latents: {rows} rows x {args.latents} latents ({path.name})", flush=True)
        write_latents(path, rows, args.latents, active=args.active, n_classes=args.classes, seed=args.seed)
        print(f"  (generated/reused in {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 1e6:.0f} MB)", flush=True)
        stats_path = path.with_suffix(".stats.h5")
        if "stats" in stages or not stats_path.is_file():
            report("stats", f"{rows} rows", run_worker("stats", latents=str(path), block=args.block,
                                                       stats_out=str(stats_path)))
        if "categorize" in stages:
            report("categorize", f"{rows} rows", run_worker("categorize", latents=str(path),
                                                            stats_path=str(stats_path),
                                                            num_samples=args.num_samples, seed=args.seed))

    print()
    print("peak RSS includes the imports (python, torch, h5py), shown alone in 'after imports'")
    print(f"{'stage':<11} {'size':>14} {'time (s)':>10} {'s/1k rows':>10} {'peak RSS (MB)':>14} "
          f"{'after imports':>14} {'vs smallest':>12}")
    first: dict[str, dict] = {}
    for stage, label, res in results:
        ref = first.setdefault(stage, res)
        per_k = res["seconds"] / max(res["rows"], 1) * 1000
        print(f"{stage:<11} {label:>14} {res['seconds']:10.1f} {per_k:10.3f} {res['peak_mb']:14.1f} "
              f"{res['baseline_mb']:14.1f} {res['peak_mb'] - ref['peak_mb']:+11.1f}M")
    print()
    print("raw results (JSON lines):")
    for stage, _label, res in results:
        print(json.dumps({"stage": stage, **res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
