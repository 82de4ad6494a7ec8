"""Masked-image CLIP forwards per second of `cscope categorize`, against a bare batched loop.

Runs on the embedded example (init --example in a temporary folder; upstream stages are
run first and not timed). `categorize` does, per class, S original + 2·S·C masked forwards
(S images, C candidates) plus masks, similarities and bookkeeping; the bare loop runs the
same number of `encode_image` calls on ready tensors at the same batch size. Target ratio
≥ 0.8.

    python benchmarks/categorize.py [--num-samples 64] [--candidates 20] [--batch-size 256] [--source images]

`--source images` runs it without a token cache (a 16-token training sample, `[dict] source =
"images"`): the samples' block-L tokens then come from the forward of the originals, which the
count above already includes (no extra pass to block L).

`--statistics` measures instead the evidence rule's cost at ImageNet size, without a model:
synthetic CSR latents (`benchmarks/scale.py`'s distribution: 1000 classes, ~100 active latents
per image, 32,768 latents) at N/8 and N images, each in a fresh subprocess, 20 candidates per
class (20,000 tested pairs): the streaming histogram pass over the CSR file, the second pass
that compares every pair's class with every other class (`[categorize] base_rate = "typical"`), the
Mann-Whitney tests + Benjamini-Hochberg + every pair's CI (the exact Poisson bootstrap
within `evidence.BOOTSTRAP_BUDGET`, the DeLong interval above it). Peak RSS must not
grow with N (target: < 5 minutes on 2 cores at 1.28M images).

    python benchmarks/categorize.py --statistics [--rows 1280000] [--work /tmp/cscope-scale]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def write_latents_csr(path: Path, n_rows: int, n_latents: int, *, active: int = 100, n_classes: int = 1000,
                      seed: int = 0, block: int = 8192) -> Path:
    """Synthetic CSR latents with `benchmarks/scale.py`'s distribution (Zipf-like popularity, 8
    preferred latents per class, exponential values), written in CSR form directly (no dense
    (block, m) matrix: ~50x faster at 32k latents). Reused if present with the same spec."""
    import numpy as np
    from synthetic import LatentDraws, reusable

    from conceptscope_cli.dictionary.sparse import CSRWriter

    spec = {"n_images": n_rows, "n_latents": n_latents, "active": active, "n_classes": n_classes, "seed": seed}
    if reusable(path, spec):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    draws = LatentDraws(n_latents, n_classes, seed)
    writer = CSRWriter(path, n_latents, "float32")
    for start in range(0, n_rows, block):
        b = min(block, n_rows - start)
        labels, cols, values = draws.block(start, b, active)
        cols.sort(axis=1)  # values stay in draw order (the distribution is exchangeable)
        keep = np.ones_like(cols, dtype=bool)
        keep[:, 1:] = cols[:, 1:] != cols[:, :-1]  # one entry per (row, latent)
        indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
        writer.append_csr(indptr, cols[keep].astype(np.int32), values[keep], labels,
                          np.arange(start, start + b, dtype=np.int64))
    writer.close({k: v for k, v in spec.items() if k not in ("n_images", "n_latents")})
    return path


def statistics_worker(latents: str, candidates: int, n_boot: int) -> dict:
    """One run of the evidence rule on a synthetic latents file (in a fresh process)."""
    import resource

    import numpy as np

    from conceptscope_cli.categorize import evidence as E
    from conceptscope_cli.dictionary.sparse import LatentMatrix

    times = {}
    with LatentMatrix(Path(latents)) as matrix:
        n_classes = int(matrix.labels.max()) + 1

        def blocks():  # noqa: ANN202
            for start in range(0, matrix.n_images, 8192):
                stop = min(start + 8192, matrix.n_images)
                yield (*matrix.csr_block(start, stop), matrix.labels[start:stop])

        start = time.perf_counter()
        top = np.zeros(matrix.n_latents)  # stands in for stats.h5's top value (computed by `dict`)
        for _, indices, values, _ in blocks():
            np.maximum.at(top, np.asarray(indices), np.asarray(values, dtype=np.float64))
        times["column max (dict's job, not counted)"] = time.perf_counter() - start
        rng = np.random.default_rng(0)
        pair_class = np.repeat(np.arange(n_classes), candidates)
        pair_unit = np.concatenate([rng.choice(matrix.n_latents, candidates, replace=False) for _ in range(n_classes)])
        start = time.perf_counter()
        hist = E.activation_histograms(blocks(), np.arange(matrix.n_latents), np.maximum(top, 1e-30), pair_class,
                                       pair_unit, n_classes)
        times["histogram pass"] = time.perf_counter() - start
        start = time.perf_counter()  # base_rate = "typical": every pair's class against every other class
        class_auroc = E.class_vs_class_auroc(blocks(), np.arange(matrix.n_latents), np.maximum(top, 1e-30), hist)
        times["class-vs-class pass"] = time.perf_counter() - start
        start = time.perf_counter()
        method = E.ci_method(hist, n_boot)
        E.over_representation(hist, fdr=0.05, min_effect=0.147, seed=0, n_boot=n_boot, class_auroc=class_auroc)
        times[f"tests + BH + CI ({method})"] = time.perf_counter() - start
        n_images, nnz = matrix.n_images, matrix.nnz
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n_images": n_images, "nnz": nnz, "pairs": int(pair_class.shape[0]), "times": times, "peak_rss_mb": rss}


def statistics(args: argparse.Namespace) -> None:
    import json
    import subprocess
    import sys

    work = Path(args.work)
    results = []
    for rows in (args.rows // 8, args.rows):
        path = write_latents_csr(work / f"csr-latents-{rows}-{args.latents}.h5", rows, args.latents,
                                 n_classes=args.classes)
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                f"from categorize import statistics_worker; "
                f"print(json.dumps(statistics_worker({str(path)!r}, {args.candidates}, {args.bootstrap})))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        counted = sum(v for k, v in r["times"].items() if "not counted" not in k)
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in r["times"].items())
        print(f"{r['n_images']:>9,} images, {r['nnz']:,} nnz, {r['pairs']:,} pairs: {counted:.1f} s ({parts}); "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    small, large = results
    print(f"memory ratio {large['peak_rss_mb'] / small['peak_rss_mb']:.2f} for {large['n_images'] / small['n_images']:.0f}x "
          "the images (flat = 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--source", choices=["cache", "images"], default="cache",
                        help="images: a 16-token training sample and [dict] source = \"images\", so categorize "
                             "has no token cache and takes block L from the originals' forwards")
    parser.add_argument("--statistics", action="store_true", help="benchmark the evidence rule at ImageNet size")
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--latents", type=int, default=32_768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=400)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cscope-scale"))
    args = parser.parse_args()
    if args.statistics:
        statistics(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from conceptscope_cli.backbone.loader import load_backbone
    from conceptscope_cli.categorize.stage import categorize
    from conceptscope_cli.config.sections import CategorizeConfig, DictConfig, ExtractConfig
    from conceptscope_cli.dictionary.stage import build_dictionary
    from conceptscope_cli.pipeline.init import init_project
    from conceptscope_cli.project import Project

    work = Path(tempfile.mkdtemp(prefix="cscope-bench-cat-"))
    init_project(work / "demo", example=True)
    project = Project.open(work / "demo")
    project.manifest.override(CategorizeConfig, num_samples=args.num_samples, candidates=args.candidates,
                              batch_size=args.batch_size)
    if args.source == "images":  # no full token cache: categorize recomputes its samples' tokens
        project.manifest.override(ExtractConfig, tokens_per_image=16)
        project.manifest.override(DictConfig, source="images")
    build_dictionary(project, None, "train")  # upstream, not timed

    start = time.perf_counter()
    result = categorize(project, None, "train")
    ours_seconds = time.perf_counter() - start
    forwards = 0
    for info in result.categorization["classes"].values():
        n_candidates = len(info["target"]) + len(info["context"]) + len(info.get("uncertain", []))
        sampled = min(args.num_samples, info["n_images"])
        forwards += sampled + 2 * sampled * n_candidates

    backbone = load_backbone(project.resolved_backbone(), torch.device("cpu"))
    size = backbone.image_size
    batch = torch.rand(args.batch_size, 3, *size)
    start = time.perf_counter()
    with torch.no_grad():
        done = 0
        while done < forwards:
            n = min(args.batch_size, forwards - done)
            backbone.model.encode_image(batch[:n])
            done += n
    bare_seconds = time.perf_counter() - start
    print(f"example: 5 classes, {args.num_samples} images × {args.candidates} candidates per class, batch {args.batch_size}, "
          f"tokens from the {'token cache' if args.source == 'cache' else 'forwards of the originals (no token cache)'}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"masked forwards        : {forwards:,}")
    print(f"cscope categorize      : {forwards / ours_seconds:9.1f} forwards/s ({ours_seconds:.1f} s)")
    print(f"bare encode_image loop : {forwards / bare_seconds:9.1f} forwards/s ({bare_seconds:.1f} s)")
    print(f"ratio                  : {bare_seconds / ours_seconds:9.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
