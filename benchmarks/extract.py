"""Throughput of `cscope extract` against a bare full forward pass of the same model.

Both sides see the same images, batch size and model; the bare loop decodes in the same
way but runs the whole visual tower (all blocks, ln_post, projection) and writes nothing.
`extract` stops after block L and writes HDF5 shards, so the ratio should exceed 1.0;
below 0.9 the I/O path is the bottleneck.

    python benchmarks/extract.py [--images 512] [--batch-size 64] [--model ViT-B-16|tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="small", help="small (6-layer width-256 ViT at 224 px, random weights) or tiny")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import open_clip

    from conceptscope_cli.backbone.local import save_local_dir
    from conceptscope_cli.data.datasets import decoded_loader, open_split
    from conceptscope_cli.extract.activations import extract_activations
    from conceptscope_cli.project import Project
    from conftest import TINY_MODEL_CFG, write_image_folder, write_manifest

    model_cfg = TINY_MODEL_CFG if args.model == "tiny" else {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 224, "layers": 6, "width": 256, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    work = Path(tempfile.mkdtemp(prefix="cscope-bench-"))
    torch.manual_seed(0)
    model_dir = save_local_dir(open_clip.CLIP(**model_cfg), model_cfg, work / "model", {"size": model_cfg["vision_cfg"]["image_size"]})
    write_image_folder(work / "images", {"train": args.images}, size=256)
    write_manifest(work / "proj", f"""
        [project]
        device = "cpu"
        num_workers = {args.num_workers}
        [backbone]
        model = "local-dir:{model_dir}"
        [datasets.bench]
        source = "imagefolder"
        path = "../images"
        [extract]
        batch_size = {args.batch_size}
        shard_size = 2048
    """)
    project = Project.open(work / "proj")

    # Bare baseline: same decode path, full visual forward, nothing stored.
    from conceptscope_cli.backbone.loader import load_backbone

    backbone = load_backbone(project.resolved_backbone(), torch.device("cpu"))
    name, config = project.dataset(None)
    split = open_split(name, config, "train", project.root, project.cache)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in decoded_loader(split, 0, None, backbone.preprocess, batch_size=args.batch_size, num_workers=args.num_workers):
            backbone.model.encode_image(batch.images)
    bare = args.images / (time.perf_counter() - start)

    start = time.perf_counter()
    result = extract_activations(project)
    ours = args.images / (time.perf_counter() - start)
    record = result.entry.record
    print(f"model: {args.model}, layers {model_cfg['vision_cfg']['layers']}, layer captured {record['summary']['layer_index']}")
    print(f"bare full forward : {bare:8.1f} images/s")
    print(f"cscope extract    : {ours:8.1f} images/s (includes model load, HDF5 writes, commit)")
    print(f"ratio             : {ours / bare:8.2f}")
    print(f"cache entry       : {record['size_bytes'] / 2**20:.1f} MiB for {record['stats']['n_images']} images "
          f"({record['stats']['n_tokens']} tokens × {record['stats']['d_model']} dims, float16)")


if __name__ == "__main__":
    main()
