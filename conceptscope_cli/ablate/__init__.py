"""`cscope ablate`: faithfulness curves, class ablation and latent edits with the SAE spliced
into the backbone (REFERENCE §6–§8)."""

from conceptscope_cli.ablate.classes import ClassAblation, ClassAblationResult, class_ablation
from conceptscope_cli.ablate.config import AblateConfig
from conceptscope_cli.ablate.edit import EditResult, ImageEdit, PromptEdit, edit
from conceptscope_cli.ablate.faithfulness import CurveSummary, FaithfulnessResult, curve_area, faithfulness

__all__ = [
    "AblateConfig", "ClassAblation", "ClassAblationResult", "CurveSummary", "EditResult", "FaithfulnessResult",
    "ImageEdit", "PromptEdit", "class_ablation", "curve_area", "edit", "faithfulness",
]
