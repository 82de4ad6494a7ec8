"""Concept grouping at ImageNet size: synthetic CSR latents, no model needed.

For N/2 and N rows (default 1.28M) x 32768 latents with ~100 active per row (the generator of
benchmarks/scale.py), each in a fresh subprocess:

* baseline: `cscope dict`'s statistics pass over the same matrix (`compute_statistics`, O(nnz));
* grouping: `correlation_edges` (within-class Gram in row tiles, sparse x sparse) over the
  `--valid` most frequent latents (the costliest choice: frequent latents dominate Σ nnz²),
  then `build_groups`.

Prints seconds, the ratio grouping / statistics, and peak RSS (ru_maxrss of the subprocess).
Time should grow linearly with the rows, peak memory stay flat.

    python benchmarks/groups.py                          # 640k and 1.28M rows
    python benchmarks/groups.py --rows 160000 --valid 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def worker(path: str, n_valid: int, budget_mb: int) -> dict:
    import torch
    from scale import peak_rss_mb

    from conceptscope_cli.dictionary import groups as G
    from conceptscope_cli.dictionary.latents import compute_statistics
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    stats = compute_statistics(Path(path), 1000)
    t_stats = time.perf_counter() - t0
    rss_stats = peak_rss_mb()
    valid = np.sort(np.argsort(-stats["frequency"][:, 0], kind="stable")[:n_valid])
    del stats
    t0 = time.perf_counter()
    with LatentMatrix(Path(path)) as matrix:
        edges, sums = G.correlation_edges(matrix, valid, G.DEFAULT_THRESHOLD, memory_bytes=budget_mb << 20)
        groups = G.build_groups(edges, sums, G.DEFAULT_THRESHOLD)
        nnz = matrix.nnz
    t_group = time.perf_counter() - t0
    return {"stats_s": t_stats, "group_s": t_group, "rss_stats_mb": rss_stats, "rss_mb": peak_rss_mb(),
            "n_groups": len(groups), "n_edges": int(len(edges.i)), "nnz": nnz}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--valid", type=int, default=8192)
    parser.add_argument("--budget-mb", type=int, default=512, help="memory of one Gram row tile")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cscope-groups-bench"))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return 0
    from scale import write_latents

    results = {}
    for rows in (args.rows // 2, args.rows):
        path = write_latents(args.work / f"latents-{rows}-{args.latents}.h5", rows, args.latents)
        out = subprocess.run([sys.executable, __file__, "--worker", str(path), str(args.valid), str(args.budget_mb)],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results[rows] = res
        print(f"{rows:>9} rows, {args.valid} valid of {args.latents} latents, nnz {res['nnz']:,}: statistics "
              f"{res['stats_s']:.1f} s, grouping {res['group_s']:.1f} s (ratio {res['group_s'] / res['stats_s']:.2f}), "
              f"{res['n_edges']} edges, {res['n_groups']} groups, peak RSS {res['rss_mb']:.0f} MB "
              f"(statistics alone {res['rss_stats_mb']:.0f} MB)")
    small, large = results[args.rows // 2], results[args.rows]
    print(f"time x{large['group_s'] / small['group_s']:.2f} for x2 rows; peak RSS x{large['rss_mb'] / small['rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
