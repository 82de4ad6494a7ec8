"""The README's example figures, computed from an example run (so they cannot go stale).

    python -m conceptscope_cli.pipeline.figures              # init + run the example in a temp dir, print
    python -m conceptscope_cli.pipeline.figures DIR          # from an example project already run
    python -m conceptscope_cli.pipeline.figures DIR --write  # also replace the block in README.md

The block between `<!-- example-figures:begin -->` and `<!-- example-figures:end -->` in
README.md is exactly `render(example_figures(project))`; tests/test_example_run.py checks it
against the example run it makes, so a change of the method fails the test until the README
is regenerated with this command.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from conceptscope_cli import numerics

BEGIN, END = "<!-- example-figures:begin -->", "<!-- example-figures:end -->"


def example_figures(project_dir: Path) -> dict[str, Any]:
    """Planted biases found (best bias-list latent by AUROC for the context, its rank), each
    class's best target latent (AUROC for the class), bias-discovery precision@k and the SAE."""
    from conceptscope_cli.artifacts import Categorization, ConceptDict, ValidLatents
    from conceptscope_cli.categorize.stage import evaluate_bias_discovery
    from conceptscope_cli.dictionary.sparse import LatentMatrix
    from conceptscope_cli.example.tiny_clip import auroc
    from conceptscope_cli.example.world import ground_truth, load_world_info
    from conceptscope_cli.project import Project

    project = Project.open(project_dir)
    world = project_dir / "data" / "world"
    outputs = project_dir / "outputs" / "world"
    classes = Categorization.load(outputs, "train").classes
    concept = ConceptDict.load(outputs / "train")
    valid = ValidLatents.load(outputs / "train")
    entry = project.cache.lookup("latents", concept.meta["latents_entry"])
    assert entry is not None, "run the example first"
    biases, targets = [], {}
    with LatentMatrix(entry.path / "latents.h5") as matrix:
        def scores(class_name: str, kind: str, attribute: str, value: str) -> list[tuple[int, float]]:
            truth = ground_truth(world, "train", attribute, value)[matrix.row_index]
            return [(int(e["latent"]), float(auroc(matrix.column(e["latent"]), truth))) for e in classes[class_name][kind]]

        for bias in load_world_info(world)["planted_biases"]:
            found = scores(bias["class"], "bias", bias["attribute"], bias["value"])
            best = max(range(len(found)), key=lambda i: found[i][1]) if found else None
            chosen: dict[str, Any] = classes[bias["class"]]["bias"][best] if best is not None else {}
            biases.append({"class": bias["class"], "context": bias["value"], "n_bias": len(found),
                           "latent": found[best][0] if best is not None else None,
                           "auroc": found[best][1] if best is not None else None,
                           "rank": best + 1 if best is not None else None,
                           **{k: chosen.get(k) for k in ("effect", "effect_low", "effect_high", "q_value")}})
        for class_name in classes:
            found = scores(class_name, "target", "class_name", class_name)
            targets[class_name] = max((s for _, s in found), default=None)
    report = evaluate_bias_discovery(project, None, None)
    (sae,) = [e for e in project.cache.entries() if e.kind == "sae" and e.key == concept.meta.get("sae_entry")]
    ev = sae.record["stats"]["eval"]
    ranking = sorted(classes, key=lambda c: classes[c].get("evidence", {}).get("rank", len(classes)))
    return {"biases": biases, "targets": targets, "n_bias": {c: len(v["bias"]) for c, v in classes.items()},
            "ranking": ranking, "precision": report["precision_at_k"], "k": report["meta"]["k"],
            "per_context": {k.split("=", 1)[1]: v["precision"] for k, v in report["per_context"].items()},
            "n_valid": len(valid.valid_latents), "n_latents": concept.n_latents,
            "sae": {"architecture": sae.record["summary"]["architecture"], **{k: ev[k] for k in ("fvu", "l0", "dead_fraction")}}}


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def render(figures: dict[str, Any]) -> str:
    """The README block (markdown), from `example_figures`."""
    lines = ["| planted bias | best latent of the class's bias list | its AUROC for the context | its effect [95% CI], q "
             "| its rank in the bias list |",
             "|---|---|---|---|---|"]
    for b in figures["biases"]:
        latent = f"#{b['latent']}" if b["latent"] is not None else "none (empty bias list)"
        rank = f"{b['rank']} of {b['n_bias']}" if b["rank"] is not None else "—"
        effect = (f"{b['effect']:.2f} [{b['effect_low']:.2f}, {b['effect_high']:.2f}], {b['q_value']:.0e}"
                  if None not in (b.get("effect"), b.get("effect_low"), b.get("effect_high"), b.get("q_value")) else "—")
        lines.append(f"| {b['class']} — {b['context']} | {latent} | {_f(b['auroc'])} | {effect} | {rank} |")
    targets = ", ".join(f"{c} {_f(v)}" for c, v in figures["targets"].items())
    contexts = ", ".join(f"{c} {_f(v)}" for c, v in figures["per_context"].items())
    sae = figures["sae"]
    lines += ["", f"Best target latent of each class, AUROC for the class: {targets}.",
              f"Bias-discovery precision@{figures['k']} on the balanced test split: {_f(figures['precision'])} "
              f"({contexts}).",
              "Bias concepts reported per class: " + ", ".join(f"{c} {n}" for c, n in figures["n_bias"].items())
              + "; classes ranked by evidence of bias: " + " > ".join(figures["ranking"]) + ".",
              f"{figures['n_valid']} valid latents of {figures['n_latents']}; SAE ({sae['architecture']}) held-out "
              f"FVU {sae['fvu']:.3f}, L0 {sae['l0']:.1f}, dead fraction {sae['dead_fraction']:.3f}."]
    return "\n".join(lines)


def readme_block(readme: Path, begin: str = BEGIN, end: str = END) -> str:
    """The current generated block of README.md between `begin` and `end` (without the markers)."""
    match = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), readme.read_text(encoding="utf-8"), flags=re.S)
    if match is None:
        raise ValueError(f"{readme} has no {begin} ... {end} block")
    return match.group(1)


def write_readme(readme: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    text = readme.read_text(encoding="utf-8")
    readme_block(readme, begin, end)  # a README without the block is an error, not a silent no-op
    new = re.sub(re.escape(begin) + r"\n.*?\n" + re.escape(end), lambda _: f"{begin}\n{block}\n{end}", text, flags=re.S)
    readme.write_text(new, encoding="utf-8")


def _run_example(root: Path) -> Path:
    from conceptscope_cli.pipeline.init import init_project
    from conceptscope_cli.pipeline.run import run_pipeline
    from conceptscope_cli.progress import NullReporter
    from conceptscope_cli.project import Project

    init_project(root / "demo", example=True)
    run_pipeline(Project.open(root / "demo"), None, reporter=NullReporter())
    return root / "demo"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The README's example figures, from an example run.")
    parser.add_argument("project", nargs="?", type=Path, help="an example project already run (default: make one)")
    parser.add_argument("--write", action="store_true", help="replace the generated block of --readme")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[2] / "README.md")
    args = parser.parse_args(argv)
    numerics.apply()  # before numpy and torch load (the README's blocks: CSCOPE_NUMERICS=portable)
    with tempfile.TemporaryDirectory(prefix="cscope-figures-") as tmp:
        project = args.project.resolve() if args.project else _run_example(Path(tmp))
        block = render(example_figures(project))
    print(block)
    if args.write:
        write_readme(args.readme, block)
        print(f"wrote {args.readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
