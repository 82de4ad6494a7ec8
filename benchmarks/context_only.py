"""Would a context-only measurement rescue the bias claims? An upper bound on the embedded example.

The evidence rule tests a latent's activation on whole images, so a latent that partly detects
the class is over-represented in the class whatever its name (docs/METHOD.md, "Known
limitation"). This script asks how far removing the object first would go, with the best
segmentation there is: the world's ground truth. For every image of the train split it drops
the patch tokens the object covers (coverage > --cover) from the ViT's sequence after the
position embedding (no black hole whose silhouette the model could still read), runs the
blocks up to the SAE's layer, encodes every remaining token with the project's SAE and takes the
mean, as `cscope dict` does. For each bias claim of the project's categorization it prints the
typical class-vs-class Cliff delta (median over the other classes) on whole images (the
baseline, the default rule's statistic) and on the context-only images, and then:

* separation: AUROC of each statistic for "the claim detects a planted attribute of its class
  (AUROC >= 0.8 over the split)" against "it does not" (0.5 = none, 1 = a perfect rule exists),
  and the ratio context-only / whole images;
* at a few thresholds, how many claims are kept, how many of them are false, whether the
  unbiased classes keep any, and which planted classes keep a detector at AUROC >= 0.9.

`--region targets` takes the object's region from the SAE instead of the ground truth: the
patches where the union of the image's class's target latents (the categorization's) reaches
--target-share of its maximum, and prints its mean IoU with the true object.

Run on a project made by `cscope init --example` and `cscope run` (any `[project] seed`):

    OMP_NUM_THREADS=1 python benchmarks/context_only.py PROJECT_DIR [--cover 0.05] [--region targets]

It needs the ground truth only the embedded world has, so it is a measurement for the method's
notes, not a feature.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conceptscope_cli.config.sections import BackboneConfig  # noqa: E402
from conceptscope_cli.context import run_context  # noqa: E402
from conceptscope_cli.dictionary.sparse import LatentMatrix  # noqa: E402
from conceptscope_cli.example import world as W  # noqa: E402
from conceptscope_cli.example.tiny_clip import auroc  # noqa: E402
from conceptscope_cli.project import Project  # noqa: E402
from conceptscope_cli.session import ModelSession  # noqa: E402

PLANTED_AUROC = 0.8
DETECTOR_AUROC = 0.9


def context_only_latents(session: ModelSession, images: np.ndarray, object_cover: torch.Tensor,
                         cover: float) -> np.ndarray:
    """Image-level latents (N, m) with the object's patch tokens dropped before the first block.

    images (N, H, W, 3) uint8; object_cover (N, P) the object's share of each patch."""
    from PIL import Image

    backbone, sae = session.backbone, session.sae
    visual = backbone.visual
    layer = backbone.resolve_layer(session.project.manifest.get(BackboneConfig).layer)
    blocks = visual.transformer.resblocks[: layer + 1]
    out = np.zeros((len(images), sae.W_enc.shape[1]), np.float32)
    with torch.no_grad():
        for i, image in enumerate(images):
            x = backbone.preprocess(Image.fromarray(image))[None]
            tokens = visual.conv1(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([visual.class_embedding.view(1, 1, -1).to(tokens), tokens], 1)
            tokens = tokens + visual.positional_embedding.to(tokens)
            keep = torch.cat([torch.tensor([True]), object_cover[i] <= cover])
            z = visual.ln_pre(tokens[:, keep])
            for block in blocks:
                z = block(z)
            out[i] = sae.encode(z[0].float()).mean(0).numpy()
    return out


def target_regions(session: ModelSession, images: np.ndarray, labels: np.ndarray,
                   targets: dict[int, list[int]], share: float) -> torch.Tensor:
    """(N, P) 1.0 where the image's class's target latents, summed, reach ``share`` of their maximum."""
    from PIL import Image

    from conceptscope_cli.backbone.capture import ResidualCapture

    backbone, sae = session.backbone, session.sae
    capture = ResidualCapture(backbone.visual, backbone.resolve_layer(session.project.manifest.get(BackboneConfig).layer))
    regions = []
    with torch.no_grad():
        for start in range(0, len(images), 100):
            x = torch.stack([backbone.preprocess(Image.fromarray(im)) for im in images[start:start + 100]])
            z = capture(x)
            f = sae.encode(z.reshape(-1, z.shape[-1]).float()).reshape(z.shape[0], z.shape[1], -1)[:, 1:]
            for i in range(len(x)):
                heat = f[i][:, targets[int(labels[start + i])]].sum(1)
                regions.append((heat >= share * heat.max()) & (heat > 0))
    return torch.stack(regions).float()


def object_boxes(object_masks: np.ndarray, patch: int) -> torch.Tensor:
    """(N, P) 1.0 on every patch the object's bounding box touches: a box hole tells the model the
    object's position and size, not its silhouette (a mask-shaped hole does)."""
    n, height, width = object_masks.shape
    boxes = torch.zeros(n, height // patch, width // patch)
    for i, mask in enumerate(object_masks):
        rows, cols = np.flatnonzero(mask.max(1) > 0), np.flatnonzero(mask.max(0) > 0)
        if len(rows):
            boxes[i, rows[0] // patch: rows[-1] // patch + 1, cols[0] // patch: cols[-1] // patch + 1] = 1.0
    return boxes.flatten(1)


def entry_path(project: Project, kind: str, key: str) -> Path:
    """The cache folder of one entry the categorization names (it must still be in the cache)."""
    entry = project.cache.lookup(kind, key)
    if entry is None:
        raise SystemExit(f"{kind} entry {key} is not in the cache; re-run `cscope run`")
    return entry.path


def typical_delta(values: np.ndarray, labels: np.ndarray, y: int) -> float:
    """Median over the other classes z of Cliff's delta (2·AUROC − 1) of class y against class z."""
    inside = values[labels == y]
    deltas = []
    for z in np.unique(labels):
        if z == y:
            continue
        other = values[labels == z]
        truth = np.r_[np.ones(len(inside), bool), np.zeros(len(other), bool)]
        deltas.append(2 * auroc(np.r_[inside, other], truth) - 1)
    return float(np.median(deltas))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--cover", type=float, default=0.05, help="drop patches the object covers more than this")
    parser.add_argument("--region", choices=("truth", "box", "targets"), default="truth",
                        help="where the object is: the world's ground truth (its silhouette), its bounding box, "
                             "or the class's target latents")
    parser.add_argument("--target-share", type=float, default=0.3, help="with --region targets: share of the maximum")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    project = Project.open(args.project)
    ctx = run_context(project)
    out_dir = project.outputs_dir / ctx.dataset
    categorization = json.loads((out_dir / f"{ctx.split}_concept_categorization.json").read_text())
    concept = json.loads((out_dir / ctx.split / "concept_dict.json").read_text())
    data_dir = Path(project.dataset(ctx.dataset)[1].path)
    if not data_dir.is_absolute():
        data_dir = project.root / data_dir
    info = W.load_world_info(data_dir)
    layers = W.render_split_layers(W.WorldConfig.from_json(info["config"]), ctx.split)
    labels = np.array([s.label for s in layers.samples])
    classes = list(info["class_names"])

    session = ModelSession(project, ctx, entry_path(project, "sae", categorization["meta"]["sae_entry"]))
    patch = int(session.backbone.visual.patch_size[0])
    cover = torch.nn.functional.avg_pool2d(torch.as_tensor(layers.object_masks)[:, None], patch)[:, 0].flatten(1)
    if args.region == "box":
        cover = object_boxes(layers.object_masks, patch)
    if args.region == "targets":
        targets = {y: [int(e["latent"]) for e in categorization["classes"][n]["target"]] for y, n in enumerate(classes)}
        region = target_regions(session, layers.images, labels, targets, args.target_share)
        truth = cover > args.cover
        iou = ((truth & (region > 0)).sum(1) / (truth | (region > 0)).sum(1).clamp_min(1)).mean()
        print(f"target-latent regions: mean IoU {float(iou):.3f} with the true object "
              f"({float(region.mean()):.2f} of the patches, the object {float(truth.float().mean()):.2f})")
        cover = region  # dropped where > args.cover, i.e. where the region is 1
    dropped = context_only_latents(session, layers.images, cover, args.cover)
    with LatentMatrix(entry_path(project, "latents", concept["meta"]["latents_entry"]) / "latents.h5") as matrix:
        whole = np.zeros_like(dropped)
        whole[matrix.row_index] = matrix.row_block(0, len(matrix.row_index))

    planted: dict[str, list[np.ndarray]] = {}
    for b in info["planted_biases"]:
        planted.setdefault(b["class"], []).append(W.ground_truth(data_dir, ctx.split, b["attribute"], b["value"]))
    claims = []
    for y, name in enumerate(classes):
        for entry in categorization["classes"][name]["bias"]:
            k = int(entry["latent"])
            detects = max((auroc(whole[:, k], truth) for truth in planted.get(name, [])), default=0.0)
            claims.append((name, k, str(entry.get("name")), detects, typical_delta(whole[:, k], labels, y),
                           typical_delta(dropped[:, k], labels, y)))
    print(f"{'class':9s} {'latent':>6s} {'name':16s} {'planted AUROC':>13s} {'delta whole':>11s} {'context-only':>12s}")
    for c in sorted(claims, key=lambda c: -c[5]):
        print(f"{c[0]:9s} {c[1]:6d} {c[2][:16]:16s} {c[3]:13.2f} {c[4]:+11.2f} {c[5]:+12.2f}")
    is_planted = np.array([c[3] >= PLANTED_AUROC for c in claims])
    if is_planted.all() or not is_planted.any():
        print("separation undefined: every claim is (or none is) planted")
        return 0
    base = auroc(np.array([c[4] for c in claims]), is_planted)
    ours = auroc(np.array([c[5] for c in claims]), is_planted)
    print(f"\n{len(claims)} claims, {int(is_planted.sum())} detect a planted attribute (AUROC >= {PLANTED_AUROC})")
    print(f"separation (AUROC planted vs not): whole images {base:.3f}, context-only {ours:.3f}, ratio {ours / base:.2f}")
    unbiased = [n for n in classes if n not in planted]
    for threshold in (0.147, 0.25, 0.33):
        kept = [c for c in claims if c[5] >= threshold]
        found = sorted({c[0] for c in kept if c[3] >= DETECTOR_AUROC})
        print(f"context-only delta >= {threshold}: {len(kept)} kept, {sum(c[3] < PLANTED_AUROC for c in kept)} false, "
              f"unbiased classes {sum(c[0] in unbiased for c in kept)}, planted classes with a detector >= "
              f"{DETECTOR_AUROC}: {found} of {sorted(planted)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
