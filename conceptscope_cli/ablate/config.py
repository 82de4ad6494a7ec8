"""Settings of `cscope ablate` (the `[ablate]` section of `cscope.toml`).

Plain field types only (str, int, float, bool, Optional, list[str], list[int], Literal) so
the manifest system can validate the section and write it into the template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

#: Scores a deletion / insertion curve can rank latents by (REFERENCE §6).
RANKINGS = ("attribution", "activation", "random", "negative_attribution")


@dataclass(frozen=True)
class AblateConfig:
    split: Optional[str] = field(
        default=None,
        metadata={"help": "Split that faithfulness curves and class ablation are measured on "
                          "(default: the dataset's last split, e.g. test)."})
    rank_split: Optional[str] = field(
        default=None,
        metadata={"help": "Split whose dictionary statistics and categorization rank each class's latents "
                          "(default: the dataset's first split, the one the SAE and dictionary are built on)."})
    max_images: Optional[int] = field(
        default=None, metadata={"help": "Only the first N rows of the split (required for a streaming split)."})
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass; also the unit of resume."})
    prompt_templates: list[str] = field(
        default_factory=lambda: ["a photo of a {}."],
        metadata={"help": "Templates the class names are put in; text features are averaged over them."})
    keep_error: bool = field(
        default=True,
        metadata={"help": "Keep the SAE error term z - z_hat in faithfulness curves and class ablation "
                          "(false: the SAE reconstruction alone replaces the residual stream, as in PatchSAE)."})
    n_deletions: int = field(
        default=20, metadata={"help": "Most latents removed (deletion) or put back (insertion) per image in a curve."})
    rankings: list[str] = field(
        default_factory=lambda: ["attribution", "activation", "random"],
        metadata={"help": "Scores that order each image's latents in the curves: attribution (gradient x "
                          "activation), activation, random (seeded, among active latents), negative_attribution."})
    band: Literal["ci95", "std"] = field(
        default="ci95", metadata={"help": "Error band of the curves in the plot: 95% CI of the mean, or one std."})
    ks: list[int] = field(
        default_factory=lambda: [1, 2, 5, 10, 50, 100, 500, 1000],
        metadata={"help": "Numbers of a class's top latents kept or zeroed in class ablation (clipped to the SAE width)."})
    class_ranking: Literal["class_mean", "class_frequency"] = field(
        default="class_mean",
        metadata={"help": "Statistic of the dictionary stage that ranks a class's latents: mean image-level "
                          "activation over the class, or the fraction of its images where the latent is active."})
    concept_groups: bool = field(
        default=True,
        metadata={"help": "Also zero each class's target / context / bias concepts from `cscope categorize` and "
                          "as many random (seeded) non-bias context latents as it has bias concepts."})
    random_repeats: int = field(
        default=3, metadata={"help": "Random context draws per class; their accuracies are averaged."})

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        unknown = [r for r in self.rankings if r not in RANKINGS]
        if unknown:
            raise ValueError(f"unknown ranking(s) {', '.join(map(repr, unknown))}; choose from {', '.join(RANKINGS)}")
        if not self.rankings:
            raise ValueError("rankings must name at least one score")
        if self.batch_size < 1:
            raise ValueError("batch_size must be positive")
        if self.n_deletions < 1:
            raise ValueError("n_deletions must be positive")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError("max_images must be positive")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError("ks must be a non-empty list of positive integers")
        if self.random_repeats < 1:
            raise ValueError("random_repeats must be positive")
        if not self.prompt_templates or any("{}" not in t for t in self.prompt_templates):
            raise ValueError('every prompt template must contain "{}" (where the class name goes)')
