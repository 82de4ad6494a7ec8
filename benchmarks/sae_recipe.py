"""The default SAE recipe and valid-latent rule on two backbones, against ConceptScope's recipe.

    python benchmarks/sae_recipe.py                    # work dir /tmp/cscope-sae-recipe (reused)
    python benchmarks/sae_recipe.py --work DIR --no-relu

Models (both at 128 dimensions, on the embedded example's generated images, train split):

* `example:tiny-clip`, the embedded example's trained tiny CLIP (layer -1, 65 tokens);
* `random-128`, a randomly initialised open_clip ViT (3 blocks, 48 px, 6-px patches: 65 tokens),
  whose activations are on another scale: a stand-in for "a model the defaults were not made on".

Both train on every token of every train image (`[extract] tokens_per_image = 0`: 1,140 x 65 =
74,100 training tokens). Per model and recipe it trains the SAE through the real stage and computes the image-level
latents, then prints held-out FVU, L0 (active latents per token), dead and dense fractions,
and the valid latents under the relative rule (default) and ConceptScope's absolute 0.1 / 0.5.
Recipes: `auto` (every [sae] key at its default: TopK, k and size from d and the data,
25 passes) and `relu` (ConceptScope's ReLU + L1 8e-5, same size and budget as `auto`, so that
only the sparsity mechanism differs). The ratio column is the L0 of `relu` over that of `auto`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RANDOM_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 48, "layers": 3, "width": 128, "head_width": 32, "patch_size": 6},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


def _random_model(folder: Path) -> Path:
    import open_clip
    import torch

    from conceptscope_cli.backbone.local import save_local_dir

    if not (folder / "open_clip_config.json").is_file():
        torch.manual_seed(0)
        save_local_dir(open_clip.CLIP(**RANDOM_CFG), RANDOM_CFG, folder, {"size": 48})
    return folder


def _manifest(world: Path, cache: Path, model: str, layer: int, sae: str, class_names: list[str]) -> str:
    return f"""
[project]
name = "recipe"
device = "cpu"
num_workers = 0
cache_dir = "{cache}"

[backbone]
model = "{model}"
layer = {layer}

[datasets.world]
source = "imagefolder"
path = "{world}"
splits = ["train"]
class_names = {json.dumps(class_names)}

[extract]
tokens_per_image = 0   # every token: the SAE trains on all 65 tokens of each image

[sae]
batch_size = 1024
{sae}

[dict]
namer = "none"
"""


def measure(project_dir: Path) -> dict[str, float]:
    from conceptscope_cli.config.sections import DictConfig
    from conceptscope_cli.dictionary.latents import load_stats, select_valid_latents
    from conceptscope_cli.dictionary.stage import build_dictionary
    from conceptscope_cli.dictionary.valid import valid_thresholds
    from conceptscope_cli.project import Project
    from conceptscope_cli.sae.stage import train_stage

    project = Project.open(project_dir)
    started = time.perf_counter()
    sae = train_stage(project)
    seconds = time.perf_counter() - started
    result = build_dictionary(project)
    stats = load_stats(result.latents_entry.path / "stats.h5")
    record = sae.entry.record
    row = {**{k: record["stats"]["eval"][k] for k in ("fvu", "l0", "dead_fraction", "dense_fraction")},
           "m": record["summary"]["d_sae"], "tokens": record["stats"]["tokens"], "steps": record["stats"]["steps"],
           "train_s": seconds if not sae.reused else float("nan")}
    cfg = project.manifest.get(DictConfig)
    for rule in ("relative", "reference"):
        import dataclasses

        t = valid_thresholds(dataclasses.replace(cfg, valid_rule=rule), stats["top_values"])
        valid, _ = select_valid_latents(stats, noisy_threshold=t["noisy_threshold"], strong_value=t["strong_value"],
                                        min_strong_images=cfg.min_strong_images)
        row[f"valid_{rule}"] = len(valid)
        row.setdefault("scale", t.get("scale", float("nan")))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cscope-sae-recipe"))
    parser.add_argument("--no-relu", action="store_true", help="only the default recipe")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from conceptscope_cli.example.world import WorldConfig, generate_world, load_world_info

    work = args.work.resolve()
    world = work / "world"
    if not (world / "world.json").is_file():
        generate_world(world, WorldConfig())
    class_names = load_world_info(world)["class_names"]
    models = {"example:tiny-clip": ("example:tiny-clip", -1),
              "random-128": (f"local-dir:{_random_model(work / 'random-128-model')}", -1)}
    rows = []
    for label, (model, layer) in models.items():
        auto_dir = work / f"{label.replace(':', '-')}-auto"
        auto_dir.mkdir(parents=True, exist_ok=True)
        (auto_dir / "cscope.toml").write_text(_manifest(world, work / "cache", model, layer, "", class_names))
        auto = measure(auto_dir)
        rows.append((label, "auto (topk)", auto))
        if not args.no_relu:
            relu_dir = work / f"{label.replace(':', '-')}-relu"
            relu_dir.mkdir(parents=True, exist_ok=True)
            sae = (f'architecture = "relu"\nl1_coefficient = 8e-5\nd_sae = {auto["m"]}\n'
                   f'total_tokens = {auto["tokens"]}')
            (relu_dir / "cscope.toml").write_text(_manifest(world, work / "cache", model, layer, sae, class_names))
            relu = measure(relu_dir)
            relu["l0_ratio"] = relu["l0"] / max(auto["l0"], 1e-9)
            rows.append((label, "relu 8e-5 (ConceptScope)", relu))
    header = ("model", "recipe", "m", "tokens", "steps", "FVU", "L0", "dead", "dense", "scale s", "valid rel",
              "valid 0.1/0.5", "L0 vs auto")
    print(" | ".join(header))
    for label, recipe, r in rows:
        print(" | ".join([label, recipe, str(r["m"]), f"{r['tokens']:,}", str(r["steps"]), f"{r['fvu']:.3f}",
                          f"{r['l0']:.1f}", f"{r['dead_fraction']:.3f}", f"{r['dense_fraction']:.3f}",
                          f"{r['scale']:.3g}", str(r["valid_relative"]), str(r["valid_reference"]),
                          f"{r.get('l0_ratio', 1.0):.1f}x"]))


if __name__ == "__main__":
    main()
