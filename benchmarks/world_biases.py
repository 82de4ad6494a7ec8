"""Score a project's bias findings against the ground truth of a generated image world.

The embedded example is one world; this script makes others and measures what `cscope` finds in
them, the way the acceptance tests score the example (docs/METHOD.md, "A world the defaults were
not tuned on"). Two commands:

    python benchmarks/world_biases.py make OUT_DIR --seed 7 \\
        --bias square:background=grass:0.85 --bias ring:co_object=heart:0.88

writes a world (`conceptscope_cli.example.world.generate_world`) with those planted biases in
its train split (no --bias: a world without any) as a user's folder: `cscope init --dataset
OUT_DIR --model example:tiny-clip` and `cscope run` take it from there. Then

    python benchmarks/world_biases.py score PROJECT_DIR [--dataset NAME]

reads the project's categorization of the train split and prints, per class: the planted biases,
the bias claims and how many of them detect no planted attribute of the class (AUROC < 0.8 over
the split, an entry's activation being the sum of its members'), the best claim's AUROC for each
planted attribute (the acceptance asks >= 0.9), the best target's AUROC for the class, and the
ceiling: the best single latent of the whole SAE for the class and for each planted attribute.
A ceiling below 0.9 means no categorization rule can meet that bar on this SAE. Last line: the
totals and whether every biased class ranks above every unbiased one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conceptscope_cli.dictionary.sparse import LatentMatrix  # noqa: E402
from conceptscope_cli.example import world as W  # noqa: E402
from conceptscope_cli.example.tiny_clip import auroc  # noqa: E402
from conceptscope_cli.project import Project  # noqa: E402

PLANTED_AUROC = 0.8  # a claim "detects" a planted attribute at this AUROC (the precision bar)
DETECTOR_AUROC = 0.9  # a planted bias / a class is "found" at this AUROC (the recall bars)


def parse_bias(text: str) -> W.PlantedBias:
    """CLASS:ATTRIBUTE=VALUE:RATE, e.g. square:background=grass:0.85."""
    try:
        class_name, assignment, rate = text.split(":")
        attribute, value = assignment.split("=")
        return W.PlantedBias(class_name, attribute, value, float(rate))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected CLASS:ATTRIBUTE=VALUE:RATE, e.g. square:background=grass:0.85") from None


def make(out_dir: Path, seed: int, biases: list[W.PlantedBias]) -> None:
    config = W.WorldConfig(seed=seed, biases=tuple(biases))
    info = W.generate_world(out_dir, config)
    print(f"wrote {out_dir}: {info['splits']} images, planted {info['planted_biases'] or 'nothing'}")


def score(project_dir: Path, dataset: str | None) -> dict:
    """The per-class figures printed by `score`, as a dict (class -> row), plus "summary"."""
    project = Project.open(project_dir)
    name, cfg = project.dataset(dataset)
    data = project.manifest.resolve_path(cfg.path)
    world = W.load_world_info(data)
    outputs = project.outputs_dir / name
    split = project.split(cfg, None)
    categorization = json.loads((outputs / f"{split}_concept_categorization.json").read_text())
    concept = json.loads((outputs / split / "concept_dict.json").read_text())
    planted: dict[str, list[tuple[str, str]]] = {}
    for bias in world["planted_biases"]:
        planted.setdefault(bias["class"], []).append((bias["attribute"], bias["value"]))
    rows: dict = {}
    with LatentMatrix(project.cache.lookup("latents", concept["meta"]["latents_entry"]).path / "latents.h5") as matrix:
        dense = matrix.row_block(0, matrix.n_images)  # (N, m): a generated world's split is small
        live = np.flatnonzero(dense.any(axis=0))
        truths: dict[tuple[str, str], np.ndarray] = {}

        def truth(attribute: str, value: str) -> np.ndarray:  # read once per attribute value
            if (attribute, value) not in truths:
                truths[attribute, value] = W.ground_truth(data, split, attribute, value)[matrix.row_index]
            return truths[attribute, value]

        def activation(entry: dict) -> np.ndarray:
            return dense[:, entry.get("members", [entry["latent"]])].sum(axis=1)

        def ceiling(target: np.ndarray) -> float:
            return max(auroc(dense[:, j], target) for j in live)

        for class_name, entry in categorization["classes"].items():
            attrs = planted.get(class_name, [])
            # (claims, planted attributes of the class): each claim's AUROC for each of them
            claim_aurocs = np.array([[auroc(activation(e), truth(a, v)) for a, v in attrs] for e in entry["bias"]])
            claim_aurocs = claim_aurocs.reshape(len(entry["bias"]), len(attrs))
            is_class = truth("class_name", class_name)
            rows[class_name] = {
                "planted": [f"{a}={v}" for a, v in attrs],
                "claims": len(entry["bias"]),
                "false": int((claim_aurocs.max(axis=1, initial=0.0) < PLANTED_AUROC).sum()),
                "best_claim": {f"{a}={v}": float(claim_aurocs[:, i].max(initial=0.0)) for i, (a, v) in enumerate(attrs)},
                "best_target": max((auroc(activation(e), is_class) for e in entry["target"]), default=0.0),
                "ceiling_class": ceiling(is_class),
                "ceiling_planted": {f"{a}={v}": ceiling(truth(a, v)) for a, v in attrs},
            }
    ranking = categorization["ranking"]
    biased = [c for c in ranking if c in planted]
    unbiased = [c for c in ranking if c not in planted]
    rows["summary"] = {
        "claims": sum(r["claims"] for r in rows.values()),
        "false": sum(r["false"] for r in rows.values()),
        "false_in_unbiased": sum(rows[c]["false"] for c in unbiased),
        "planted_found": sum(s >= DETECTOR_AUROC for c in biased for s in rows[c]["best_claim"].values()),
        "planted": sum(len(v) for v in planted.values()),
        "ranking": ranking,
        "biased_rank_first": not biased or not unbiased
        or max(ranking.index(c) for c in biased) < min(ranking.index(c) for c in unbiased),
    }
    return rows


def print_score(rows: dict) -> None:
    print(f"{'class':10s} {'planted':22s} {'claims':>6s} {'false':>5s}  best claim per planted   "
          f"best target  ceiling: class, planted")
    for class_name, r in rows.items():
        if class_name == "summary":
            continue
        fmt = lambda d: ", ".join(f"{k.split('=')[1]} {v:.2f}" for k, v in d.items()) or "-"  # noqa: E731
        print(f"{class_name:10s} {', '.join(r['planted']) or '-':22s} {r['claims']:6d} {r['false']:5d}  "
              f"{fmt(r['best_claim']):24s} {r['best_target']:11.3f}  {r['ceiling_class']:.3f}, {fmt(r['ceiling_planted'])}")
    s = rows["summary"]
    print(f"claims {s['claims']}, detecting no planted attribute {s['false']} ({s['false_in_unbiased']} in unbiased "
          f"classes); planted found {s['planted_found']}/{s['planted']}; ranking {s['ranking']}, biased classes "
          f"first: {s['biased_rank_first']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="write a world with the given planted biases")
    p_make.add_argument("out_dir", type=Path)
    p_make.add_argument("--seed", type=int, default=7)
    p_make.add_argument("--bias", type=parse_bias, action="append", default=[],
                        help="CLASS:ATTRIBUTE=VALUE:RATE (repeat); none: an unbiased world")
    p_score = sub.add_parser("score", help="score a project's categorization against its world's ground truth")
    p_score.add_argument("project_dir", type=Path)
    p_score.add_argument("--dataset", default=None)
    p_score.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.out_dir, args.seed, args.bias)
    else:
        rows = score(args.project_dir, args.dataset)
        print(json.dumps(rows, indent=2)) if args.json else print_score(rows)


if __name__ == "__main__":
    main()
