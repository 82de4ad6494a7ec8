"""`cscope run`: every configured stage in pipeline order, skipping up-to-date ones.

Each stage is keyed by its inputs (like `dvc repro`): a stage whose cache entry or
outputs already match its inputs reports "up to date" and does no work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from conceptscope_cli.artifacts import Categorization, ConceptDict
from conceptscope_cli.config.manifest import value_error
from conceptscope_cli.config.sections import RunConfig
from conceptscope_cli.errors import CscopeError, UsageError
from conceptscope_cli.progress import Reporter
from conceptscope_cli.project import Project

if TYPE_CHECKING:
    from conceptscope_cli.context import RunContext


@dataclass
class StageOutcome:
    stage: str
    up_to_date: bool
    detail: str
    result: Any = None  # the stage's own result object, for the CLI's summary
    outputs: dict[str, Path] = field(default_factory=dict)  # what the stage made, by kind (for --json)


def _extract_stage(project: Project, ctx: RunContext, reporter: Reporter) -> list[StageOutcome]:
    from conceptscope_cli.extract.activations import extract_activations

    name, config = ctx.dataset, ctx.dataset_cfg
    outcomes = []
    for split in config.splits:
        result = extract_activations(project, ctx=ctx.at_split(split), reporter=reporter)
        stats = result.entry.record["stats"]
        outcomes.append(
            StageOutcome(
                "extract", result.reused,
                f"{name}/{split}: {stats['n_images']} images, skipped {stats['n_skipped']} → {result.entry.path}",
                outputs={"activations": result.entry.path},
            )
        )
    return outcomes


def _train_stage(project: Project, ctx: RunContext, reporter: Reporter) -> list[StageOutcome]:
    from conceptscope_cli.train.stage import train_stage

    result = train_stage(project, ctx=ctx, reporter=reporter)
    ev = result.entry.record["stats"].get("eval", {})
    detail = ", ".join(f"{k} {ev[k]:.3g}" for k in ("fvu", "l0", "dead_fraction") if isinstance(ev.get(k), (int, float)))
    return [StageOutcome("train", result.reused, f"{detail} → {result.path}", outputs={"sae": result.path})]


def _dict_stage(project: Project, ctx: RunContext, reporter: Reporter) -> list[StageOutcome]:
    from conceptscope_cli.dictionary.stage import build_dictionary

    name, config = ctx.dataset, ctx.dataset_cfg
    outcomes = []
    for split in config.splits:
        result = build_dictionary(project, ctx=ctx.at_split(split), reporter=reporter)
        if result.unnamed:
            raise CscopeError(f"{len(result.unnamed)} latent(s) of {name}/{split} could not be named",
                              hint="see concept_dict.json; run `cscope dict` again to retry them")
        outcomes.append(StageOutcome("dict", result.up_to_date,
                                     f"{name}/{split}: {result.n_valid} valid latents of {result.n_latents} → {result.out_dir}",
                                     outputs={"dictionary": ConceptDict.path(result.out_dir)}))
    return outcomes


def _categorize_stage(project: Project, ctx: RunContext, reporter: Reporter) -> list[StageOutcome]:
    from conceptscope_cli.categorize.stage import categorize

    config = ctx.dataset_cfg
    result = categorize(project, ctx=ctx.at_split(config.splits[0]), reporter=reporter)
    classes = result.categorization["classes"]
    n_bias = sum(len(c["bias"]) for c in classes.values())
    path = Categorization.path(result.out_dir.parent, config.splits[0])
    return [StageOutcome("categorize", result.up_to_date, f"{len(classes)} classes, {n_bias} bias concepts → {path}",
                         result, outputs={"categorization": path})]


def _export_stage(project: Project, ctx: RunContext, reporter: Reporter) -> list[StageOutcome]:
    from conceptscope_cli.distributed import on_main
    from conceptscope_cli.export.stage import export

    # Under torchrun the report is written once, by rank 0, after the parallel stages.
    result = on_main(lambda: export(project, ctx=ctx, reporter=reporter))
    html = result.path("html")
    return [StageOutcome("export", result.up_to_date, f"report: {html or result.out_dir}",
                         outputs={f.kind: f.path for f in result.files})]


# Pipeline order: `cscope run` executes the [run] stages in this order.
STAGES: dict[str, Callable[[Project, RunContext, Reporter], list[StageOutcome]]] = {
    "extract": _extract_stage,
    "train": _train_stage,
    "dict": _dict_stage,
    "categorize": _categorize_stage,
    "export": _export_stage,
}


def selected_stages(project: Project, stages: list[str] | None) -> list[str]:
    """The stages to run, in pipeline order: `stages` (from --stages) or `[run] stages`."""
    wanted = project.manifest.get(RunConfig).stages if stages is None else stages
    where = "--stages" if stages is not None else "[run] stages"
    hint = f"available stages, in order: {', '.join(STAGES)}"
    unknown = [s for s in wanted if s not in STAGES]
    problem = f"unknown stage(s) in {where}: {', '.join(unknown)}" if unknown else (
        f"no stage selected ({where} is empty)" if not wanted else None)
    if problem and stages is not None:
        raise UsageError(problem, hint=hint)
    if problem:
        raise value_error(project.manifest.get(RunConfig), "stages", problem.replace(" in [run] stages", ""), hint=hint)
    return [stage for stage in STAGES if stage in wanted]


def run_pipeline(project: Project, dataset: str | None, *, reporter: Reporter,
                 stages: list[str] | None = None) -> list[StageOutcome]:
    """Run `stages` (default `[run] stages`) in pipeline order; each makes its missing inputs first.

    The run context (dataset, device, precisions, seed) is resolved once, before any stage: a bad
    device or dataset fails before work starts, and every stage reuses the resolution."""
    from conceptscope_cli.context import run_context

    wanted = selected_stages(project, stages)
    ctx = run_context(project, dataset)
    if "categorize" in wanted or "export" in wanted:  # both categorize the first split
        from conceptscope_cli.categorize.stage import require_class_names

        require_class_names(project, ctx.at_split(ctx.dataset_cfg.splits[0]))
    outcomes: list[StageOutcome] = []
    for stage, function in STAGES.items():
        if stage in wanted:
            outcomes.extend(function(project, ctx, reporter))
    return outcomes
