"""`cscope run`: every configured stage in pipeline order, skipping up-to-date ones.

Each stage is keyed by its inputs (like `dvc repro`): a stage whose cache entry or
outputs already match its inputs reports "up to date" and does no work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from conceptscope_cli.config.sections import RunConfig
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.progress import Reporter
from conceptscope_cli.project import Project


@dataclass
class StageOutcome:
    stage: str
    up_to_date: bool
    detail: str


def _extract_stage(project: Project, dataset: str | None, reporter: Reporter) -> list[StageOutcome]:
    from conceptscope_cli.extract.activations import extract_activations

    name, config = project.dataset(dataset)
    outcomes = []
    for split in config.splits:
        result = extract_activations(project, name, split, reporter=reporter)
        stats = result.entry.record["stats"]
        outcomes.append(
            StageOutcome(
                "extract", result.reused,
                f"{name}/{split}: {stats['n_images']} images, skipped {stats['n_skipped']} → {result.entry.path}",
            )
        )
    return outcomes


# Pipeline order; later stages register here as they land.
STAGES: dict[str, Callable[[Project, str | None, Reporter], list[StageOutcome]]] = {
    "extract": _extract_stage,
}


def run_pipeline(project: Project, dataset: str | None, *, reporter: Reporter) -> list[StageOutcome]:
    wanted = project.manifest.get(RunConfig).stages
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise CscopeError(
            f"unknown stage(s) in [run] stages: {', '.join(unknown)}",
            hint=f"available stages, in order: {', '.join(STAGES)}",
        )
    outcomes: list[StageOutcome] = []
    for stage, function in STAGES.items():
        if stage in wanted:
            outcomes.extend(function(project, dataset, reporter))
    return outcomes
