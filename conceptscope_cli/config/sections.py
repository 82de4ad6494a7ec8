"""The manifest sections of `cscope.toml`.

Each section is a dataclass; each field's `help` is shown by `cscope CMD --help` and in
the template. Register new sections at the bottom of this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from conceptscope_cli.config.manifest import register_section
from conceptscope_cli.config.schema import FieldValueError


def _help(text: str, **kwargs):  # noqa: ANN003, ANN202 - thin wrapper over dataclasses.field
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class ProjectConfig:
    name: str = _help("Project name, shown in reports.", default="cscope-project")
    seed: int = _help("Seed for every random choice of every stage.", default=0)
    device: str = _help('Torch device: "auto" (cuda if available, else cpu), "cpu", "cuda:0", ...', default="auto")
    cache_dir: Optional[str] = _help(
        "Shared cache of activations, SAEs and latents. Default <project>/.cscope/cache; "
        "the CSCOPE_CACHE environment variable overrides it.",
        default=None,
    )
    outputs_dir: str = _help("Where human-facing outputs (JSON, PNG, HTML) are written.", default="outputs")
    num_workers: int = _help("DataLoader worker processes that decode images.", default=2)


@dataclass(frozen=True)
class BackboneConfig:
    model: str = _help(
        "open_clip model name (ViT-B-16), hf-hub:ORG/REPO, local-dir:PATH (a folder with "
        "open_clip_config.json), an alias such as openai/clip-vit-large-patch14, or "
        "example:tiny-clip for the embedded example model.",
        default="ViT-B-16",
    )
    pretrained: Optional[str] = _help(
        "open_clip pretrained tag (openai, laion2b_s34b_b88k, ...) or a local checkpoint file. "
        "Ignored for hf-hub:, local-dir: and example: models.",
        default="openai",
    )
    layer: int = _help("Residual-stream block whose output is captured; negative counts from the end.", default=-2)
    tokens: Literal["all", "cls", "patches"] = _help("Which tokens are kept: all, cls only, or patches only.", default="all")
    dtype: Literal["float16", "float32"] = _help("Storage dtype of cached activations.", default="float16")
    precision: Literal["fp32", "bf16"] = _help("Compute precision; bf16 autocast is used only on CUDA.", default="fp32")


@dataclass(frozen=True)
class DatasetConfig:
    source: Literal["hf", "imagefolder", "disk"] = _help(
        'Where the data comes from: "hf" (a Hugging Face Hub dataset id), "imagefolder" (a local folder '
        'of images, optionally with metadata.jsonl), "disk" (a folder written by save_to_disk).'
    )
    path: str = _help("Hub dataset id, or a folder path (relative to the project).")
    config: Optional[str] = _help("Hub dataset configuration name.", default=None)
    revision: Optional[str] = _help("Hub dataset revision (commit or tag) to pin.", default=None)
    splits: list[str] = _help("Splits used by the pipeline; the first is the default split.", default_factory=lambda: ["train"])
    image_column: str = _help("Column holding the images.", default="image")
    label_column: Optional[str] = _help(
        'Column holding the class labels: a ClassLabel, integers, or strings ("" for unlabelled data).', default="label"
    )
    labels_from: Literal["auto", "column", "folder"] = _help(
        'Where labels come from: "column" (label_column), "folder" (each image\'s parent folder name, for an '
        'imagefolder with class folders, with or without a metadata file), "auto" (the column when the data has it, '
        "else class folders).",
        default="auto",
    )
    class_names: Optional[list[str]] = _help(
        "Class names in label order; default: the label column's ClassLabel names, or the string labels / class "
        "folder names found in all splits, sorted.",
        default=None,
    )
    attribute_columns: list[str] = _help(
        "Context/attribute columns kept for evaluation (e.g. background, place).", default_factory=list
    )
    streaming: bool = _help("Stream the split instead of materialising it (huge hub datasets).", default=False)


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = _help("Images per forward pass.", default=64)
    shard_size: int = _help("Dataset rows per cache shard; the unit of resume after an interruption.", default=2048)
    chunk_images: int = _help("Images per HDF5 chunk (the unit of sequential reads).", default=16)
    limit: Optional[int] = _help("Only the first N rows of the split.", default=None)
    tokens_per_image: Optional[int] = _help(
        "Keep a seeded random subset of K patch tokens per image (CLS always kept), for splits too large to cache whole.",
        default=None,
    )


@dataclass(frozen=True)
class RunConfig:
    dataset: Optional[str] = _help("Dataset used when a command gets no --dataset (default: the only one).", default=None)
    stages: list[str] = _help(
        "Stages `cscope run` executes, in pipeline order (default: all of them).",
        default_factory=lambda: ["extract", "train", "dict", "categorize", "export"],
    )




@dataclass(frozen=True)
class DictConfig:
    sae: Optional[str] = _help(
        "SAE folder (sae.safetensors + cfg.json) to use instead of the one `cscope train` makes from [sae].", default=None
    )
    value_dtype: Literal["float32", "float16"] = _help("Storage dtype of the sparse image-level latents.", default="float32")
    noisy_threshold: float = _help("A latent whose mean activation when active exceeds this is noisy (ConceptScope: 0.1).", default=0.1)
    strong_value: float = _help("Activation an image must exceed to count as strong for a latent (ConceptScope: 0.5).", default=0.5)
    min_strong_images: int = _help("A latent is valid with at least this many strong images (ConceptScope: 2).", default=2)
    reference_images: int = _help("Top images per latent in its reference tile.", default=5)
    naming_images: int = _help("Top images whose mean CLIP embedding names a latent (clip namer).", default=20)
    namer: Literal["clip", "openai", "none"] = _help(
        "clip: offline, CLIP similarity to a vocabulary; openai: an OpenAI-compatible VLM ([openai] section); none.",
        default="clip",
    )
    vocabulary: Optional[str] = _help("Text file with one label per line for the clip namer (default: shipped vocabulary).", default=None)
    prompt_template: str = _help("Prompt the clip namer wraps each label in.", default="a photo of {}.")
    chunk_images: int = _help("Images encoded per block when computing latents.", default=64)
    group_latents: bool = _help(
        "Group valid latents that fire on the same images into concepts (concept_groups.json); "
        "false: every latent is its own group.", default=True
    )
    group_threshold: float = _help(
        "Two latents can share a group when the 99% lower confidence bound of their within-class correlation "
        "reaches this; complete linkage: every pair of members must (0 < t < 1).", default=0.3
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.group_threshold < 1.0:  # NaN fails the comparison too
            raise FieldValueError("group_threshold", f"must be in (0, 1), got {self.group_threshold!r}")


@dataclass(frozen=True)
class CategorizeConfig:
    num_samples: int = _help("Images sampled per class (seeded) for the alignment scores.", default=128)
    candidates: Union[int, Literal["all"]] = _help(
        'Valid latents per class, by concept strength, that are scored (reference: 20; "all" scores every active one).',
        default=20,
    )
    target_threshold: float = _help(
        "A candidate with normalised alignment >= this is a target concept (0.0, as in ConceptScope's code).", default=0.0
    )
    bias_threshold_sigma: float = _help(
        "A context concept is a bias when its strength >= mean + sigma * std of the class's context strengths.", default=1.0
    )
    strength: Literal["mean", "relative", "effect"] = _help(
        'Concept strength that ranks candidates and drives the bias rule: "mean" is f(c, y), the class mean activation '
        "(ConceptScope); \"relative\" divides it by the latent's mean over the whole split (the lift); \"effect\" is "
        "the standardised difference between the class and the rest of the split (Cohen's d), so a concept "
        "over-represented in a class stands out even when it covers a small area, and rare noisy latents do not.",
        default="mean",
    )
    gamma_sufficiency: float = _help("Mask exponent for the sufficiency image x * m^gamma.", default=0.5)
    gamma_necessity: float = _help("Mask exponent for the necessity image x * (1 - m^gamma).", default=0.001)
    prompt_templates: list[str] = _help(
        'Templates the class name is put in; similarity is the max over them. ["{}"] is the raw name, as in the reference.',
        default_factory=lambda: ["{}"],
    )
    batch_size: int = _help("Masked images per CLIP forward pass.", default=256)
    context_columns: list[str] = _help(
        "Attribute columns that mark context for the bias-discovery evaluation (e.g. [\"place\"]).", default_factory=list
    )
    context_classes: dict[str, str] = _help(
        'Evaluation ground truth: "column=value" -> the class whose bias it is, e.g. {"place=water" = "waterbird"}.',
        default_factory=dict,
    )
    evaluate_split: Optional[str] = _help("Split on which `cscope categorize --evaluate` measures precision@k.", default=None)
    precision_k: int = _help("k of the bias-discovery precision@k.", default=10)
    alignment: Literal["robust", "reference"] = _help(
        'Alignment estimator: "robust" = ratios of sample means (S = mean masked-keep sim / mean sim, N = 1 - mean '
        'masked-remove sim / mean sim), stable when a masked similarity nears 0; "reference" = ConceptScope\'s mean '
        "of per-image ratios (exact reproduction). With \"robust\", a candidate whose target/context decision flips "
        "inside the bootstrap CI of its normalised alignment is marked uncertain.",
        default="robust",
    )
    bias_rule: Literal["evidence", "reference"] = _help(
        'How a context concept becomes a bias: "evidence" = over-represented in the class versus the rest of the '
        "split (one-sided Mann-Whitney test, Benjamini-Hochberg q <= fdr over every tested (class, concept) pair, "
        'and Cliff\'s delta >= min_effect); "reference" = ConceptScope\'s strength >= mean + sigma * std rule.',
        default="evidence",
    )
    fdr: float = _help("False discovery rate of the evidence rule (Benjamini-Hochberg), in (0, 1).", default=0.05)
    min_effect: float = _help(
        "Smallest Cliff's delta (class vs rest, in [0, 1)) reported as a bias: 0.147 is the 'negligible' boundary "
        "of Romano et al. (2006); a 90/10 split gives ~0.8, a concept 3x more frequent from a 10% base ~0.2.",
        default=0.147,
    )
    bootstrap: int = _help("Bootstrap replicates of the confidence intervals (effect and alignment), >= 10.", default=400)
    confidence: float = _help("Level of the bootstrap confidence intervals, in (0, 1).", default=0.95)

    def __post_init__(self) -> None:
        checks = (("fdr", 0.0 < self.fdr < 1.0, "must be in (0, 1)"),
                  ("min_effect", 0.0 <= self.min_effect < 1.0, "must be in [0, 1)"),
                  ("bootstrap", self.bootstrap >= 10, "must be >= 10"),
                  ("confidence", 0.0 < self.confidence < 1.0, "must be in (0, 1)"))
        for key, ok, rule in checks:
            if not ok:  # NaN fails every comparison, so it lands here too
                raise FieldValueError(key, f"{rule}, got {getattr(self, key)!r}")


from conceptscope_cli.ablate.config import AblateConfig  # noqa: E402
from conceptscope_cli.dictionary.openai_namer import OpenAINamerConfig  # noqa: E402
from conceptscope_cli.export.config import ExportConfig  # noqa: E402 - [openai] lives with its namer
from conceptscope_cli.sae.config import SAEConfig  # noqa: E402 - the [sae] section lives with the SAE code

register_section("project", ProjectConfig)
register_section("backbone", BackboneConfig)
register_section("datasets", DatasetConfig, named=True)
register_section("extract", ExtractConfig)
register_section("run", RunConfig)
register_section("sae", SAEConfig)
register_section("dict", DictConfig)
register_section("categorize", CategorizeConfig)
register_section("openai", OpenAINamerConfig)
register_section("export", ExportConfig)
register_section("ablate", AblateConfig)
