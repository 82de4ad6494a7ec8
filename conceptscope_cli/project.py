"""A loaded project: its manifest, its cache, and the choices every stage shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import conceptscope_cli.config.sections  # noqa: F401 - registers the manifest sections
from conceptscope_cli.backbone.resolve import EXAMPLE_PREFIX, ResolvedModel, resolve_model
from conceptscope_cli.cache.store import CacheStore, resolve_cache_root
from conceptscope_cli.config.manifest import Manifest, find_manifest, load_manifest, value_error
from conceptscope_cli.config.sections import BackboneConfig, DatasetConfig, ProjectConfig, RunConfig
from conceptscope_cli.errors import CscopeError


@dataclass
class Project:
    manifest: Manifest
    cache: CacheStore
    # `--force`: go on when the disk plan says the writes will not fit (cache/disk.py).
    force_disk: bool = False
    # Requested device string -> resolved torch.device (conceptscope_cli.context.device_of).
    devices: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, project_dir: Path | None = None) -> "Project":
        """Find `cscope.toml` (in `project_dir`, or walking up from the working directory)."""
        path = find_manifest(project_dir) if project_dir is None else project_dir / "cscope.toml"
        if project_dir is not None and not path.is_file():
            raise CscopeError(f"no cscope.toml in {project_dir}", hint="run `cscope init DIR` to create one")
        manifest = load_manifest(path)
        cache_root = resolve_cache_root(manifest.root, manifest.get(ProjectConfig).cache_dir)
        return cls(manifest=manifest, cache=CacheStore(cache_root))

    @property
    def root(self) -> Path:
        return self.manifest.root

    @property
    def settings(self) -> ProjectConfig:
        return self.manifest.get(ProjectConfig)

    @property
    def outputs_dir(self) -> Path:
        return self.manifest.resolve_path(self.settings.outputs_dir)

    def dataset(self, name: str | None) -> tuple[str, DatasetConfig]:
        """The `[datasets.NAME]` entry: the given name, [run] dataset, or the only one."""
        datasets = self.manifest.named(DatasetConfig)
        if not datasets:
            raise CscopeError("the manifest defines no dataset", hint="add a [datasets.NAME] section to cscope.toml")
        if name is None and self.manifest.get(RunConfig).dataset is not None:
            name = self.manifest.get(RunConfig).dataset
            if name not in datasets:
                raise value_error(self.manifest.get(RunConfig), "dataset", f"unknown dataset {name!r}",
                                  hint=f"defined datasets: {', '.join(datasets)}")
        if name is None:
            if len(datasets) > 1:
                raise CscopeError(
                    "several datasets are defined; choose one",
                    hint=f"pass --dataset ({', '.join(datasets)}) or set [run] dataset",
                )
            name = next(iter(datasets))
        if name not in datasets:
            raise CscopeError(f"unknown dataset {name!r}", hint=f"defined datasets: {', '.join(datasets)}")
        return name, datasets[name]

    def split(self, dataset: DatasetConfig, split: str | None) -> str:
        return split if split is not None else dataset.splits[0]

    def resolved_backbone(self) -> ResolvedModel:
        config = self.manifest.get(BackboneConfig)
        if config.model.startswith(EXAMPLE_PREFIX):  # the embedded example model (needs torch to materialise)
            from conceptscope_cli.example.tiny_clip import resolve_example_model

            return resolve_example_model(config.model, self.cache.root)
        return resolve_model(config.model, config.pretrained, project_root=self.root, cache_root=self.cache.root)
