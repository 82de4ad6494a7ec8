"""The README's quick tour of `cscope groups`, `check-model` and `diff`, computed on an example run.

    python -m conceptscope_cli.pipeline.tour DIR          # from an example project already run: print
    python -m conceptscope_cli.pipeline.tour DIR --write  # also replace the block in README.md

Runs on DIR (each a no-op when its outputs are current, as the commands are): `cscope groups`
on train and test, `cscope check-model` (probe) and `--model zeroshot`, `cscope categorize
--split test` and `cscope diff train test`, then renders their results for the rows of the
planted biases. The block between `<!-- act-tour:begin -->` and `<!-- act-tour:end -->` in
README.md is exactly `render(tour_figures(project))`; tests/test_act_example.py checks it
against the example run it makes, so the README cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conceptscope_cli import numerics
from conceptscope_cli.pipeline.figures import readme_block, write_readme

if TYPE_CHECKING:  # numpy loads in the functions: `main` sets CSCOPE_NUMERICS's variables first
    import numpy as np

BEGIN, END = "<!-- act-tour:begin -->", "<!-- act-tour:end -->"


def _worst_class_agreement(present: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> float:
    import numpy as np

    return min(float((present[labels == y] == truth[labels == y]).mean()) for y in np.unique(labels))


def tour_figures(project_dir: Path) -> dict[str, Any]:
    """Every figure of the tour. The rows shown are, per planted bias of the world, the claim of its
    class whose "present" column agrees best with the world's attribute on train (worst class)."""
    from conceptscope_cli.act.check import check_model
    from conceptscope_cli.act.claims import categorization_path
    from conceptscope_cli.act.diff import diff_categorizations
    from conceptscope_cli.act.groups import compute_groups
    from conceptscope_cli.categorize.stage import categorize
    from conceptscope_cli.example.world import ground_truth, load_world_info
    from conceptscope_cli.progress import NullReporter
    from conceptscope_cli.project import Project

    project = Project.open(project_dir)
    world = project_dir / "data" / "world"
    train = compute_groups(project, None, "train")
    test = compute_groups(project, None, "test")
    chosen = []
    for bias in load_world_info(world)["planted_biases"]:
        truth = ground_truth(world, "train", bias["attribute"], bias["value"])[train.row_index]
        scored = [(_worst_class_agreement(item.present, truth, train.labels), i) for i, item in
                  enumerate(train.claims) if item.claim.class_name == bias["class"]]
        if scored:
            agreement, i = max(scored, key=lambda s: (s[0], -s[1]))
            chosen.append({"planted": f"{bias['class']}-{bias['value']}", "key": train.claims[i].claim.key,
                           "agreement": agreement, "train_roles": train.claims[i].role_sizes()})
    keys = [c["key"] for c in chosen]
    by_key = {item.claim.key: item for item in test.claims}
    groups_rows = [{"label": by_key[k].claim.label_text, "threshold": by_key[k].cut.threshold, "j": by_key[k].cut.j,
                    **by_key[k].role_sizes()} for k in keys if k in by_key]
    probe, _ = check_model(project, model="probe")
    zeroshot, _ = check_model(project, model="zeroshot")
    if not categorization_path(project.outputs_dir, test.dataset, "test").is_file():
        categorize(project, None, "test", reporter=NullReporter())
    diff = diff_categorizations(project, "train", "test")

    def check_part(report: dict[str, Any]) -> dict[str, Any]:
        rows = {b["claim"]: b for b in report["biases"]}
        return {"accuracy": report["accuracy"], "worst": report["worst_group"], "level": report["simultaneous_level"],
                "n_claims": len(report["biases"]), "rows": [rows[k] for k in keys if k in rows],
                "relies": sorted(b["label"] for b in report["biases"] if b["verdict"] == "relies on it")}

    diff_rows = {f"{r['class']}/{r['concept']}": r for r in diff["biases"]}
    return {"n_train": int(len(train.labels)), "n_test": int(len(test.labels)), "n_claims": len(test.claims),
            "chosen": chosen, "groups": groups_rows, "n_subset": int(len(test.subset)),
            "manifest": {str(k): v for k, v in _manifest_sizes(test).items()},
            "probe": check_part(probe), "zeroshot": check_part(zeroshot),
            "diff": {"counts": diff["counts"], "level": diff["meta"]["simultaneous_level"],
                     "rows": [diff_rows[k] for k in keys if k in diff_rows],
                     "grew": sum(r["status"] == "grew" for r in diff["biases"])}}


def _manifest_sizes(groups: Any) -> dict[str, int]:
    import numpy as np

    from conceptscope_cli.act.groups import group_name

    primary: dict[int, Any] = {}
    for item in groups.claims:
        primary.setdefault(item.claim.label, item.claim)
    ids, counts = np.unique(groups.manifest_groups, return_counts=True)
    return {group_name(int(g), groups.class_names, primary.get(int(g) // 2)): int(n) for g, n in zip(ids, counts)}


def _ci(low: float | None, high: float | None) -> str:
    return "—" if low is None or high is None else f"[{low:+.3f}, {high:+.3f}]"


def _acc(value: float | None, n: int) -> str:
    return "—" if value is None else f"{value:.3f} ({n})"


def _check_lines(title: str, part: dict[str, Any]) -> list[str]:
    worst = part["worst"]
    lines = [f"{title}: accuracy {part['accuracy']:.3f}, worst group {worst['accuracy']:.3f} ({worst['group']}, "
             f"n={worst['n']}); intervals simultaneous at level {part['level']:.4f} over the {part['n_claims']} claims; "
             f"\"relies on it\": {', '.join(part['relies']) if part['relies'] else 'none'}.", "",
             "| bias claim | acc y∧c (n) | acc y∧¬c (n) | gap [CI] | verdict |", "|---|---|---|---|---|"]
    for b in part["rows"]:
        g = b["gap"]
        gap = "—" if g["gap"] is None else f"{g['gap']:+.3f} {_ci(g['low'], g['high'])}"
        lines.append(f"| {b['label']} | {_acc(g['accuracy_aligned'], g['n_aligned'])} | "
                     f"{_acc(g['accuracy_conflicting'], g['n_conflicting'])} | {gap} | {b['verdict']} |")
    return lines


def render(figures: dict[str, Any]) -> str:
    """The README block (markdown), from `tour_figures`."""
    def effect(side: dict[str, Any]) -> str:
        return "—" if side.get("effect") is None else f"{side['effect']:+.2f} {_ci(side.get('low'), side.get('high'))}"

    agreement = "; ".join(f"{c['planted']} {c['key']} {c['agreement']:.3f} ({c['train_roles']['aligned']} aligned / "
                          f"{c['train_roles']['conflicting']} conflicting)" for c in figures["chosen"])
    lines = [f"`cscope groups --split test`: {figures['n_test']} images, {figures['n_claims']} claims from train; "
             "the rows of the planted biases (per planted bias, the claim of its class whose \"present\" column "
             "agrees best with the world's attribute on train, worst class):", "",
             "| bias claim | threshold | J | y∧c aligned | y∧¬c conflicting | other∧c | other∧¬c |",
             "|---|---|---|---|---|---|---|"]
    for r in figures["groups"]:
        lines.append(f"| {r['label']} | {r['threshold']:.4g} | {r['j']:.2f} | {r['aligned']} | {r['conflicting']} | "
                     f"{r['other_with']} | {r['other_without']} |")
    lines += ["", f"Agreement of \"present\" with the world's attribute on the {figures['n_train']:,} train images "
              f"(worst class): {agreement}. Manifest groups (class × its strongest claim): "
              + ", ".join(f"{k} {v}" for k, v in figures["manifest"].items())
              + f"; balanced subset {figures['n_subset']} images.", ""]
    lines += _check_lines("`cscope check-model` (a linear probe trained on the biased train split)", figures["probe"])
    lines += [""]
    lines += _check_lines("`cscope check-model --model zeroshot` (the tiny CLIP, trained on an unbiased world)",
                          figures["zeroshot"])
    d = figures["diff"]
    lines += ["", f"`cscope diff train test --fail-on grew`: exit {4 if d['grew'] else 0}; "
              + ", ".join(f"{k} {v}" for k, v in d["counts"].items())
              + f"; change intervals simultaneous at level {d['level']:.4f}.", "",
              "| class | concept | in train | in test | effect train [CI] | effect test [CI] | change [CI] | status |",
              "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        c = r["change"]
        change = "—" if c["delta"] is None else f"{c['delta']:+.2f} {_ci(c['low'], c['high'])}"
        lines.append(f"| {r['class']} | {r['concept_label']} | {'bias' if r['in_a'] else '—'} | "
                     f"{'bias' if r['in_b'] else '—'} | {effect(r['a'])} | {effect(r['b'])} | {change} | {r['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The README's quick tour of groups / check-model / diff.")
    parser.add_argument("project", type=Path, help="an example project already run (cscope init --example; cscope run)")
    parser.add_argument("--write", action="store_true", help="replace the generated block of --readme")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[2] / "README.md")
    args = parser.parse_args(argv)
    numerics.apply()  # before numpy and torch load (the README's blocks: CSCOPE_NUMERICS=portable)
    block = render(tour_figures(args.project.resolve()))
    print(block)
    if args.write:
        write_readme(args.readme, block, BEGIN, END)
        print(f"wrote {args.readme}", file=sys.stderr)


__all__ = ["BEGIN", "END", "render", "tour_figures", "readme_block"]

if __name__ == "__main__":
    main()
