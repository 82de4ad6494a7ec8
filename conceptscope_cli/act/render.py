"""Terminal tables of the act commands (rich), kept out of cli/app.py."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _ci(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"[{low:+.3f}, {high:+.3f}]"


def print_groups(console: Console, result: Any) -> None:
    table = Table(title=f"bias groups on {result.dataset}/{result.split} ({len(result.labels)} images; "
                        f"claims from {result.claims_split})", title_justify="left")
    for column in ("bias claim", "threshold", "J", "y∧c aligned", "y∧¬c conflicting", "other∧c", "other∧¬c"):
        table.add_column(column, justify="left" if column == "bias claim" else "right")
    for item in result.claims:
        sizes = item.role_sizes()
        table.add_row(item.claim.label_text, f"{item.cut.threshold:.4g}", f"{item.cut.j:.2f}", str(sizes["aligned"]),
                      str(sizes["conflicting"]), str(sizes["other_with"]), str(sizes["other_without"]))
    console.print(table)
    state = "[dim]up to date:[/] " if result.up_to_date else "[green]wrote[/] "
    console.print(f"{state}{result.out_dir}/{{groups.csv, groups.parquet, groups.json, manifest.csv, "
                  f"balanced_subset.csv}} ({len(result.subset)} images in the balanced subset)")


def print_check(console: Console, report: dict[str, Any]) -> None:
    meta = report["meta"]
    table = Table(title=f"{meta['model']['kind']} model on {meta['dataset']}/{meta['split']}: accuracy "
                        f"{report['accuracy']:.3f}, worst group {report['worst_group']['accuracy']:.3f} "
                        f"({report['worst_group']['group']}, n={report['worst_group']['n']})", title_justify="left")
    for column in ("bias claim", "acc y∧c (n)", "acc y∧¬c (n)", "gap (CI)", "acc other∧¬c (n)", "acc other∧c (n)",
                   "other gap (CI)", "verdict"):
        table.add_column(column, justify="left" if column in ("bias claim", "verdict") else "right")

    def acc(value: float | None, n: int) -> str:
        return "-" if value is None else f"{value:.3f} ({n})"

    for bias in report["biases"]:
        g, o = bias["gap"], bias["other_gap"]
        table.add_row(bias["label"], acc(g["accuracy_aligned"], g["n_aligned"]),
                      acc(g["accuracy_conflicting"], g["n_conflicting"]),
                      "-" if g["gap"] is None else f"{g['gap']:+.3f} {_ci(g['low'], g['high'])}",
                      acc(o["accuracy_aligned"], o["n_aligned"]), acc(o["accuracy_conflicting"], o["n_conflicting"]),
                      "-" if o["gap"] is None else f"{o['gap']:+.3f} {_ci(o['low'], o['high'])}", bias["verdict"])
    console.print(table)


def print_diff(console: Console, report: dict[str, Any]) -> None:
    meta = report["meta"]
    table = Table(title=f"bias diff {meta['a']['label']} → {meta['b']['label']} (same SAE)", title_justify="left")
    for column in ("class", "concept", "in A", "in B", "effect A (CI)", "effect B (CI)", "change (CI)", "status"):
        table.add_column(column, justify="right" if column.startswith(("effect", "change")) else "left")

    def eff(side: dict[str, Any] | None) -> str:
        if not side or side.get("effect") is None:
            return "-"
        return f"{side['effect']:.2f} {_ci(side.get('low'), side.get('high'))}"

    for row in report["biases"]:
        change = row["change"]
        table.add_row(row["class"], row["concept_label"], "bias" if row["in_a"] else "-", "bias" if row["in_b"] else "-",
                      eff(row["a"]), eff(row["b"]),
                      "-" if change["delta"] is None else f"{change['delta']:+.2f} {_ci(change['low'], change['high'])}",
                      row["status"])
    console.print(table)
    counts = report["counts"]
    console.print(", ".join(f"{k}: {v}" for k, v in counts.items()))
