"""`cscope run --dry-run`: which stages would run, and why, without running any.

Every answer comes from the keys and stamps the stages themselves compute (activation,
SAE and latents cache keys; the dictionary's, categorization's and export's stamps), so a
stage reported up to date here is one `cscope run` skips. When an entry is missing, the
newest entry of the same kind and target is compared input by input to say what changed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from conceptscope_cli.artifacts import Categorization, ConceptDict
from conceptscope_cli.cache.store import CacheEntry
from conceptscope_cli.project import Project

_SHOWN = 60  # characters of an input value shown in a change line


@dataclass
class StagePlan:
    stage: str
    target: str  # e.g. "shapes/train"
    up_to_date: bool
    reason: str
    changes: list[str] = field(default_factory=list)  # "key: old → new"
    key: str | None = None  # the cache key or stamp the stage would produce


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:  # noqa: ANN401
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:  # noqa: ANN401
    text = json.dumps(value, default=str)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 1] + "…"


def input_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Input keys whose value differs, as `key: old → new` (dotted keys for nested inputs)."""
    before, after = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(before) | set(after)):
        if before.get(key, "<absent>") != after.get(key, "<absent>"):
            shown_old = _short(before[key]) if key in before else "(absent)"
            shown_new = _short(after[key]) if key in after else "(absent)"
            lines.append(f"{prefix}{key}: {shown_old} → {shown_new}")
    return lines


class _Planner:
    """Computes each stage's key once; `plan_pipeline` asks for the stages it shows."""

    def __init__(self, project: Project, dataset: str | None) -> None:
        self.project = project
        self.name, self.dataset_cfg = project.dataset(dataset)
        self.first_split = project.split(self.dataset_cfg, None)
        self._activations: dict[tuple[str, bool], Any] = {}

    # ------------------------------------------------------------ cache entries
    def activations(self, split: str, full_tokens: bool) -> Any:  # noqa: ANN401 - ActivationPlan
        from conceptscope_cli.extract.activations import plan_activations

        if (split, full_tokens) not in self._activations:
            self._activations[split, full_tokens] = plan_activations(self.project, self.name, split,
                                                                     full_tokens=full_tokens)
        return self._activations[split, full_tokens]

    def entry_plan(self, stage: str, kind: str, target: str, key: str, inputs: dict[str, Any],
                   same_target: Any = None) -> StagePlan:  # noqa: ANN401
        """Up to date when the entry exists; else what differs from the closest older entry."""
        cache = self.project.cache
        if cache.lookup(kind, key) is not None:
            return StagePlan(stage, target, True, f"{kind} entry {key} is cached", key=key)
        if (cache.root / kind / f"{key}.partial").is_dir():
            return StagePlan(stage, target, False, f"an interrupted run left {kind}/{key}.partial: it resumes there",
                             key=key)
        candidates: list[tuple[int, CacheEntry, list[str]]] = []
        for entry in cache.entries():
            if entry.kind != kind:
                continue
            old = entry.record.get("inputs", {})
            if same_target is not None and not same_target(old):
                continue
            changes = input_changes(old, inputs)
            candidates.append((len(changes), entry, changes))
        if not candidates:
            return StagePlan(stage, target, False, f"no {kind} entry yet", key=key)
        _, closest, changes = min(candidates, key=lambda c: (c[0], -c[1].path.stat().st_mtime))
        return StagePlan(stage, target, False, f"inputs differ from {kind}/{closest.key}", changes, key)

    def extract(self, split: str) -> StagePlan:
        plan = self.activations(split, False)
        same = {"dataset": plan.inputs["dataset"], "split": plan.inputs["split"]}
        return self.entry_plan("extract", "activations", f"{self.name}/{split}", plan.key, plan.inputs,
                               lambda old: {k: old.get(k) for k in same} == same)

    @cached_property
    def sae(self) -> tuple[StagePlan, str]:
        """(train's plan, the SAE key the dictionary uses)."""
        from conceptscope_cli.config.sections import DictConfig
        from conceptscope_cli.train.stage import sae_plan

        activations = self.activations(self.first_split, False)
        entry = self.project.cache.lookup("activations", activations.key)
        target = f"{self.name}/{self.first_split}"
        if entry is None:  # the SAE's key includes the activations' key (and its recipe their size)
            plan = StagePlan("train", target, False, "its activations are extracted first")
            return plan, f"after:{activations.key}"
        _, inputs, key, _ = sae_plan(self.project, entry)
        plan = self.entry_plan("train", "sae", target, key, inputs)
        configured = self.project.manifest.get(DictConfig).sae
        if configured:
            from conceptscope_cli.sae.checkpoint import sae_fingerprint

            folder = self.project.manifest.resolve_path(configured)
            if not (folder / "sae.safetensors").is_file():
                return plan, f"missing:{folder}"
            return plan, sae_fingerprint(folder)
        return plan, "cache:" + key

    def latents(self, split: str) -> tuple[StagePlan, str]:
        from conceptscope_cli.cache.store import content_key
        from conceptscope_cli.config.sections import DictConfig
        from conceptscope_cli.dictionary.stage import full_token_entry, latents_inputs, latents_source

        cfg = self.project.manifest.get(DictConfig)
        activations = self.activations(split, True)
        # As build_dictionary picks them: a complete all-token training sample stands in for the full entry.
        reused = full_token_entry(self.project, self.name, split) if latents_source(
            self.project, self.name, split) == "cache" else None
        inputs = latents_inputs(cfg, reused.key if reused is not None else activations.key, self.sae[1])
        key = content_key(inputs)
        wanted = {k: activations.inputs[k] for k in ("dataset", "split")}

        def same_split(old: dict[str, Any]) -> bool:
            """Compare with latents of the same dataset split (whatever layer or SAE made them)."""
            entry = self.project.cache.lookup("activations", str(old.get("activations")))
            made_from = entry.record.get("inputs", {}) if entry is not None else {}
            return {k: made_from.get(k) for k in wanted} == wanted

        return self.entry_plan("dict", "latents", f"{self.name}/{split}", key, inputs, same_split), key

    # ------------------------------------------------------------ stamped outputs
    def dictionary(self, split: str) -> StagePlan:
        from conceptscope_cli.config.sections import DictConfig
        from conceptscope_cli.dictionary.stage import dict_is_current, dict_stamp, split_outputs

        cfg = self.project.manifest.get(DictConfig)
        latents_plan, latents_key = self.latents(split)
        stamp = dict_stamp(self.project, cfg, self.dataset_cfg, latents_key)
        out_dir = split_outputs(self.project, self.name, split)
        target = f"{self.name}/{split}"
        if dict_is_current(out_dir, stamp):
            return StagePlan("dict", target, True, f"{ConceptDict.path(out_dir)} matches its inputs", key=stamp)
        concept_path = ConceptDict.path(out_dir)
        if not concept_path.is_file():
            return StagePlan("dict", target, False, "no concept dictionary yet", key=stamp)
        meta = ConceptDict.read(concept_path).meta
        changes = input_changes(meta.get("settings", {}), dataclasses.asdict(cfg), "[dict] ")
        if meta.get("latents_entry") != latents_key:
            why = "the image-level latents changed (the SAE or the activations): " + latents_plan.reason
            changes = changes + latents_plan.changes
        elif changes:
            why = "[dict] settings changed"
        else:
            why = "the dataset table, the vocabulary or the namer settings changed, or some latents are unnamed"
        return StagePlan("dict", target, False, why, changes, stamp)

    def categorize(self, split: str | None = None) -> StagePlan:
        from conceptscope_cli.categorize.stage import NOT_IN_STAMP, categorization_paths, categorize_stamp
        from conceptscope_cli.config.sections import CategorizeConfig
        from conceptscope_cli.dictionary.stage import split_outputs

        split = split or self.first_split
        target = f"{self.name}/{split}"
        upstream = self.dictionary(split)
        if not upstream.up_to_date:
            return StagePlan("categorize", target, False, "its concept dictionary is rebuilt first",
                             [f"dict: {upstream.reason}", *upstream.changes])
        out_dir = split_outputs(self.project, self.name, split)
        concept = ConceptDict.load(out_dir)
        cfg = self.project.manifest.get(CategorizeConfig)
        latents_key = self.latents(split)[1]
        stamp = categorize_stamp(self.project, cfg, latents_key, concept, out_dir,
                                 self.project.dataset(self.name)[1].region_settings())
        classes_dir, _, categorization_path = categorization_paths(out_dir, split)
        if not categorization_path.is_file():
            done = len(list(classes_dir.glob("class_*.json"))) if classes_dir.is_dir() else 0
            why = f"interrupted earlier: {done} class(es) done, it resumes" if done else "no categorization yet"
            return StagePlan("categorize", target, False, why, key=stamp)
        meta = Categorization.read(categorization_path).meta
        if meta.get("stamp") == stamp and all((classes_dir / f"class_{y:05d}.json").is_file()
                                              for y in range(len(concept.class_names))):
            return StagePlan("categorize", target, True, f"{categorization_path} matches its inputs", key=stamp)
        now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_STAMP}
        before = {k: v for k, v in meta.get("categorize", {}).items() if k not in NOT_IN_STAMP}
        changes = input_changes(before, now, "[categorize] ")
        if meta.get("seed") != self.project.settings.seed:
            changes.append(f"[project] seed: {meta.get('seed')} → {self.project.settings.seed}")
        why = "settings changed" if changes else "the concept dictionary changed"
        return StagePlan("categorize", target, False, why, changes, stamp)

    def export(self) -> StagePlan:
        from conceptscope_cli.dictionary.stage import split_outputs
        from conceptscope_cli.export.stage import current_export, default_out_dir, export_config, export_stamp

        split = self.first_split
        target = f"{self.name}/{split}"
        upstream = self.categorize()
        if not upstream.up_to_date:
            return StagePlan("export", target, False, "its categorization is made first",
                             [f"categorize: {upstream.reason}"])
        out_dir = split_outputs(self.project, self.name, split)
        concept = ConceptDict.load(out_dir)
        cfg = export_config(self.project)
        from conceptscope_cli.act.report import act_fingerprint

        stamp = export_stamp(upstream.key, concept, cfg, act_fingerprint(self.project.outputs_dir, self.name))
        folder = default_out_dir(self.project, self.name, split, cfg)
        if current_export(folder, stamp) is not None:
            return StagePlan("export", target, True, f"{folder} matches its inputs", key=stamp)
        why = ("no export yet" if not (folder / ".export.stamp").is_file()
               else "the categorization, the concept names or [export] settings changed, or a file is missing")
        return StagePlan("export", target, False, why, key=stamp)


# What each command-level requirement checks, and the command that makes it.
_MAKERS = {"train": "cscope train", "categorize": "cscope categorize"}


def require_current(project: Project, dataset: str | None, stage: str, split: str | None = None) -> None:
    """Raise MissingArtifactError (exit 3) unless `stage`'s output exists and matches the manifest.

    For commands that read an upstream artifact but do not make it (`attribute` needs the
    SAE, `export` the categorization): the hint names the command that makes it."""
    from conceptscope_cli.config.sections import DictConfig
    from conceptscope_cli.errors import MissingArtifactError

    if stage == "train" and project.manifest.get(DictConfig).sae:
        return  # an imported SAE: its folder is checked where it is opened
    planner = _Planner(project, dataset)
    plan = planner.sae[0] if stage == "train" else planner.categorize(split)
    if plan.up_to_date:
        return
    what = {"train": "trained SAE", "categorize": "categorization"}[stage]
    changed = f" ({'; '.join(plan.changes[:3])})" if plan.changes else ""
    raise MissingArtifactError(
        f"no {what} of {plan.target} matches cscope.toml: {plan.reason}{changed}", command=_MAKERS[stage],
        hint=f"run `{_MAKERS[stage]}` (or `cscope run`) first; `cscope run --dry-run` shows what is missing")


def plan_pipeline(project: Project, dataset: str | None, *, stages: list[str] | None = None) -> list[StagePlan]:
    """What `cscope run` (with the same --stages) would do, stage by stage, without doing it."""
    from conceptscope_cli.data.datasets import no_cache_writes

    with no_cache_writes():  # not even an image folder's listing
        return _plan_pipeline(project, dataset, stages)


def _plan_pipeline(project: Project, dataset: str | None, stages: list[str] | None) -> list[StagePlan]:
    from conceptscope_cli.pipeline.run import selected_stages

    planner = _Planner(project, dataset)
    plans: list[StagePlan] = []
    for stage in selected_stages(project, stages):
        if stage == "extract":
            plans.extend(planner.extract(split) for split in planner.dataset_cfg.splits)
        elif stage == "train":
            plans.append(planner.sae[0])
        elif stage == "dict":
            plans.extend(planner.dictionary(split) for split in planner.dataset_cfg.splits)
        elif stage == "categorize":
            plans.append(planner.categorize())
        elif stage == "export":
            plans.append(planner.export())
    return plans
