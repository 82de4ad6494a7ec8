"""The `cscope` command line: parse flags, open the project, call one function.

The science and I/O live elsewhere; this layer only wires options (each documented with
the manifest key it overrides) to library calls and renders results.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, cast

import typer

from conceptscope_cli import __version__
from conceptscope_cli.cli.ui import console, err_console, human_bytes, progress_reporter, render_error
from conceptscope_cli.errors import CscopeError

if TYPE_CHECKING:
    from conceptscope_cli.attribute.core import Objective

app = typer.Typer(
    name="cscope",
    help="Find and measure dataset bias in vision data with sparse autoencoders on CLIP activations.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect and clean the shared cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
ablate_app = typer.Typer(help="Remove or edit concepts inside CLIP and measure what changes.", no_args_is_help=True)
app.add_typer(ablate_app, name="ablate")


class _State:
    project_dir: Path | None = None
    debug: bool = False
    strict: bool = False


state = _State()


def _version(value: bool) -> None:
    if value:
        console.print(f"cscope {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    project: Optional[Path] = typer.Option(
        None, "--project", "-C", help="Project directory (default: nearest cscope.toml above the working directory).",
        envvar="CSCOPE_PROJECT",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    strict: bool = typer.Option(
        False, "--strict", envvar="CSCOPE_STRICT",
        help="Treat result warnings (0 valid latents, FVU > 0.5, > 50% dead latents, a class without candidates) "
             "as errors: exit 1 after the command."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    state.project_dir = project
    state.debug = debug
    state.strict = strict


def open_project():  # noqa: ANN201 - returns conceptscope_cli.project.Project (imported lazily for a fast --help)
    from conceptscope_cli.project import Project

    return Project.open(state.project_dir)


# --------------------------------------------------------------------------- init


@app.command()
def init(
    directory: Path = typer.Argument(Path("."), help="Project directory to create or fill."),
    example: bool = typer.Option(False, "--example", help="Create the embedded example project (planted-bias world, tiny CLIP)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing cscope.toml."),
    dataset: Optional[Path] = typer.Option(
        None, "--dataset", help="An image folder to describe: splits, labels (class folders or a metadata column) "
                                "and attribute columns are detected and written into the manifest."),
    model: Optional[str] = typer.Option(
        None, "--model", envvar="CSCOPE_MODEL",
        help="Backbone to write as \\[backbone] model (e.g. example:tiny-clip, ViT-B-16, hf-hub:ORG/REPO)."),
) -> None:
    """Write a commented [bold]cscope.toml[/] and lay out the project directory."""
    from conceptscope_cli.pipeline.init import init_project

    result = init_project(directory, example=example, force=force, dataset=dataset, model=model)
    console.print(f"[green]wrote[/] {result.manifest}")
    for note in result.notes:
        console.print(f"  {note}", markup=False)
    ready = example or dataset is not None
    console.print(f"next: [bold]cd {directory} && cscope run[/]" if ready
                  else "next: edit cscope.toml (\\[datasets.mydata] path), then [bold]cscope run[/]")


# --------------------------------------------------------------------------- extract


@app.command()
def extract(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset name ([datasets.NAME]); default [run] dataset or the only one."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split; default the dataset's first split."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass ([extract] batch_size, default 64)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N rows ([extract] limit)."),
    tokens_per_image: Optional[int] = typer.Option(
        None, "--tokens-per-image", help="Keep K random patch tokens + CLS per image, seeded ([extract] tokens_per_image)."
    ),
    layer: Optional[int] = typer.Option(None, "--layer", help="Block whose output is cached ([backbone] layer, default -2)."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Rows per shard, the unit of resume ([extract] shard_size, default 2048)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Image-decoding workers ([project] num_workers, default 2)."),
    force: bool = typer.Option(False, "--force", help="Write even when the disk plan says it will not fit."),
) -> None:
    """Run the CLIP backbone over a split and cache one layer's activations (HDF5)."""
    from conceptscope_cli.config.sections import BackboneConfig, ExtractConfig, ProjectConfig
    from conceptscope_cli.extract.activations import extract_activations

    project = open_project()
    project.force_disk = force
    project.manifest.override(ExtractConfig, batch_size=batch_size, limit=limit, tokens_per_image=tokens_per_image, shard_size=shard_size)
    project.manifest.override(BackboneConfig, layer=layer)
    project.manifest.override(ProjectConfig, device=device, num_workers=num_workers)
    with progress_reporter() as reporter:
        result = extract_activations(project, dataset, split, reporter=reporter)
    _report_extract(result)


def _report_extract(result) -> None:  # noqa: ANN001
    record = result.entry.record
    stats = record["stats"]
    what = f"{record['summary']['dataset']}/{record['summary']['split']}"
    if result.reused:
        console.print(f"[dim]up to date:[/] activations for {what} already cached ({result.entry.key})")
    else:
        console.print(
            f"[green]cached[/] activations for {what}: {stats['n_images']} images × {stats['n_tokens']} tokens × "
            f"{stats['d_model']} dims, {human_bytes(record['size_bytes'])} → {result.entry.path}"
        )
    if stats["n_skipped"]:
        rows = ", ".join(str(s["row_index"]) for s in stats["skipped"][:10])
        more = " ..." if stats["n_skipped"] > 10 else ""
        console.print(f"[yellow]skipped {stats['n_skipped']} unreadable image(s)[/]: rows {rows}{more} (listed in record.json)")


# --------------------------------------------------------------------------- train


@app.command()
def train(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset whose activations train the SAE."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split; default the dataset's first split."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
    architecture: Optional[str] = typer.Option(None, "--architecture", help="relu | topk | batchtopk ([sae] architecture, default relu)."),
    expansion: Optional[int] = typer.Option(None, "--expansion", help="Latents per input dimension ([sae] expansion, default 32)."),
    k: Optional[int] = typer.Option(None, "--k", help="Active latents per token for topk/batchtopk ([sae] k, default 32)."),
    total_tokens: Optional[int] = typer.Option(None, "--total-tokens", help="Training budget in tokens ([sae] total_tokens)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Tokens per step ([sae] batch_size, default 4096)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate ([sae] lr, default 4e-4)."),
    l1_coefficient: Optional[float] = typer.Option(None, "--l1-coefficient", help="L1 weight for relu ([sae] l1_coefficient, default 8e-5)."),
    import_path: Optional[Path] = typer.Option(
        None, "--import", help="Convert a ConceptScope/PatchSAE .pt or a SAELens folder into cscope's format instead of training."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="With --import: where to write the converted SAE (default outputs/sae-import)."),
    input_scale: Optional[float] = typer.Option(
        None, "--input-scale", help="With --import of a SAELens SAE trained with normalize_activations = "
        "\"expected_average_only_in\": the factor its inputs were multiplied by (folded into the weights)."),
    force: bool = typer.Option(False, "--force", help="Write even when the disk plan says it will not fit."),
) -> None:
    """Train a sparse autoencoder on cached activations (extracting them first if needed)."""
    from conceptscope_cli.config.sections import ProjectConfig, SAEConfig

    project = open_project()
    project.force_disk = force
    if import_path is not None:
        from conceptscope_cli.sae.importing import import_sae

        target = import_sae(import_path, out or project.outputs_dir / "sae-import", input_scale=input_scale)
        console.print(f"[green]imported[/] {import_path} → {target}")
        console.print(f"use it with: [bold][dict] sae = \"{target}\"[/] in cscope.toml")
        return
    project.manifest.override(SAEConfig, architecture=architecture, expansion=expansion, k=k, total_tokens=total_tokens,
                              batch_size=batch_size, lr=lr, l1_coefficient=l1_coefficient)
    project.manifest.override(ProjectConfig, device=device)
    from conceptscope_cli.cli.ui import MetricsTable
    from conceptscope_cli.train.stage import train_stage

    table = MetricsTable()
    with progress_reporter(extra=table) as reporter:
        result = train_stage(project, dataset, split, reporter=reporter, on_metrics=table.update)
    _report_sae(result)


def _report_sae(result) -> None:  # noqa: ANN001
    record = result.entry.record
    ev = record["stats"].get("eval", {})
    status = "[dim]up to date:[/] SAE already trained" if result.reused else "[green]trained[/] SAE"
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, (int, float)))
    console.print(f"{status} ({record['summary']['architecture']}, {record['summary']['d_sae']} latents) → {result.path}")
    if metrics:
        console.print(f"held-out evaluation: {metrics}")


# --------------------------------------------------------------------------- dict


@app.command("dict")
def dict_command(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset ([run] dataset or the only one)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split; default the dataset's first split."),
    namer: Optional[str] = typer.Option(None, "--namer", help="clip | openai | none ([dict] namer, default clip)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
    force: bool = typer.Option(False, "--force", help="Write even when the disk plan says it will not fit."),
) -> None:
    """Build the concept dictionary: image latents, valid latents, reference images, names."""
    from conceptscope_cli.config.sections import DictConfig, ProjectConfig
    from conceptscope_cli.dictionary.stage import build_dictionary

    project = open_project()
    project.force_disk = force
    project.manifest.override(DictConfig, namer=namer)
    project.manifest.override(ProjectConfig, device=device)
    with progress_reporter() as reporter:
        result = build_dictionary(project, dataset, split, reporter=reporter)
    _report_dict(result)


def _report_dict(result) -> None:  # noqa: ANN001
    if result.up_to_date:
        console.print(f"[dim]up to date:[/] concept dictionary in {result.out_dir}")
    else:
        console.print(f"[green]dictionary[/]: {result.n_valid} valid latents of {result.n_latents} → {result.out_dir}")
    if result.unnamed:
        listed = ", ".join(map(str, result.unnamed[:20]))
        raise CscopeError(
            f"{len(result.unnamed)} latent(s) could not be named: {listed}",
            hint="their errors are in concept_dict.json; run `cscope dict` again to retry only them",
        )


# --------------------------------------------------------------------------- categorize


@app.command()
def categorize(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset ([run] dataset or the only one)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split; default the dataset's first split."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Images per class ([categorize] num_samples, default 128)."),
    bias_threshold_sigma: Optional[float] = typer.Option(
        None, "--bias-threshold-sigma", help="Bias rule's sigma ([categorize] bias_threshold_sigma, default 1.0)."
    ),
    target_threshold: Optional[float] = typer.Option(None, "--target-threshold", help="[categorize] target_threshold (default 0.0)."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Also measure bias-discovery precision@k ([categorize] context_classes)."),
    replicates: Optional[int] = typer.Option(
        None, "--replicates", help="Also run N SAEs with other seeds and report the fraction making each bias claim "
        "([categorize] replicates, default 0)."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
) -> None:
    """Per class: alignment scores and target / context / bias concepts."""
    from conceptscope_cli.categorize.stage import categorize as run_categorize
    from conceptscope_cli.categorize.stage import evaluate_bias_discovery
    from conceptscope_cli.config.sections import CategorizeConfig, ProjectConfig

    project = open_project()
    project.manifest.override(CategorizeConfig, num_samples=num_samples, bias_threshold_sigma=bias_threshold_sigma,
                              target_threshold=target_threshold, replicates=replicates)
    project.manifest.override(ProjectConfig, device=device)
    with progress_reporter() as reporter:
        result = run_categorize(project, dataset, split, reporter=reporter)
        report = evaluate_bias_discovery(project, dataset, split, reporter=reporter) if evaluate else None
    print_categorization(result)
    if report is not None:
        value = report["precision_at_k"]
        shown = "n/a (no pair had bias latents)" if value is None else f"{100 * value:.1f}"
        console.print(f"bias discovery precision@{report['meta']['k']} on {report['meta']['evaluate_split']}: [bold]{shown}[/]")


def print_categorization(result) -> None:  # noqa: ANN001
    from rich.table import Table

    classes = result.categorization["classes"]
    order = result.categorization.get("ranking") or list(classes)  # ranked by strength of evidence
    table = Table(title="classes ranked by evidence of bias (effect = Cliff's delta, class vs rest)", title_justify="left")
    for column in ("class", "images", "top target", "bias concepts: effect [CI], q", "context"):
        table.add_column(column)

    def label(entry: dict) -> str:
        return f"{entry['name'] or '#' + str(entry['latent'])} [dim]#{entry['latent']}[/]"

    def bias(entry: dict) -> str:
        if entry.get("effect") is None:
            return label(entry)
        shown = (f"{label(entry)} {entry['effect']:.2f} [{entry['effect_low']:.2f}, {entry['effect_high']:.2f}], "
                 f"q {entry['q_value']:.1e}")
        if "replicates" in entry:  # fraction of SAE-seed replicates that make the claim
            shown += f", seeds {entry['replicates']['made_by']}/{entry['replicates']['n']}"
        return shown

    for name in order:
        info = classes[name]
        status = info.get("evidence", {}).get("status", "-")
        table.add_row(
            name, str(info["n_images"]),
            label(info["target"][0]) if info["target"] else "-",
            "\n".join(bias(e) for e in info["bias"][:3]) or f"[dim]{status}[/]",
            str(len(info["context"])),
        )
    console.print(table)
    state = "[dim]up to date:[/] " if result.up_to_date else "[green]wrote[/] "
    console.print(f"{state}{result.out_dir.parent}/{result.categorization['meta']['split']}_concept_categorization.json")


# --------------------------------------------------------------------------- attribute


@app.command()
def attribute(
    image: list[str] = typer.Option(..., "--image", "-i", help="Image files, folders or glob patterns (repeatable)."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Text prompts (repeatable)."),
    top: int = typer.Option(10, "--top", help="Latents shown per image and prompt."),
    objective: str = typer.Option("cosine", "--objective", help="cosine (image-text similarity) or probability (softmax over the prompts)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default <outputs>/attribute)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset whose concept dictionary names the latents."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split of that dictionary (default: the first)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
) -> None:
    """Which SAE latents drive CLIP's image–text similarity for images and prompts, with heatmaps."""
    from rich.table import Table

    from conceptscope_cli.attribute.run import attribute as run_attribute
    from conceptscope_cli.config.sections import ProjectConfig

    if objective not in ("cosine", "probability"):
        raise CscopeError(f"unknown objective {objective!r}", hint="use cosine or probability")
    project = open_project()
    project.manifest.override(ProjectConfig, device=device)
    with progress_reporter() as reporter:
        result = run_attribute(project, image, prompt, top_k=top, out_dir=out, objective=cast("Objective", objective), dataset=dataset,
                               split=split, reporter=reporter)
    for scores in result.images:
        for p in scores.prompts:
            table = Table(title=f"{scores.image} · \"{p.prompt}\" · cos {p.similarity:.3f}"
                          + (f" · p {p.probability:.2f}" if p.probability is not None else ""), title_justify="left")
            for column in ("", "latent", "name", "attribution", "activation", "share"):
                table.add_column(column, justify="right" if column not in ("", "name") else "left")
            for label, rows in (("+", p.top), ("−", p.bottom)):
                for row in rows:
                    table.add_row(label, str(row.latent), row.name or "-", f"{row.attribution:+.4f}",
                                  f"{row.activation:.3f}", f"{100 * row.share:.1f}%" if row.share is not None else "-")
            table.caption = f"error term {p.error_term:+.4f}, decoder bias {p.bias_term:+.4f}, total {p.total:+.4f}"
            console.print(table)
        console.print(f"figure: {scores.figure}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[green]wrote[/] {result.json_path}")


# --------------------------------------------------------------------------- export


@app.command()
def export(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset ([run] dataset or the only one)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split; default the dataset's first split."),
    formats: Optional[str] = typer.Option(None, "--format", help="Comma-separated: html,csv,json,saelens ([export] formats)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder ([export] out_dir, default <outputs>/report/<dataset>/<split>)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
) -> None:
    """A self-contained HTML report, CSV/JSON tables, and the SAE in SAELens and cscope formats."""
    from conceptscope_cli.cli.ui import human_bytes as size
    from conceptscope_cli.config.sections import ProjectConfig
    from conceptscope_cli.export.stage import export as run_export

    project = open_project()
    project.manifest.override(ProjectConfig, device=device)
    chosen = [f.strip() for f in formats.split(",") if f.strip()] if formats else None
    with progress_reporter() as reporter:
        result = run_export(project, dataset, split, formats=chosen, out_dir=out, device=device, reporter=reporter)
    for item in result.files:
        console.print(f"[green]{item.kind:<10}[/] {item.path}  ({size(item.size_bytes)})")
    html = result.path("html")
    if html is not None:
        console.print(f"open the report: [bold]{html}[/]")


# --------------------------------------------------------------------------- ablate


def _ablate_config(project, split, max_images, batch_size):  # noqa: ANN001, ANN202
    from conceptscope_cli.config.sections import AblateConfig

    return project.manifest.override(AblateConfig, split=split, max_images=max_images, batch_size=batch_size)


@ablate_app.command("faithfulness")
def ablate_faithfulness(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset ([run] dataset or the only one)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split ([ablate] split, default the dataset's last)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Only the first N images ([ablate] max_images)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="[ablate] batch_size (default 32)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
) -> None:
    """Deletion / insertion curves of y = cos(image, class prompt) per latent ranking."""
    from rich.table import Table

    from conceptscope_cli.ablate.faithfulness import faithfulness

    project = open_project()
    config = _ablate_config(project, split, max_images, batch_size)
    with progress_reporter() as reporter:
        result = faithfulness(project, dataset, None, config=config, device=device, reporter=reporter)
    table = Table(title=f"faithfulness over {result.n_images} images (area under the mean curve)", title_justify="left")
    for column in ("ranking", "deletion area (lower = more faithful)", "insertion area (higher = more faithful)"):
        table.add_column(column)
    for ranking, curves in result.rankings.items():
        d, i = curves["deletion"], curves["insertion"]
        table.add_row(ranking, f"{d.area:.4f} ± {d.area_ci95:.4f}", f"{i.area:.4f} ± {i.area_ci95:.4f}")
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[green]wrote[/] {result.json_path}, {result.csv_path}, {result.plot_path}")


@ablate_app.command("classes")
def ablate_classes(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset ([run] dataset or the only one)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split ([ablate] split, default the dataset's last)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Only the first N images ([ablate] max_images)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="[ablate] batch_size (default 32)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
) -> None:
    """Per-class zero-shot accuracy with each class's top-k / target / bias latents kept or zeroed."""
    from rich.table import Table

    from conceptscope_cli.ablate.classes import class_ablation

    project = open_project()
    config = _ablate_config(project, split, max_images, batch_size)
    with progress_reporter() as reporter:
        result = class_ablation(project, dataset, None, config=config, device=device, reporter=reporter)
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
        table.add_row(name, *[f"{info.accuracy[c]:.3f}" for c in shown],
                      f"{drops[0]:+.3f} vs {drops[1]:+.3f}" if drops else "-")
    console.print(table)
    console.print(f"[green]wrote[/] {result.json_path}")


@ablate_app.command("edit")
def ablate_edit(
    image: list[str] = typer.Option(..., "--image", "-i", help="Image files, folders or globs (repeatable)."),
    latent: list[int] = typer.Option(..., "--latent", "-l", help="Latent to edit (repeatable)."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompts whose similarity is reported (repeatable)."),
    scale: Optional[float] = typer.Option(None, "--scale", help="Set each latent to SCALE × its maximum observed image-level value."),
    value: Optional[float] = typer.Option(None, "--value", help="Set each latent to this value (neither: zero it)."),
    patch: Optional[list[int]] = typer.Option(None, "--patch", help="Patch index (raster order) to edit (repeatable; default all tokens)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default <outputs>/edit)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
) -> None:
    """Set latents (zero, scale, value) on chosen patches, keeping the SAE error; show the effect."""
    from rich.table import Table

    from conceptscope_cli.ablate.edit import edit
    from conceptscope_cli.config.sections import ProjectConfig

    project = open_project()
    project.manifest.override(ProjectConfig, device=device)
    with progress_reporter() as reporter:
        result = edit(project, image, latent, scale=scale, value=value, patches=patch or None, prompts=prompt,
                      out_dir=out, reporter=reporter)
    for item in result.images:
        table = Table(title=f"{item.image}: prediction {item.prediction_before} → {item.prediction_after}", title_justify="left")
        for column in ("prompt", "cos before", "cos after", "change", "p before", "p after"):
            table.add_column(column, justify="left" if column == "prompt" else "right")
        for p in item.prompts:
            table.add_row(p.prompt, f"{p.similarity_before:.4f}", f"{p.similarity_after:.4f}", f"{p.similarity_change:+.4f}",
                          f"{p.probability_before:.3f}", f"{p.probability_after:.3f}")
        console.print(table)
        console.print(f"figure: {item.figure}")


# --------------------------------------------------------------------------- groups / check-model / diff


@app.command()
def groups(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset ([run] dataset or the only one)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split to group (default: the claims split)."),
    claims: Optional[str] = typer.Option(None, "--claims", help="Split whose categorization holds the bias claims (default: the first)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
) -> None:
    """Bias groups per image (y∧c aligned, y∧¬c conflicting), balancing weights, a path,label,group,weight manifest."""
    from conceptscope_cli.act.groups import compute_groups
    from conceptscope_cli.act.render import print_groups

    with progress_reporter() as reporter:
        result = compute_groups(open_project(), dataset, split, claims_split=claims, device=device, reporter=reporter)
    print_groups(console, result)


@app.command("check-model")
def check_model(
    model: str = typer.Option("probe", "--model", help="probe (a linear probe cscope trains on the claims split) | zeroshot (the backbone)."),
    model_file: Optional[Path] = typer.Option(None, "--model-file", help="Your TorchScript classifier: (B, 3, H, W) -> logits (B, C)."),
    entry_point: Optional[str] = typer.Option(None, "--entry-point", help="package.module:function returning your torch.nn.Module."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Your model's input size (resize + centre crop)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Your model's normalisation mean R,G,B."),
    std: Optional[str] = typer.Option(None, "--std", help="Your model's normalisation std R,G,B."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset ([run] dataset or the only one)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Evaluation split ([categorize] evaluate_split)."),
    claims: Optional[str] = typer.Option(None, "--claims", help="Split whose categorization holds the bias claims (default: the first)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
) -> None:
    """Per-group accuracy of a classifier, the aligned-minus-conflicting gap per bias with a bootstrap CI, a verdict."""
    from conceptscope_cli.act.check import check_model as run_check
    from conceptscope_cli.act.models import declared_preprocess
    from conceptscope_cli.act.render import print_check

    def floats(text: Optional[str], flag: str) -> Optional[list[float]]:
        try:
            return None if text is None else [float(v) for v in text.split(",")]
        except ValueError:
            raise CscopeError(f"{flag} {text!r}: expected three numbers R,G,B") from None

    preprocess = declared_preprocess(image_size, floats(mean, "--mean"), floats(std, "--std"))
    with progress_reporter() as reporter:
        report, path = run_check(open_project(), dataset, split, model=model, model_file=model_file, entry_point=entry_point,
                                 preprocess=preprocess, claims_split=claims, device=device, reporter=reporter)
    print_check(console, report)
    console.print(f"[green]wrote[/] {path}")


@app.command("diff")
def diff(
    a: str = typer.Argument(..., help="Categorization A: SPLIT, DATASET/SPLIT or a *_concept_categorization.json path."),
    b: str = typer.Argument(..., help="Categorization B (same SAE)."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="Comma-separated statuses (appeared,vanished,grew,shrank) that exit 4."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the diff as JSON here (default <outputs>/diff/A--B.json)."),
) -> None:
    """Biases that appeared, vanished, grew or shrank between two categorizations made with the same SAE."""
    from conceptscope_cli.act.diff import diff_categorizations, gate
    from conceptscope_cli.act.render import print_diff
    from conceptscope_cli.cache.store import write_json_atomic

    try:
        project = open_project()
    except CscopeError:
        project = None  # two files can be compared outside a project (effects then come from the files)
    report = diff_categorizations(project, a, b)
    print_diff(console, report)
    target = out or (project.outputs_dir if project else Path(".")) / "diff" / (
        f"{report['meta']['a']['label']}--{report['meta']['b']['label']}".replace("/", "_") + ".json")
    write_json_atomic(target, report)
    console.print(f"[green]wrote[/] {target}")
    if fail_on:
        gate(report, [s.strip() for s in fail_on.split(",") if s.strip()])


# --------------------------------------------------------------------------- run


@app.command()
def run(
    device: Optional[str] = typer.Option(None, "--device", help="Torch device ([project] device)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset ([run] dataset)."),
    force: bool = typer.Option(False, "--force", help="Write even when the disk plan says it will not fit."),
) -> None:
    """Run every configured pipeline stage in order, skipping those that are up to date."""
    from conceptscope_cli.config.sections import ProjectConfig
    from conceptscope_cli.pipeline.run import run_pipeline

    project = open_project()
    project.force_disk = force
    project.manifest.override(ProjectConfig, device=device)
    with progress_reporter() as reporter:
        outcomes = run_pipeline(project, dataset, reporter=reporter)
    for outcome in outcomes:
        style = "dim" if outcome.up_to_date else "green"
        status = "up to date" if outcome.up_to_date else "done"
        console.print(f"[{style}]{outcome.stage:<10} {status:<11}[/] {outcome.detail}")
    for outcome in outcomes:
        if outcome.stage == "categorize" and outcome.result is not None and not outcome.up_to_date:
            print_categorization(outcome.result)
    if all(o.up_to_date for o in outcomes):
        console.print("[dim]every stage is up to date; nothing to do[/]")


# --------------------------------------------------------------------------- cache


@cache_app.command("ls")
def cache_ls() -> None:
    """List cache entries: kind, key, size, what made them."""
    from rich.table import Table

    project = open_project()
    entries = project.cache.entries()
    table = Table(title=f"cache: {project.cache.root}", title_justify="left")
    for column in ("kind", "key", "size", "finished", "made from"):
        table.add_column(column)
    total = 0
    for entry in entries:
        record = entry.record
        total += record.get("size_bytes", 0)
        summary = ", ".join(f"{k}={v}" for k, v in record.get("summary", {}).items())
        table.add_row(entry.kind, entry.key, human_bytes(record.get("size_bytes", 0)), record.get("finished", ""), summary)
    partial_total = 0
    for partial in project.cache.partials():
        size = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
        partial_total += size
        table.add_row(partial.parent.name, partial.name.removesuffix(".partial"), human_bytes(size),
                      "[yellow]incomplete[/]", "resumes on the next run")
    console.print(table)
    extra = f" (+ {human_bytes(partial_total)} in incomplete entries)" if partial_total else ""
    console.print(f"{len(entries)} entries, {human_bytes(total)}{extra}")


@cache_app.command("rm")
def cache_rm(
    keys: list[str] = typer.Argument(None, help="Entry keys (or unique prefixes, or KIND/KEY)."),
    all_entries: bool = typer.Option(False, "--all", help="Remove every entry."),
    partial: bool = typer.Option(False, "--partial", help="Also remove incomplete (interrupted) entries."),
) -> None:
    """Remove cache entries (entries a running cscope is building or holds are kept)."""
    project = open_project()
    if not keys and not all_entries and not partial:
        raise CscopeError("say which entries to remove", hint="pass keys (see `cscope cache ls`), --all or --partial")
    targets = project.cache.entries() if all_entries else []
    for key in keys or []:
        found = project.cache.find(key)
        if not found:
            raise CscopeError(f"no cache entry matches {key!r}", hint="see `cscope cache ls`")
        if len(found) > 1:
            raise CscopeError(f"{key!r} matches {len(found)} entries; give more characters")
        targets.extend(found)
    freed = 0
    for entry in {e.path: e for e in targets}.values():
        size = project.cache.remove(entry)
        if size is None:
            console.print(f"[yellow]kept[/] {entry.kind}/{entry.key}: a running cscope holds its lock")
            continue
        freed += size
        console.print(f"removed {entry.kind}/{entry.key}")
    if partial or all_entries:
        for folder in project.cache.partials():
            size = project.cache.remove_partial(folder)
            if size is None:
                console.print(f"[yellow]kept[/] incomplete {folder.parent.name}/{folder.name}: "
                              "a running cscope is building it")
                continue
            freed += size
            console.print(f"removed incomplete {folder.parent.name}/{folder.name}")
    console.print(f"freed {human_bytes(freed)}")


# --------------------------------------------------------------------------- entry point


# Commands that split their work across torchrun's ranks (`run`: its stages do, and export
# runs on rank 0); the others refuse to run there.
DISTRIBUTED_COMMANDS = ("extract", "train", "dict", "categorize", "run")


def _join_torchrun() -> None:
    """Under torchrun: join the process group; only rank 0 prints (errors excepted)."""
    from conceptscope_cli import distributed

    command, args = None, iter(sys.argv[1:])
    for arg in args:
        if arg in ("-C", "--project"):
            next(args, None)
        elif not arg.startswith("-"):
            command = arg
            break
    if command is None:  # --help, --version
        return
    if command not in DISTRIBUTED_COMMANDS:
        raise CscopeError(f"`cscope {command}` does not run under torchrun",
                          hint=f"torchrun works with: {', '.join(DISTRIBUTED_COMMANDS)}; run the others as one process")
    ranks = distributed.init_from_env()
    if not ranks.is_main:
        console.quiet = True  # err_console stays: every rank's errors are shown


def _report_result_warnings() -> None:
    """Warnings the stages collected (conceptscope_cli/checks.py); with --strict they fail the command."""
    from rich.markup import escape

    from conceptscope_cli import checks

    found = checks.collected()
    for warning in found:
        err_console.print(f"[yellow]warning:[/] {escape(warning.text())}", soft_wrap=True)
    if found and state.strict:
        raise CscopeError(f"{len(found)} result warning(s) and --strict", hint="see the warnings above")


def main() -> None:
    """Console-script entry point: user errors become messages and exit codes."""
    distributed_run = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        if distributed_run:
            _join_torchrun()
        app(standalone_mode=False)
        _report_result_warnings()
    except CscopeError as error:
        if state.debug:
            raise
        render_error(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: completed work is kept; run the same command again to resume")
        sys.exit(130)
    except Exception as error:  # click's own usage errors are handled here too
        import click

        from conceptscope_cli.errors import disk_error

        converted = disk_error(error)
        if converted is not None and not state.debug:
            render_error(converted)
            sys.exit(converted.exit_code)

        if isinstance(error, click.exceptions.Exit):
            sys.exit(error.exit_code)
        if isinstance(error, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        if state.debug or os.environ.get("CSCOPE_DEBUG"):
            raise
        err_console.print(f"[bold red]internal error:[/] {type(error).__name__}: {error}")
        err_console.print("[dim]this is a bug in cscope; rerun with --debug for the traceback and report it[/]")
        sys.exit(70)
    finally:
        if distributed_run:
            from conceptscope_cli import distributed

            distributed.shutdown()
