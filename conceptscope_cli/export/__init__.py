"""`cscope export`: offline HTML report, class × concept tables, SAE weights (SAELens + cscope).

`export(project, dataset, split)` is the entry point; `ExportConfig` is the `[export]`
manifest section. The stage is imported lazily: `conceptscope_cli.config.sections` imports
`conceptscope_cli.export.config` while it is itself being imported, and the stage needs the
finished sections module.
"""

from __future__ import annotations

from typing import Any

from conceptscope_cli.export.config import ExportConfig

__all__ = ["ExportConfig", "ExportResult", "ExportedFile", "export"]


def __getattr__(name: str) -> Any:
    if name in ("ExportResult", "ExportedFile", "export"):
        from conceptscope_cli.export import stage

        return getattr(stage, name)
    raise AttributeError(name)
