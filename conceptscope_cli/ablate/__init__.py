"""`cscope ablate`: faithfulness curves, class ablation and latent edits with the SAE spliced
into the backbone (REFERENCE §6–§8).

Only the `[ablate]` section is imported eagerly: `conceptscope_cli.config.sections` imports it
while being imported itself, and the commands need the finished sections module.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from conceptscope_cli.ablate.config import AblateConfig

_LAZY = {
    "ClassAblation": "classes", "ClassAblationResult": "classes", "class_ablation": "classes",
    "EditResult": "edit", "ImageEdit": "edit", "PromptEdit": "edit",
    "CurveSummary": "faithfulness", "FaithfulnessResult": "faithfulness", "curve_area": "faithfulness",
}
# The `edit` and `faithfulness` functions share their modules' names: import them from
# conceptscope_cli.ablate.edit and conceptscope_cli.ablate.faithfulness.
__all__ = ["AblateConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"conceptscope_cli.ablate.{_LAZY[name]}"), name)
    raise AttributeError(name)
