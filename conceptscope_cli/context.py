"""The run context: which data, which device, which precision and which seed a stage runs with.

`run_context(project, dataset, split, device)` resolves them once: the dataset by the rules of
`Project.dataset` / `Project.split`, the device through `devices.resolve_device` (memoised on the
project, so a pipeline that runs six stages probes the machine and its torchrun rank once), the
precisions through `devices.precision_of`. `cscope run` resolves it before any stage, `cscope dict`
and `cscope categorize` in the command; they pass it to the stage as `ctx=` (`build_dictionary`,
`categorize`; `cscope run` also `extract_activations`, `train_stage`, `export`), and such a stage passes it (or its `device_name`) to the stages it runs. The other
entry points (and library callers) still take names, which the stage resolves with the same
function, hitting the memo. Either way the frozen `RunContext` goes to the stage's helpers and to
the loader (`conceptscope_cli.session`). No stage spells
`resolve_device(device or project.settings.device)` itself (tests/test_layers.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from conceptscope_cli.config.sections import BackboneConfig, DatasetConfig, SAEConfig
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.project import Project

if TYPE_CHECKING:
    import torch

    from conceptscope_cli.devices import Precision


@dataclass(frozen=True)
class RunContext:
    dataset: str
    dataset_cfg: DatasetConfig
    split: str
    device: torch.device
    precision: Precision  # CLIP forwards: [backbone] precision
    train_precision: Precision  # SAE training forwards: [sae] autocast
    seed: int  # [project] seed
    device_name: str  # the device as asked for (device_of's memo key): what a stage hands the stages it runs

    def at_split(self, split: str | None) -> RunContext:
        """The same run on another split of the dataset (None: this one)."""
        if split is None or split == self.split:
            return self
        if split not in self.dataset_cfg.splits:
            raise CscopeError(f"split {split!r} is not listed for dataset {self.dataset!r}",
                              hint=f"splits: {', '.join(self.dataset_cfg.splits)}")
        return replace(self, split=split)


def device_of(project: Project, requested: str | None = None) -> torch.device:
    """The torch device for `requested` (None: `[project] device`), resolved once per project."""
    from conceptscope_cli.devices import resolve_device

    spelled = requested or project.settings.device
    if spelled not in project.devices:
        project.devices[spelled] = resolve_device(spelled)
    return project.devices[spelled]


def run_context(project: Project, dataset: str | None = None, split: str | None = None, *,
                device: str | None = None) -> RunContext:
    """Resolve the run's choices (see the module docstring); `device` None: `[project] device`."""
    from conceptscope_cli.devices import precision_of

    name, dataset_cfg = project.dataset(dataset)
    spelled = device or project.settings.device
    return RunContext(
        dataset=name, dataset_cfg=dataset_cfg, split=project.split(dataset_cfg, split),
        device=device_of(project, spelled),
        precision=precision_of(project.manifest.get(BackboneConfig).precision, "[backbone] precision"),
        train_precision=precision_of(project.manifest.get(SAEConfig).autocast, "[sae] autocast"),
        seed=project.settings.seed, device_name=spelled,
    )
