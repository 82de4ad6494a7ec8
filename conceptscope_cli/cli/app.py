"""The `cscope` command line: parse flags, open the project, call one function.

The science and I/O live elsewhere; this layer only wires options (each documented with
the manifest key it overrides, see options.py) to library calls; render.py prints the
results and returns the `--json` summary, command.py maps outcomes to exit codes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, cast

import typer

from conceptscope_cli import __version__
from conceptscope_cli.cache.disk import human_bytes
from conceptscope_cli.cli import command as command_module
from conceptscope_cli.cli import render, ui
from conceptscope_cli.cli.command import command
from conceptscope_cli.cli.options import (
    Dataset,
    Device,
    Force,
    Images,
    NumWorkers,
    Out,
    Prompts,
    Split,
    manifest_option,
)
from conceptscope_cli.cli.ui import console, progress_reporter
from conceptscope_cli.config.sections import (
    AblateConfig,
    BackboneConfig,
    CategorizeConfig,
    DictConfig,
    ExtractConfig,
    ProjectConfig,
    SAEConfig,
)
from conceptscope_cli.errors import CscopeError

if TYPE_CHECKING:
    from conceptscope_cli.attribute.core import Objective

app = typer.Typer(
    name="cscope",
    help="Find and measure dataset bias in vision data with sparse autoencoders on CLIP activations.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
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
    project: Annotated[Optional[Path], typer.Option(
        "--project", "-C", help="Project directory (default: nearest cscope.toml above the working directory).",
        envvar="CSCOPE_PROJECT")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", envvar="CSCOPE_STRICT",
        help="Treat result warnings (0 valid latents, FVU > 0.5, > 50% dead latents, a class without candidates) "
             "as errors: exit 1 after the command.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    state.project_dir = project
    state.debug = debug
    state.strict = strict


def _report_result_warnings() -> dict:
    """Warnings the stages collected (conceptscope_cli/checks.py); with --strict they fail the command."""
    from conceptscope_cli import checks

    found = checks.collected()
    for warning in found:
        ui.warn(warning.text())
    if found and state.strict:
        raise CscopeError(f"{len(found)} result warning(s) and --strict", hint="see the warnings above")
    return {"warnings": [warning.text() for warning in found]} if found else {}


command_module.after_each.append(_report_result_warnings)


def open_project():  # noqa: ANN201 - returns conceptscope_cli.project.Project (imported lazily for a fast --help)
    from conceptscope_cli.project import Project

    project = Project.open(state.project_dir)
    ui.verbose(f"project {project.root} (manifest {project.manifest.path}), cache {project.cache.root}")
    return project


# --------------------------------------------------------------------------- init


@command(app)
def init(
    directory: Annotated[Path, typer.Argument(help="Project directory to create or fill.")] = Path("."),
    example: Annotated[bool, typer.Option("--example", help="Create the embedded example project (planted-bias world, tiny CLIP).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing cscope.toml.")] = False,
    dataset: Annotated[Optional[Path], typer.Option(
        "--dataset", help="An image folder to describe: splits, labels (class folders or a metadata column) "
                          "and attribute columns are detected and written into the manifest.")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", envvar="CSCOPE_MODEL",
        help="Backbone to write as \\[backbone] model (e.g. example:tiny-clip, ViT-B-16, hf-hub:ORG/REPO).")] = None,
) -> dict:
    """Write a commented [bold]cscope.toml[/] and lay out the project directory."""
    from conceptscope_cli.pipeline.init import init_project

    result = init_project(directory, example=example, force=force, dataset=dataset, model=model)
    return render.show_init(result, directory, ready=example or dataset is not None)


# --------------------------------------------------------------------------- extract


@command(app)
def extract(
    dataset: Dataset = None,
    split: Split = None,
    device: Device = None,
    batch_size: Annotated[Optional[int], manifest_option(ExtractConfig, "extract", "batch_size")] = None,
    limit: Annotated[Optional[int], manifest_option(ExtractConfig, "extract", "limit")] = None,
    tokens_per_image: Annotated[Optional[int], manifest_option(ExtractConfig, "extract", "tokens_per_image")] = None,
    layer: Annotated[Optional[int], manifest_option(BackboneConfig, "backbone", "layer")] = None,
    shard_size: Annotated[Optional[int], manifest_option(ExtractConfig, "extract", "shard_size")] = None,
    num_workers: NumWorkers = None,
    force: Force = False,
) -> dict:
    """Run the CLIP backbone over a split and cache one layer's activations (HDF5)."""
    from conceptscope_cli.extract.activations import extract_activations

    project = open_project()
    project.force_disk = force
    project.manifest.override(ExtractConfig, batch_size=batch_size, limit=limit, tokens_per_image=tokens_per_image, shard_size=shard_size)
    project.manifest.override(BackboneConfig, layer=layer)
    project.manifest.override(ProjectConfig, device=device, num_workers=num_workers)
    with progress_reporter() as reporter:
        result = extract_activations(project, dataset, split, reporter=reporter)
    return render.show_extract(result)


# --------------------------------------------------------------------------- train


def _sae_option(key: str, *flags: str) -> object:
    return manifest_option(SAEConfig, "sae", key, *flags)


@command(app)
def train(
    dataset: Dataset = None,
    split: Split = None,
    device: Device = None,
    architecture: Annotated[Optional[str], _sae_option("architecture")] = None,
    expansion: Annotated[Optional[int], _sae_option("expansion")] = None,
    k: Annotated[Optional[int], _sae_option("k", "--k")] = None,
    total_tokens: Annotated[Optional[int], _sae_option("total_tokens")] = None,
    batch_size: Annotated[Optional[int], _sae_option("batch_size")] = None,
    lr: Annotated[Optional[float], _sae_option("lr")] = None,
    l1_coefficient: Annotated[Optional[float], _sae_option("l1_coefficient")] = None,
    import_path: Annotated[Optional[Path], typer.Option(
        "--import", help="Convert a ConceptScope/PatchSAE .pt or a SAELens folder into cscope's format instead of training.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="With --import: where to write the converted SAE (default outputs/sae-import).")] = None,
    input_scale: Annotated[Optional[float], typer.Option(
        "--input-scale", help="With --import of a SAELens SAE trained with normalize_activations = "
        "\"expected_average_only_in\": the factor its inputs were multiplied by (folded into the weights).")] = None,
    force: Force = False,
) -> dict:
    """Train a sparse autoencoder on cached activations (extracting them first if needed)."""
    project = open_project()
    project.force_disk = force
    if import_path is not None:
        from conceptscope_cli.sae.importing import import_sae

        target = import_sae(import_path, out or project.outputs_dir / "sae-import", input_scale=input_scale)
        return render.show_import(import_path, target)
    project.manifest.override(SAEConfig, architecture=architecture, expansion=expansion, k=k, total_tokens=total_tokens,
                              batch_size=batch_size, lr=lr, l1_coefficient=l1_coefficient)
    project.manifest.override(ProjectConfig, device=device)
    from conceptscope_cli.train.stage import train_stage

    table = ui.metrics_table()
    with progress_reporter(extra=table) as reporter:
        result = train_stage(project, dataset, split, reporter=reporter, on_metrics=table.update)
    return render.show_sae(result)


# --------------------------------------------------------------------------- dict


@command(app, "dict")
def dict_command(
    dataset: Dataset = None,
    split: Split = None,
    namer: Annotated[Optional[str], manifest_option(DictConfig, "dict", "namer")] = None,
    device: Device = None,
    force: Force = False,
) -> dict:
    """Build the concept dictionary: image latents, valid latents, reference images, names."""
    from conceptscope_cli.context import run_context
    from conceptscope_cli.dictionary.stage import build_dictionary

    project = open_project()
    project.force_disk = force
    project.manifest.override(DictConfig, namer=namer)
    project.manifest.override(ProjectConfig, device=device)
    with progress_reporter() as reporter:
        result = build_dictionary(project, ctx=run_context(project, dataset, split), reporter=reporter)
    return render.show_dict(result)


# --------------------------------------------------------------------------- categorize


@command(app)
def categorize(
    dataset: Dataset = None,
    split: Split = None,
    num_samples: Annotated[Optional[int], manifest_option(CategorizeConfig, "categorize", "num_samples")] = None,
    bias_threshold_sigma: Annotated[Optional[float], manifest_option(CategorizeConfig, "categorize", "bias_threshold_sigma")] = None,
    target_threshold: Annotated[Optional[float], manifest_option(CategorizeConfig, "categorize", "target_threshold")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help=ui.escape(
        "Also measure bias-discovery precision@k ([categorize] context_classes, evaluate_split, precision_k)."))] = False,
    replicates: Annotated[Optional[int], manifest_option(
        CategorizeConfig, "categorize", "replicates")] = None,
    device: Device = None,
) -> dict:
    """Per class: alignment scores and target / context / bias concepts."""
    from conceptscope_cli.categorize.stage import categorize as run_categorize
    from conceptscope_cli.categorize.stage import evaluate_bias_discovery
    from conceptscope_cli.context import run_context

    project = open_project()
    project.manifest.override(CategorizeConfig, num_samples=num_samples, bias_threshold_sigma=bias_threshold_sigma,
                              target_threshold=target_threshold, replicates=replicates)
    project.manifest.override(ProjectConfig, device=device)
    with progress_reporter() as reporter:
        result = run_categorize(project, ctx=run_context(project, dataset, split), reporter=reporter)
        report = evaluate_bias_discovery(project, dataset, split, reporter=reporter) if evaluate else None
    summary = render.show_categorization(result)
    if report is not None:
        summary["bias_discovery"] = render.show_bias_discovery(report)
    return summary


# --------------------------------------------------------------------------- attribute


@command(app)
def attribute(
    image: Images,
    prompt: Prompts,
    top: Annotated[int, typer.Option("--top", help="Latents shown per image and prompt.")] = 10,
    objective: Annotated[str, typer.Option(
        "--objective", help="cosine (image-text similarity) or probability (softmax over the prompts).")] = "cosine",
    out: Out = None,
    dataset: Dataset = None,
    split: Split = None,
    device: Device = None,
) -> dict:
    """Which SAE latents drive CLIP's image–text similarity for images and prompts, with heatmaps."""
    from conceptscope_cli.attribute.run import attribute as run_attribute

    if objective not in ("cosine", "probability"):
        raise typer.BadParameter(f"unknown objective {objective!r}: use cosine or probability", param_hint="--objective")
    from conceptscope_cli.pipeline.plan import require_current

    project = open_project()
    project.manifest.override(ProjectConfig, device=device)
    require_current(project, dataset, "train")  # an explanation does not train an SAE on the side
    with progress_reporter() as reporter:
        result = run_attribute(project, image, prompt, top_k=top, out_dir=out, objective=cast("Objective", objective), dataset=dataset,
                               split=split, reporter=reporter)
    return render.show_attribution(result)


# --------------------------------------------------------------------------- export


@command(app)
def export(
    dataset: Dataset = None,
    split: Split = None,
    formats: Annotated[Optional[str], typer.Option("--format", help=ui.escape(
        "Comma-separated: html,csv,json,saelens ([export] formats)."), show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help=ui.escape(
        "Output folder ([export] out_dir, default <outputs>/report/<dataset>/<split>)."), show_default=False)] = None,
    device: Device = None,
) -> dict:
    """A self-contained HTML report, CSV/JSON tables, and the SAE in SAELens and cscope formats."""
    from conceptscope_cli.export.stage import export as run_export
    from conceptscope_cli.pipeline.plan import require_current

    project = open_project()
    project.manifest.override(ProjectConfig, device=device)
    require_current(project, dataset, "categorize", split)  # exports what categorize made; `cscope run` makes all
    chosen = [f.strip() for f in formats.split(",") if f.strip()] if formats else None
    with progress_reporter() as reporter:
        result = run_export(project, dataset, split, formats=chosen, out_dir=out, device=device, reporter=reporter)
    return render.show_export(result)


# --------------------------------------------------------------------------- ablate


def _ablate_option(key: str) -> object:
    return manifest_option(AblateConfig, "ablate", key)


AblateSplit = Annotated[Optional[str], _ablate_option("split")]
MaxImages = Annotated[Optional[int], _ablate_option("max_images")]
AblateBatch = Annotated[Optional[int], _ablate_option("batch_size")]


def _ablate_config(project, split, max_images, batch_size):  # noqa: ANN001, ANN202
    return project.manifest.override(AblateConfig, split=split, max_images=max_images, batch_size=batch_size)


@command(ablate_app, "faithfulness", prefix="ablate ")
def ablate_faithfulness(
    dataset: Dataset = None,
    split: AblateSplit = None,
    max_images: MaxImages = None,
    batch_size: AblateBatch = None,
    device: Device = None,
) -> dict:
    """Deletion / insertion curves of y = cos(image, class prompt) per latent ranking."""
    from conceptscope_cli.ablate.faithfulness import faithfulness

    project = open_project()
    config = _ablate_config(project, split, max_images, batch_size)
    with progress_reporter() as reporter:
        result = faithfulness(project, dataset, None, config=config, device=device, reporter=reporter)
    return render.show_faithfulness(result)


@command(ablate_app, "classes", prefix="ablate ")
def ablate_classes(
    dataset: Dataset = None,
    split: AblateSplit = None,
    max_images: MaxImages = None,
    batch_size: AblateBatch = None,
    device: Device = None,
) -> dict:
    """Per-class zero-shot accuracy with each class's top-k / target / bias latents kept or zeroed."""
    from conceptscope_cli.ablate.classes import class_ablation

    project = open_project()
    config = _ablate_config(project, split, max_images, batch_size)
    with progress_reporter() as reporter:
        result = class_ablation(project, dataset, None, config=config, device=device, reporter=reporter)
    return render.show_class_ablation(result)


@command(ablate_app, "edit", prefix="ablate ")
def ablate_edit(
    image: Images,
    latent: Annotated[list[int], typer.Option("--latent", "-l", help="Latent to edit (repeatable).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompts whose similarity is reported (repeatable).")],
    scale: Annotated[Optional[float], typer.Option(
        "--scale", help="Set each latent to SCALE × its maximum observed image-level value.")] = None,
    value: Annotated[Optional[float], typer.Option("--value", help="Set each latent to this value (neither: zero it).")] = None,
    patch: Annotated[Optional[list[int]], typer.Option(
        "--patch", help="Patch index (raster order) to edit (repeatable; default all tokens).")] = None,
    out: Out = None,
    device: Device = None,
) -> dict:
    """Set latents (zero, scale, value) on chosen patches, keeping the SAE error; show the effect."""
    from conceptscope_cli.ablate.edit import edit

    project = open_project()
    project.manifest.override(ProjectConfig, device=device)
    with progress_reporter() as reporter:
        result = edit(project, image, latent, scale=scale, value=value, patches=patch or None, prompts=prompt,
                      out_dir=out, reporter=reporter)
    return render.show_edit(result)


# --------------------------------------------------------------------------- groups / check-model / diff


@command(app)
def groups(
    dataset: Dataset = None,
    split: Annotated[Optional[str], typer.Option("--split", "-s", help="Split to group (default: the claims split).")] = None,
    claims: Annotated[Optional[str], typer.Option(
        "--claims", help="Split whose categorization holds the bias claims (default: the first).")] = None,
    device: Device = None,
) -> dict:
    """Bias groups per image (y∧c aligned, y∧¬c conflicting), balancing weights, a path,label,group,weight manifest."""
    from conceptscope_cli.act.groups import compute_groups
    from conceptscope_cli.act.render import print_groups

    with progress_reporter() as reporter:
        result = compute_groups(open_project(), dataset, split, claims_split=claims, device=device, reporter=reporter)
    print_groups(console, result)
    return render.summary_of(result)


@command(app, "check-model")
def check_model(
    model: Annotated[str, typer.Option(
        "--model", help="probe (a linear probe cscope trains on the claims split) | zeroshot (the backbone).")] = "probe",
    model_file: Annotated[Optional[Path], typer.Option(
        "--model-file", help="Your TorchScript classifier: (B, 3, H, W) -> logits (B, C).")] = None,
    entry_point: Annotated[Optional[str], typer.Option(
        "--entry-point", help="package.module:function returning your torch.nn.Module.")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Your model's input size (resize + centre crop).")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Your model's normalisation mean R,G,B.")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Your model's normalisation std R,G,B.")] = None,
    dataset: Dataset = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", "-s", help=ui.escape("Evaluation split ([categorize] evaluate_split)."))] = None,
    claims: Annotated[Optional[str], typer.Option(
        "--claims", help="Split whose categorization holds the bias claims (default: the first).")] = None,
    device: Device = None,
) -> dict:
    """Per-group accuracy of a classifier, the aligned-minus-conflicting gap per bias with a bootstrap CI, a verdict."""
    from conceptscope_cli.act.check import check_model as run_check
    from conceptscope_cli.act.models import declared_preprocess
    from conceptscope_cli.act.render import print_check

    def floats(text: Optional[str], flag: str) -> Optional[list[float]]:
        try:
            return None if text is None else [float(v) for v in text.split(",")]
        except ValueError:
            raise typer.BadParameter(f"{text!r}: expected three numbers R,G,B", param_hint=flag) from None

    preprocess = declared_preprocess(image_size, floats(mean, "--mean"), floats(std, "--std"))
    with progress_reporter() as reporter:
        report, path = run_check(open_project(), dataset, split, model=model, model_file=model_file, entry_point=entry_point,
                                 preprocess=preprocess, claims_split=claims, device=device, reporter=reporter)
    print_check(console, report)
    console.print(f"[green]wrote[/] {ui.escape(str(path))}")
    return {"outputs": {"report": str(path)}}


@command(app, "diff")
def diff(
    a: Annotated[str, typer.Argument(help="Categorization A: SPLIT, DATASET/SPLIT or a *_concept_categorization.json path.")],
    b: Annotated[str, typer.Argument(help="Categorization B (same SAE).")],
    fail_on: Annotated[Optional[str], typer.Option(
        "--fail-on", help="Comma-separated statuses (appeared,vanished,grew,shrank) that exit 4.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Write the diff as JSON here (default <outputs>/diff/A--B.json).")] = None,
) -> dict:
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
    console.print(f"[green]wrote[/] {ui.escape(str(target))}")
    if fail_on:
        gate(report, [s.strip() for s in fail_on.split(",") if s.strip()])
    return {"outputs": {"diff": str(target)}}


# --------------------------------------------------------------------------- run


@command(app)
def run(
    device: Device = None,
    dataset: Dataset = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help=ui.escape(
        "Comma-separated stages to run instead of [run] stages, e.g. dict,categorize "
        "(their upstream inputs are still made when missing)."), show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=(
        "Say which stages would run and why (which inputs changed) without running anything."))] = False,
    force: Force = False,
) -> dict:
    """Run every configured pipeline stage in order, skipping those that are up to date."""
    from conceptscope_cli.pipeline.plan import plan_pipeline
    from conceptscope_cli.pipeline.run import run_pipeline

    project = open_project()
    project.force_disk = force
    project.manifest.override(ProjectConfig, device=device)
    chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages is not None else None
    if dry_run:
        return render.show_plan(plan_pipeline(project, dataset, stages=chosen))
    with progress_reporter() as reporter:
        outcomes = run_pipeline(project, dataset, stages=chosen, reporter=reporter)
    return render.show_run(outcomes)


# --------------------------------------------------------------------------- cache


@command(cache_app, "ls", prefix="cache ")
def cache_ls() -> dict:
    """List cache entries: kind, key, size, what made them."""
    project = open_project()
    return render.show_cache(project.cache.root, project.cache.entries(), project.cache.partials())


@command(cache_app, "rm", prefix="cache ")
def cache_rm(
    keys: Annotated[Optional[list[str]], typer.Argument(help="Entry keys (or unique prefixes, or KIND/KEY).")] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    partial: Annotated[bool, typer.Option("--partial", help="Also remove incomplete (interrupted) entries.")] = False,
) -> dict:
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
    freed, removed, kept = 0, [], []
    for entry in {e.path: e for e in targets}.values():
        size = project.cache.remove(entry)
        if size is None:
            kept.append(f"{entry.kind}/{entry.key}")
            console.print(f"[yellow]kept[/] {entry.kind}/{entry.key}: a running cscope holds its lock")
            continue
        freed += size
        removed.append(f"{entry.kind}/{entry.key}")
        console.print(f"removed {entry.kind}/{entry.key}")
    if partial or all_entries:
        for folder in project.cache.partials():
            size = project.cache.remove_partial(folder)
            if size is None:
                kept.append(f"{folder.parent.name}/{folder.name}")
                console.print(f"[yellow]kept[/] incomplete {folder.parent.name}/{folder.name}: "
                              "a running cscope is building it")
                continue
            freed += size
            removed.append(f"{folder.parent.name}/{folder.name}")
            console.print(f"removed incomplete {folder.parent.name}/{folder.name}")
    console.print(f"freed {human_bytes(freed)}")
    return {"removed": removed, "kept": kept, "freed_bytes": freed}


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


def _shutdown_torchrun() -> None:
    from conceptscope_cli import distributed

    distributed.shutdown()


def main() -> None:
    """Console-script entry point: exit codes as errors.py lists them."""
    from conceptscope_cli.cli.command import run as run_app

    distributed_run = int(os.environ.get("WORLD_SIZE", "1")) > 1
    run_app(app, debug=lambda: state.debug, before=_join_torchrun if distributed_run else None,
            after=_shutdown_torchrun if distributed_run else None)
