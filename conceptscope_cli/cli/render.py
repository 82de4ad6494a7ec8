"""Human output of each command, and the summary `--json` prints.

Each `show_*` prints what a person reads (to `ui.console`) and returns the machine-readable
summary: what the command did and where its outputs are (paths as strings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from conceptscope_cli.artifacts import Categorization, ConceptDict, ValidLatents
from conceptscope_cli.cache.disk import human_bytes
from conceptscope_cli.cli.ui import console
from conceptscope_cli.errors import CscopeError


def _p(path: Path | str | None) -> str | None:
    return None if path is None else str(path)


def show_init(result: Any, directory: Path, *, ready: bool) -> dict[str, Any]:  # noqa: ANN401
    console.print(f"[green]wrote[/] {escape(str(result.manifest))}")
    for note in result.notes:
        console.print(f"  {escape(note)}")
    console.print(f"next: [bold]cd {escape(str(directory))} && cscope run[/]" if ready
                  else "next: edit cscope.toml (\\[datasets.mydata] path), then [bold]cscope run[/]")
    return {"outputs": {"manifest": _p(result.manifest)}, "notes": list(result.notes)}


def summary_of(result: Any) -> dict[str, Any]:  # noqa: ANN401
    """A result object's paths, for commands without a dedicated summary."""
    import dataclasses

    if not dataclasses.is_dataclass(result):
        return {}
    paths = {f.name: str(getattr(result, f.name)) for f in dataclasses.fields(result)
             if isinstance(getattr(result, f.name), Path)}
    return {"outputs": paths}


def show_extract(result: Any) -> dict[str, Any]:  # noqa: ANN401
    record = result.entry.record
    stats = record["stats"]
    what = f"{record['summary']['dataset']}/{record['summary']['split']}"
    if result.reused:
        console.print(f"[dim]up to date:[/] activations for {escape(what)} already cached ({result.entry.key})")
    else:
        console.print(
            f"[green]cached[/] activations for {escape(what)}: {stats['n_images']} images × {stats['n_tokens']} tokens × "
            f"{stats['d_model']} dims, {human_bytes(record['size_bytes'])} → {escape(str(result.entry.path))}"
        )
    if stats["n_skipped"]:
        rows = ", ".join(str(s["row_index"]) for s in stats["skipped"][:10])
        more = " ..." if stats["n_skipped"] > 10 else ""
        console.print(f"[yellow]skipped {stats['n_skipped']} unreadable image(s)[/]: rows {rows}{more} (listed in record.json)")
    return {"up_to_date": result.reused, "key": result.entry.key, "dataset": record["summary"]["dataset"],
            "split": record["summary"]["split"], "n_images": stats["n_images"], "n_skipped": stats["n_skipped"],
            "outputs": {"activations": _p(result.entry.path)}}


def show_import(source: Path, target: Path) -> dict[str, Any]:
    console.print(f"[green]imported[/] {escape(str(source))} → {escape(str(target))}")
    console.print(f"use it with: [bold]\\[dict] sae = \"{escape(str(target))}\"[/] in cscope.toml")
    return {"up_to_date": False, "outputs": {"sae": _p(target)}}


def show_sae(result: Any) -> dict[str, Any]:  # noqa: ANN401
    record = result.entry.record
    ev = record["stats"].get("eval", {})
    status = "[dim]up to date:[/] SAE already trained" if result.reused else "[green]trained[/] SAE"
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, (int, float)))
    console.print(f"{status} ({record['summary']['architecture']}, {record['summary']['d_sae']} latents) → "
                  f"{escape(str(result.path))}")
    if metrics:
        console.print(f"held-out evaluation: {metrics}")
    return {"up_to_date": result.reused, "key": result.entry.key, "architecture": record["summary"]["architecture"],
            "d_sae": record["summary"]["d_sae"], "eval": ev, "outputs": {"sae": _p(result.path)}}


def show_dict(result: Any) -> dict[str, Any]:  # noqa: ANN401
    if result.up_to_date:
        console.print(f"[dim]up to date:[/] concept dictionary in {escape(str(result.out_dir))}")
    else:
        console.print(f"[green]dictionary[/]: {result.n_valid} valid latents of {result.n_latents} → "
                      f"{escape(str(result.out_dir))}")
    if result.unnamed:
        listed = ", ".join(map(str, result.unnamed[:20]))
        raise CscopeError(
            f"{len(result.unnamed)} latent(s) could not be named: {listed}",
            hint="their errors are in concept_dict.json; run `cscope dict` again to retry only them",
        )
    return {"up_to_date": result.up_to_date, "n_valid": result.n_valid, "n_latents": result.n_latents,
            "outputs": {"dictionary": _p(ConceptDict.path(result.out_dir)),
                        "valid_latents": _p(ValidLatents.path(result.out_dir)), "folder": _p(result.out_dir)}}


def categorization_path(result: Any) -> Path:  # noqa: ANN401
    return Categorization.path(result.out_dir.parent, result.categorization["meta"]["split"])


def show_categorization(result: Any) -> dict[str, Any]:  # noqa: ANN401
    classes = result.categorization["classes"]
    order = result.categorization.get("ranking") or list(classes)  # ranked by strength of evidence
    table = Table(title="classes ranked by evidence of bias (effect = Cliff's delta, class vs rest)", title_justify="left")
    for column in ("class", "images", "top target", "bias concepts: effect [CI], q", "context"):
        table.add_column(column)

    def label(entry: dict) -> str:
        return f"{escape(entry['name'] or '#' + str(entry['latent']))} [dim]#{entry['latent']}[/]"

    def bias(entry: dict) -> str:
        if entry.get("effect") is None:
            return label(entry)
        shown = (f"{label(entry)} {entry['effect']:.2f} \\[{entry['effect_low']:.2f}, {entry['effect_high']:.2f}], "
                 f"q {entry['q_value']:.1e}")
        if "replicates" in entry:  # fraction of SAE-seed replicates that make the claim
            shown += f", seeds {entry['replicates']['made_by']}/{entry['replicates']['n']}"
        return shown

    for name in order:
        info = classes[name]
        status = info.get("evidence", {}).get("status", "-")
        table.add_row(
            escape(name), str(info["n_images"]),
            label(info["target"][0]) if info["target"] else "-",
            "\n".join(bias(e) for e in info["bias"][:3]) or f"[dim]{escape(str(status))}[/]",
            str(len(info["context"])),
        )
    console.print(table)
    check = result.categorization["meta"].get("context_check")
    if check:
        console.print(f"context-only check ({escape(str(check['column']))}): {check['n_entangled']} of {check['n_claims']} "
                      "whole-image claims not over-represented without the object, listed as entangled")
    state = "[dim]up to date:[/] " if result.up_to_date else "[green]wrote[/] "
    path = categorization_path(result)
    console.print(f"{state}{escape(str(path))}")
    return {"up_to_date": result.up_to_date, "outputs": {"categorization": _p(path)},
            "ranking": list(order),
            "classes": {name: {"n_images": info["n_images"],
                               "target": [e["latent"] for e in info["target"]],
                               "bias": [e["latent"] for e in info["bias"]],
                               **({"entangled": [e["latent"] for e in info["entangled"]]} if "entangled" in info else {}),
                               "n_context": len(info["context"])} for name, info in classes.items()}}


def show_bias_discovery(report: dict[str, Any]) -> dict[str, Any]:
    value = report["precision_at_k"]
    shown = "n/a (no pair had bias latents)" if value is None else f"{100 * value:.1f}"
    console.print(f"bias discovery precision@{report['meta']['k']} on {escape(str(report['meta']['evaluate_split']))}: "
                  f"[bold]{shown}[/]")
    return {"precision_at_k": value, "k": report["meta"]["k"], "evaluate_split": report["meta"]["evaluate_split"]}


def show_attribution(result: Any) -> dict[str, Any]:  # noqa: ANN401
    for scores in result.images:
        for p in scores.prompts:
            title = f"{scores.image} · \"{p.prompt}\" · cos {p.similarity:.3f}" + (
                f" · p {p.probability:.2f}" if p.probability is not None else "")
            table = Table(title=escape(title), title_justify="left")
            for column in ("", "latent", "name", "attribution", "activation", "share"):
                table.add_column(column, justify="right" if column not in ("", "name") else "left")
            for sign, rows in (("+", p.top), ("−", p.bottom)):
                for row in rows:
                    table.add_row(sign, str(row.latent), escape(row.name or "-"), f"{row.attribution:+.4f}",
                                  f"{row.activation:.3f}", f"{100 * row.share:.1f}%" if row.share is not None else "-")
            table.caption = f"error term {p.error_term:+.4f}, decoder bias {p.bias_term:+.4f}, total {p.total:+.4f}"
            console.print(table)
        console.print(f"figure: {escape(str(scores.figure))}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"[green]wrote[/] {escape(str(result.json_path))}")
    return {"outputs": {"attribution": _p(result.json_path), "figures": [_p(s.figure) for s in result.images]},
            "sae": _p(result.sae_path), "layer": result.layer, "notes": list(result.notes)}


def show_export(result: Any) -> dict[str, Any]:  # noqa: ANN401
    for item in result.files:
        console.print(f"[green]{item.kind:<10}[/] {escape(str(item.path))}  ({human_bytes(item.size_bytes)})")
    html = result.path("html")
    if html is not None:
        console.print(f"open the report: [bold]{escape(str(html))}[/]")
    return {"up_to_date": result.up_to_date, "outputs": {item.kind: _p(item.path) for item in result.files},
            "folder": _p(result.out_dir)}


def show_faithfulness(result: Any) -> dict[str, Any]:  # noqa: ANN401
    table = Table(title=f"faithfulness over {result.n_images} images (area under the mean curve)", title_justify="left")
    for column in ("ranking", "deletion area (lower = more faithful)", "insertion area (higher = more faithful)"):
        table.add_column(column)
    areas = {}
    for ranking, curves in result.rankings.items():
        d, i = curves["deletion"], curves["insertion"]
        table.add_row(ranking, f"{d.area:.4f} ± {d.area_ci95:.4f}", f"{i.area:.4f} ± {i.area_ci95:.4f}")
        areas[ranking] = {"deletion": d.area, "insertion": i.area}
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"[green]wrote[/] {escape(str(result.json_path))}, {escape(str(result.csv_path))}, "
                  f"{escape(str(result.plot_path))}")
    return {"n_images": result.n_images, "areas": areas,
            "outputs": {"json": _p(result.json_path), "csv": _p(result.csv_path), "plot": _p(result.plot_path)}}


def show_class_ablation(result: Any) -> dict[str, Any]:  # noqa: ANN401
    shown = [c for c in ("unspliced", "spliced", "zero_top1", "zero_top10", "zero_bias", "zero_random_context")
             if c in result.conditions]
    table = Table(title="zero-shot accuracy per class", title_justify="left")
    table.add_column("class")
    for condition in shown:
        table.add_column(condition, justify="right")
    table.add_column("bias drop vs random", justify="right")
    contrast = result.bias_vs_random()
    for name, info in result.classes.items():
        drops = contrast.get(name)
        table.add_row(escape(name), *[f"{info.accuracy[c]:.3f}" for c in shown],
                      f"{drops[0]:+.3f} vs {drops[1]:+.3f}" if drops else "-")
    console.print(table)
    console.print(f"[green]wrote[/] {escape(str(result.json_path))}")
    return {"outputs": {"json": _p(result.json_path), "csv": _p(result.csv_path), "plot": _p(result.plot_path)},
            "accuracy": {name: dict(info.accuracy) for name, info in result.classes.items()}}


def show_edit(result: Any) -> dict[str, Any]:  # noqa: ANN401
    for item in result.images:
        table = Table(title=escape(f"{item.image}: prediction {item.prediction_before} → {item.prediction_after}"),
                      title_justify="left")
        for column in ("prompt", "cos before", "cos after", "change", "p before", "p after"):
            table.add_column(column, justify="left" if column == "prompt" else "right")
        for p in item.prompts:
            table.add_row(escape(p.prompt), f"{p.similarity_before:.4f}", f"{p.similarity_after:.4f}",
                          f"{p.similarity_change:+.4f}", f"{p.probability_before:.3f}", f"{p.probability_after:.3f}")
        console.print(table)
        console.print(f"figure: {escape(str(item.figure))}")
    return {"outputs": {"json": _p(result.json_path), "figures": [_p(item.figure) for item in result.images]},
            "predictions": {str(item.image): [item.prediction_before, item.prediction_after] for item in result.images}}


def show_run(outcomes: list[Any]) -> dict[str, Any]:  # noqa: ANN401
    for outcome in outcomes:
        style = "dim" if outcome.up_to_date else "green"
        status = "up to date" if outcome.up_to_date else "done"
        console.print(f"[{style}]{outcome.stage:<10} {status:<11}[/] {escape(outcome.detail)}")
    for outcome in outcomes:
        if outcome.stage == "categorize" and outcome.result is not None and not outcome.up_to_date:
            show_categorization(outcome.result)
    if all(o.up_to_date for o in outcomes):
        console.print("[dim]every stage is up to date; nothing to do[/]")
    return {"up_to_date": all(o.up_to_date for o in outcomes),
            "stages": [{"stage": o.stage, "up_to_date": o.up_to_date, "detail": o.detail,
                        "outputs": {k: _p(v) for k, v in o.outputs.items()}} for o in outcomes]}


def show_plan(plans: list[Any]) -> dict[str, Any]:  # noqa: ANN401
    """`cscope run --dry-run`: per stage, whether it would run and why."""
    for plan in plans:
        style = "dim" if plan.up_to_date else "yellow"
        status = "up to date" if plan.up_to_date else "would run"
        console.print(f"[{style}]{plan.stage:<10} {status:<11}[/] {escape(plan.target)}: {escape(plan.reason)}")
        for change in plan.changes:
            console.print(f"{'':<23}[dim]changed:[/] {escape(change)}")
    return {"dry_run": True, "up_to_date": all(p.up_to_date for p in plans),
            "stages": [{"stage": p.stage, "target": p.target, "up_to_date": p.up_to_date, "reason": p.reason,
                        "changes": list(p.changes), "key": p.key} for p in plans]}


def show_cache(root: Path, entries: list[Any], partials: list[Path]) -> dict[str, Any]:  # noqa: ANN401
    table = Table(title=escape(f"cache: {root}"), title_justify="left")
    for column in ("kind", "key", "size", "finished", "made from"):
        table.add_column(column)
    total = 0
    for entry in entries:
        record = entry.record
        total += record.get("size_bytes", 0)
        summary = ", ".join(f"{k}={v}" for k, v in record.get("summary", {}).items())
        table.add_row(entry.kind, entry.key, human_bytes(record.get("size_bytes", 0)), record.get("finished", ""),
                      escape(summary))
    partial_total = 0
    for partial in partials:
        size = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
        partial_total += size
        table.add_row(partial.parent.name, partial.name.removesuffix(".partial"), human_bytes(size),
                      "[yellow]incomplete[/]", "resumes on the next run")
    console.print(table)
    extra = f" (+ {human_bytes(partial_total)} in incomplete entries)" if partial_total else ""
    console.print(f"{len(entries)} entries, {human_bytes(total)}{extra}")
    return {"root": _p(root), "size_bytes": total, "incomplete_bytes": partial_total,
            "entries": [{"kind": e.kind, "key": e.key, "path": _p(e.path), "size_bytes": e.record.get("size_bytes", 0),
                         "finished": e.record.get("finished"), "summary": e.record.get("summary", {})} for e in entries],
            "incomplete": [_p(p) for p in partials]}
