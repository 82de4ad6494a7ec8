"""Masked-image CLIP forwards per second of `cscope categorize`, against a bare batched loop.

Runs on the embedded example (init --example in a temporary folder; upstream stages are
run first and not timed). `categorize` does, per class, S original + 2·S·C masked forwards
(S images, C candidates) plus masks, similarities and bookkeeping; the bare loop runs the
same number of `encode_image` calls on ready tensors at the same batch size. Target ratio
≥ 0.8.

    python benchmarks/categorize.py [--num-samples 64] [--candidates 20] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from conceptscope_cli.backbone.loader import load_backbone
    from conceptscope_cli.categorize.stage import categorize
    from conceptscope_cli.config.sections import CategorizeConfig
    from conceptscope_cli.dictionary.stage import build_dictionary
    from conceptscope_cli.pipeline.init import init_project
    from conceptscope_cli.project import Project

    work = Path(tempfile.mkdtemp(prefix="cscope-bench-cat-"))
    init_project(work / "demo", example=True)
    project = Project.open(work / "demo")
    project.manifest.override(CategorizeConfig, num_samples=args.num_samples, candidates=args.candidates,
                              batch_size=args.batch_size)
    build_dictionary(project, None, "train")  # upstream, not timed

    start = time.perf_counter()
    result = categorize(project, None, "train")
    ours_seconds = time.perf_counter() - start
    forwards = 0
    for info in result.categorization["classes"].values():
        n_candidates = len(info["target"]) + len(info["context"])
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
    print(f"example: 5 classes, {args.num_samples} images × {args.candidates} candidates per class, batch {args.batch_size}")
    print(f"masked forwards        : {forwards:,}")
    print(f"cscope categorize      : {forwards / ours_seconds:9.1f} forwards/s ({ours_seconds:.1f} s)")
    print(f"bare encode_image loop : {forwards / bare_seconds:9.1f} forwards/s ({bare_seconds:.1f} s)")
    print(f"ratio                  : {bare_seconds / ours_seconds:9.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
