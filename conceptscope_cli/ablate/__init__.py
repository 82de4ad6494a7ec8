"""`cscope ablate`: faithfulness curves, class ablation and latent edits with the SAE spliced
into the backbone (REFERENCE §6–§8)."""

from conceptscope_cli.ablate.config import AblateConfig
from conceptscope_cli.ablate.faithfulness import CurveSummary, FaithfulnessResult, curve_area, faithfulness

__all__ = ["AblateConfig", "CurveSummary", "FaithfulnessResult", "curve_area", "faithfulness"]
