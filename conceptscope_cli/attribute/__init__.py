"""`cscope attribute`: gradient × activation attribution of CLIP similarity to SAE latents."""

from conceptscope_cli.attribute.core import BatchAttribution, attribute_batch
from conceptscope_cli.attribute.run import AttributionResult, ImageScores, LatentScore, PromptScores, attribute

__all__ = [
    "AttributionResult", "BatchAttribution", "ImageScores", "LatentScore", "PromptScores", "attribute", "attribute_batch",
]
