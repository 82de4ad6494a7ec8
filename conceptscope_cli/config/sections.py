"""The manifest sections of `cscope.toml`: every section's dataclass lives here.

The config layer owns them so that reading a manifest imports no stage package (and no
torch). Each field's `help` (its metadata) is written into the template by `cscope init`.
Range checks go in a section's `__post_init__` (raise `FieldValueError(key, ...)` so the
error names the key's line) or its `validate()`. Register new sections at the bottom.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Union

from conceptscope_cli.config.manifest import register_section
from conceptscope_cli.config.schema import FieldValueError


def _help(text: str, **kwargs):  # noqa: ANN003, ANN202 - thin wrapper over dataclasses.field
    return field(metadata={"help": text}, **kwargs)


# ------------------------------------------------------------------ range checks
# Each section's __post_init__ lists its rules; the first broken one raises FieldValueError,
# which the loader turns into an error at that key's line (and a flag override into a usage error).
def _check(section: Any, *rules: tuple[str, bool, str]) -> None:
    for key, ok, rule in rules:
        if not ok:  # NaN fails every comparison, so it lands here too
            raise FieldValueError(key, f"{rule}, got {getattr(section, key)!r}")


def _at_least(value: Optional[int], low: int, *, optional: bool = False) -> bool:
    return (optional and value is None) or (value is not None and value >= low)


def _finite(value: Optional[float], *, optional: bool = False) -> bool:
    return (optional and value is None) or (value is not None and math.isfinite(value))


def _in(value: float, low: float, high: float, *, closed_high: bool = False) -> bool:
    return math.isfinite(value) and low <= value and (value <= high if closed_high else value < high)


def _fills(template: str) -> bool:
    """A template with one `{}` where the name goes, and no other field (`{name}` would fail later)."""
    try:
        return template.format("\0") != template and template.format("\0").count("\0") == 1
    except (IndexError, KeyError, ValueError):
        return False


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_SEED_MAX = 2**63 - 1


def valid_device(device: str) -> bool:
    """The devices cscope runs on ("meta" and the like hold no data, so nothing can run there)."""
    return _DEVICE.fullmatch(device) is not None


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

    def __post_init__(self) -> None:
        _check(self,
               ("seed", 0 <= self.seed <= _SEED_MAX, "must be in [0, 2^63)"),
               ("device", valid_device(self.device), 'must be "auto", "cpu", "mps", "cuda" or "cuda:N"'),
               ("num_workers", self.num_workers >= 0, "must be >= 0"),
               ("outputs_dir", bool(self.outputs_dir.strip()), "must name a folder"),
               ("cache_dir", self.cache_dir is None or bool(self.cache_dir.strip()), "must name a folder"))


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

    def __post_init__(self) -> None:
        _check(self, ("model", bool(self.model.strip()), "must name a model"))


# The keys of [datasets.NAME] that only the context-only check reads (`cscope categorize`): the
# dictionary does not depend on them, so they stay out of its stamp.
BOX_KEYS = ("object_box_column", "object_box_format", "object_box_units", "object_mask_column")


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
    object_box_column: Optional[str] = _help(
        "Column holding, per image, the bounding box of its class's object in the image's own pixels: [x0, y0, x1, "
        "y1] (x right, y down, x1 and y1 exclusive, floats allowed), a list of such boxes (several objects), or "
        "null / [] (no box: the image is left out of the context-only check, and counted). A dotted name "
        '("objects.bbox") reads a field of a struct column, such as a Hugging Face Sequence of dicts, when no '
        "column has that exact name. Unset: no boxes.",
        default=None,
    )
    object_box_format: Literal["xyxy", "xywh"] = _help(
        'How a box\'s four numbers read: "xyxy" = [x0, y0, x1, y1]; "xywh" = [x, y, width, height] (COCO).',
        default="xyxy",
    )
    object_box_units: Literal["pixels", "relative"] = _help(
        '"pixels" of the image itself; "relative": fractions of the image\'s width and height, 0 to 1 (Open Images).',
        default="pixels",
    )
    object_mask_column: Optional[str] = _help(
        "Column holding, per image, a segmentation mask of its class's object: an image of the same size, nonzero "
        "where the object is (a label map or palette image: every nonzero index), or null (no mask: left out of the "
        "context-only check, and counted). In an imagefolder's metadata.jsonl, name the mask file in a "
        '"<column>_file_name" field (mask_file_name for the column "mask"). Instead of object_box_column.',
        default=None,
    )

    def region_settings(self) -> dict[str, str] | None:
        """Where the objects are (the context-only check's input): the box column and how its boxes
        read, or the mask column; None when the dataset names neither."""
        if self.object_mask_column is not None:
            return {"mask_column": self.object_mask_column}
        if self.object_box_column is None:
            return None
        return {"column": self.object_box_column, "format": self.object_box_format, "units": self.object_box_units}

    def __post_init__(self) -> None:
        _check(self,
               ("path", bool(self.path.strip()), "must name a dataset or folder"),
               ("splits", bool(self.splits) and all(x.strip() for x in self.splits), "must list at least one split"),
               ("splits", len(set(self.splits)) == len(self.splits), "must not list a split twice"),
               ("image_column", bool(self.image_column.strip()), "must name a column"),
               ("class_names", self.class_names is None or (bool(self.class_names)
                                and len(set(self.class_names)) == len(self.class_names)),
                "must be a non-empty list without repeats"),
               ("object_box_column", self.object_box_column is None or (
                   bool(self.object_box_column.strip())
                   and self.object_box_column not in (self.image_column, self.label_column)),
                "must name a column other than image_column and label_column"),
               ("object_mask_column", self.object_mask_column is None or (
                   bool(self.object_mask_column.strip())
                   and self.object_mask_column not in (self.image_column, self.label_column)),
                "must name a column other than image_column and label_column"),
               ("object_mask_column", self.object_mask_column is None or self.object_box_column is None,
                "give object boxes or object masks, not both (object_box_column is set too)"))


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = _help("Images per forward pass.", default=64)
    shard_size: int = _help("Dataset rows per cache shard; the unit of resume after an interruption.", default=2048)
    chunk_images: int = _help("Images per HDF5 chunk (the unit of sequential reads).", default=16)
    limit: Optional[int] = _help("Only the first N rows of the split.", default=None)
    tokens_per_image: Optional[int] = _help(
        "Patch tokens per image in the token cache that `cscope train` reads: a seeded random subset of K (CLS always "
        "kept; K >= the patch count keeps every token; 0 = every token). The dictionary never needs this cache "
        "([dict] source). ImageNet-1k at ViT-L/14: 16 + CLS tokens = 45 GB in float16 instead of 674 GB.",
        default=16,
    )

    def __post_init__(self) -> None:
        _check(self,
               ("batch_size", self.batch_size >= 1, "must be >= 1"),
               ("shard_size", self.shard_size >= 1, "must be >= 1"),
               ("chunk_images", self.chunk_images >= 1, "must be >= 1"),
               ("limit", _at_least(self.limit, 1, optional=True), "must be >= 1 (leave it out for every row)"),
               ("tokens_per_image", _at_least(self.tokens_per_image, 0, optional=True),
                "must be >= 0 (0 keeps every token)"))


@dataclass(frozen=True)
class RunConfig:
    dataset: Optional[str] = _help("Dataset used when a command gets no --dataset (default: the only one).", default=None)
    stages: list[str] = _help(
        "Stages `cscope run` executes, in pipeline order (default: all of them).",
        default_factory=lambda: ["extract", "train", "dict", "categorize", "export"],
    )

    def __post_init__(self) -> None:
        _check(self, ("stages", len(set(self.stages)) == len(self.stages), "must not list a stage twice"))




@dataclass(frozen=True)
class DictConfig:
    sae: Optional[str] = _help(
        "SAE folder (sae.safetensors + cfg.json) to use instead of the one `cscope train` makes from [sae].", default=None
    )
    value_dtype: Literal["float32", "float16"] = _help("Storage dtype of the sparse image-level latents.", default="float32")
    source: Literal["auto", "images", "cache"] = _help(
        "Where image latents come from: cache = the full token cache (extracted when missing); images = stream the "
        "images through the backbone to block L and the SAE in one pass, no token cache; auto = a complete token "
        "cache when one exists, images otherwise.",
        default="auto",
    )
    valid_rule: Literal["relative", "reference"] = _help(
        'How the valid-latent thresholds are set. "relative": noisy_threshold = relative_noisy * s and strong_value '
        "= relative_strong * s, where s is the 90th percentile over firing latents of their largest image-level "
        'activation on the split (works on any backbone without editing); "reference": noisy_threshold and '
        "strong_value as given, in activation units (ConceptScope's 0.1 / 0.5, chosen for ViT-L/14).",
        default="relative",
    )
    relative_noisy: float = _help(
        'valid_rule "relative": a latent whose mean activation when active exceeds this fraction of s is noisy.', default=0.5
    )
    relative_strong: float = _help(
        'valid_rule "relative": an image above this fraction of s counts as strong for a latent.', default=0.05
    )
    noisy_threshold: float = _help(
        'valid_rule "reference": a latent whose mean activation when active exceeds this is noisy (ConceptScope: 0.1).',
        default=0.1,
    )
    strong_value: float = _help(
        'valid_rule "reference": activation an image must exceed to count as strong for a latent (ConceptScope: 0.5).',
        default=0.5,
    )
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
        _check(self,
               ("noisy_threshold", _finite(self.noisy_threshold) and self.noisy_threshold >= 0, "must be finite and >= 0"),
               ("strong_value", _finite(self.strong_value) and self.strong_value >= 0, "must be finite and >= 0"),
               ("min_strong_images", self.min_strong_images >= 1, "must be >= 1"),
               ("reference_images", self.reference_images >= 1, "must be >= 1"),
               ("naming_images", self.naming_images >= 1, "must be >= 1"),
               ("prompt_template", _fills(self.prompt_template), 'must contain one "{}" (where the label goes) '
                                                                  "and no other {field}"),
               ("chunk_images", self.chunk_images >= 1, "must be >= 1"),
               ("group_threshold", 0.0 < self.group_threshold < 1.0, "must be in (0, 1)"))


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
    base_rate: Literal["typical", "rest"] = _help(
        'What the evidence rule compares a class with: "typical" = the rest of the split (the test, q and CI) '
        "and also the typical other class (the class-vs-class Cliff's delta that a strict majority of the other "
        'classes give, the median for an odd count, must reach min_effect, so a concept is not over-represented only because some classes lack it); '
        '"rest" = the rest of the split alone.', default="typical")
    fdr: float = _help("False discovery rate of the evidence rule (Benjamini-Hochberg), in (0, 1).", default=0.05)
    min_effect: float = _help(
        "Smallest Cliff's delta (class vs rest, in [0, 1)) reported as a bias: 0.147 is the 'negligible' boundary "
        "of Romano et al. (2006); a 90/10 split gives ~0.8, a concept 3x more frequent from a 10% base ~0.2.",
        default=0.147,
    )
    context_check: Literal["auto", "off"] = _help(
        'Check every bias claim on the images without their object: "auto" does when the dataset names an '
        "object_box_column or object_mask_column (the patch tokens the object touches are dropped from the ViT's "
        "sequence and the claim's "
        "over-representation is measured again, same base rate and min_effect, its CI above 0); a claim that "
        'fails is listed as entangled, not as bias. "off" skips it.', default="auto")
    context_samples: int = _help("Images sampled per class (seeded) for the context-only check.", default=128)
    bootstrap: int = _help("Bootstrap replicates of the confidence intervals (effect and alignment), >= 10.", default=400)
    confidence: float = _help("Level of the bootstrap confidence intervals, in (0, 1).", default=0.95)
    replicates: int = _help(
        "Also train this many SAEs with other seeds ([sae] seed + 1..N) on the same activations, categorize each, "
        "and give every bias claim the fraction of replicates that make it (0: none; `--replicates N`).", default=0
    )
    replicate_match: float = _help(
        "A replicate makes a claim when its bias list for the class holds a concept whose within-class correlation "
        "with the claim's concept (image-level activations, same images) is at least this, in (0, 1).", default=0.5
    )

    def __post_init__(self) -> None:
        _check(self,
               ("num_samples", self.num_samples >= 1, "must be >= 1"),
               ("candidates", self.candidates == "all" or (isinstance(self.candidates, int) and self.candidates >= 1),
                'must be >= 1 or "all"'),
               ("target_threshold", _finite(self.target_threshold), "must be a finite number"),
               ("bias_threshold_sigma", _finite(self.bias_threshold_sigma), "must be a finite number"),
               ("gamma_sufficiency", _finite(self.gamma_sufficiency) and self.gamma_sufficiency > 0, "must be > 0"),
               ("gamma_necessity", _finite(self.gamma_necessity) and self.gamma_necessity > 0, "must be > 0"),
               ("prompt_templates", bool(self.prompt_templates) and all(_fills(t) for t in self.prompt_templates),
                'must be a non-empty list of templates with one "{}" each (where the class name goes)'),
               ("batch_size", self.batch_size >= 1, "must be >= 1"),
               ("precision_k", self.precision_k >= 1, "must be >= 1"),
               ("fdr", 0.0 < self.fdr < 1.0, "must be in (0, 1)"),
               ("replicates", self.replicates >= 0, "must be >= 0"),
               ("replicate_match", 0.0 < self.replicate_match < 1.0, "must be in (0, 1)"),
               ("min_effect", 0.0 <= self.min_effect < 1.0, "must be in [0, 1)"),
               ("context_samples", self.context_samples >= 1, "must be >= 1"),
               ("bootstrap", self.bootstrap >= 10, "must be >= 10"),
               ("confidence", 0.0 < self.confidence < 1.0, "must be in (0, 1)"))


# ------------------------------------------------------------------ [sae]: `cscope train`
@dataclass
class SAEConfig:
    architecture: Literal["relu", "topk", "batchtopk"] = field(
        default="topk",
        metadata={"help": "topk (default): keep the k largest latents per token, a sparse code on any backbone "
                          "without tuning; relu: ReLU + L1 (ConceptScope/PatchSAE's recipe, with l1_coefficient); "
                          "batchtopk: keep the k*B largest latents across the batch, learned threshold at inference."})
    # "auto" values are chosen from the width d and the data size by sae/recipe.py before training.
    expansion: Union[int, Literal["auto"]] = field(
        default="auto", metadata={"help": 'Dictionary size as a multiple of the activation width d. "auto": the '
                                          "largest power of two in [4, 32] at which every latent fires on 2,000 "
                                          "training tokens on average (N*k / (expansion*d) >= 2000)."})
    d_sae: Optional[int] = field(default=None, metadata={"help": "Explicit dictionary size; overrides expansion when set."})
    k: Union[int, Literal["auto"]] = field(
        default="auto", metadata={"help": 'Active latents per token for topk / batchtopk. "auto": d/8 within [8, 64].'})
    l1_coefficient: float = field(default=8e-5, metadata={"help": "Weight of the L1 sparsity penalty (relu only)."})
    lr: float = field(default=4e-4, metadata={"help": "Adam learning rate after warm-up."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2."})
    warmup_steps: Union[int, Literal["auto"]] = field(
        default="auto", metadata={"help": 'Linear learning-rate warm-up steps (0 disables). "auto": min(500, a tenth '
                                          "of the steps)."})
    lr_decay: Literal["none", "cosine", "linear"] = field(
        default="none", metadata={"help": "Learning-rate decay after decay_start: none, cosine or linear."})
    decay_start: float = field(default=0.8, metadata={"help": "Fraction of training after which lr_decay begins."})
    min_lr_fraction: float = field(default=0.0, metadata={"help": "Final learning rate as a fraction of lr when decaying."})
    grad_clip: Optional[float] = field(default=None, metadata={"help": "Clip the global gradient norm to this value (unset = no clipping)."})
    batch_size: int = field(default=4096, metadata={"help": "Tokens per optimisation step (global, across all ranks)."})
    total_tokens: Union[int, Literal["auto"]] = field(
        default="auto", metadata={"help": 'Training budget in TOKENS (not images); epochs repeat as needed. "auto": 25 '
                                          "passes over the cached training tokens, at least 1,000 steps, at most 200M "
                                          "tokens; an explicit budget 10x away from that is warned about."})
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = field(
        default="geometric_median", metadata={"help": "Initial decoder bias: geometric median, mean or zeros."})
    geometric_median_samples: int = field(default=16384, metadata={"help": "Tokens sampled for the b_dec initialisation and input-scale estimate."})
    ghost_grads: bool = field(default=True, metadata={"help": "Ghost-grad loss for dead latents (relu architecture only)."})
    dead_window: int = field(default=64, metadata={"help": "Steps without firing after which a latent counts as dead for ghost grads / AuxK."})
    dead_metric_tokens: int = field(default=10_000_000, metadata={"help": "Token window over which the reported dead fraction is measured."})
    mse_normalization: Literal["reference", "none"] = field(
        default="reference", metadata={"help": "reference: squared error divided by the token norm (ConceptScope); none: plain MSE."})
    scale_inputs: bool = field(default=False, metadata={"help": "Scale inputs to unit mean squared norm while training; the factor is folded into the saved weights."})
    aux_k: int = field(default=512, metadata={"help": "Dead latents used by the AuxK loss (topk / batchtopk)."})
    aux_coefficient: float = field(default=1 / 32, metadata={"help": "Weight of the AuxK loss (0 disables)."})
    shuffle_buffer: int = field(default=131072, metadata={"help": "Tokens held in the shuffle buffer (bounds memory; larger mixes better)."})
    checkpoint_every: int = field(default=1000, metadata={"help": "Steps between resumable training checkpoints (0 disables)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Most recent training checkpoints kept on disk."})
    metrics_every: int = field(default=50, metadata={"help": "Steps between metric records in metrics.jsonl."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Last fraction of the cached images held out for the final evaluation."})
    eval_max_tokens: int = field(default=2_000_000, metadata={"help": "At most this many held-out tokens are evaluated."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation and data order."})
    autocast: Literal["none", "bf16"] = field(default="bf16", metadata={"help": "bf16 autocast of the forward pass (CUDA only; CPU always runs float32)."})
    sparse_decoder: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "Sparse encoder-backward/decoder kernels for topk and batchtopk (auto = on for both)."})
    batchtopk_threshold_momentum: float = field(default=0.99, metadata={"help": "EMA momentum of the BatchTopK inference threshold."})
    wandb: bool = field(default=False, metadata={"help": "Log metrics to Weights & Biases (needs the wandb package)."})
    wandb_project: str = field(default="cscope", metadata={"help": "W&B project name."})

    def __post_init__(self) -> None:
        _check(self,
               ("expansion", self.expansion == "auto" or self.expansion >= 1, 'must be >= 1 or "auto"'),
               ("d_sae", _at_least(self.d_sae, 1, optional=True), "must be >= 1 (leave it out to use expansion)"),
               ("k", self.k == "auto" or self.k >= 1, 'must be >= 1 or "auto"'),
               ("k", self.d_sae is None or self.architecture == "relu" or self.k == "auto" or self.k <= self.d_sae,
                "must be <= d_sae"),
               ("l1_coefficient", _finite(self.l1_coefficient) and self.l1_coefficient >= 0, "must be finite and >= 0"),
               ("lr", _finite(self.lr) and self.lr > 0, "must be finite and > 0"),
               ("adam_beta1", _in(self.adam_beta1, 0.0, 1.0), "must be in [0, 1)"),
               ("adam_beta2", _in(self.adam_beta2, 0.0, 1.0), "must be in [0, 1)"),
               ("warmup_steps", self.warmup_steps == "auto" or self.warmup_steps >= 0, 'must be >= 0 or "auto"'),
               ("decay_start", _in(self.decay_start, 0.0, 1.0, closed_high=True), "must be in [0, 1]"),
               ("min_lr_fraction", _in(self.min_lr_fraction, 0.0, 1.0, closed_high=True), "must be in [0, 1]"),
               ("grad_clip", self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0),
                "must be > 0 (leave it out for no clipping)"),
               ("batch_size", self.batch_size >= 1, "must be >= 1"),
               ("total_tokens", self.total_tokens == "auto" or self.total_tokens >= 1, 'must be >= 1 or "auto"'),
               ("geometric_median_samples", self.geometric_median_samples >= 1, "must be >= 1"),
               ("dead_window", self.dead_window >= 1, "must be >= 1"),
               ("dead_metric_tokens", self.dead_metric_tokens >= 1, "must be >= 1"),
               ("aux_k", self.aux_k >= 1, "must be >= 1"),
               ("aux_coefficient", _finite(self.aux_coefficient) and self.aux_coefficient >= 0, "must be finite and >= 0"),
               ("shuffle_buffer", self.shuffle_buffer >= 1, "must be >= 1"),
               ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0 (0 disables checkpoints)"),
               ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
               ("metrics_every", self.metrics_every >= 1, "must be >= 1"),
               ("eval_fraction", _in(self.eval_fraction, 0.0, 1.0), "must be in [0, 1)"),
               ("eval_max_tokens", self.eval_max_tokens >= 1, "must be >= 1"),
               ("seed", 0 <= self.seed <= _SEED_MAX, "must be in [0, 2^63)"),
               ("batchtopk_threshold_momentum", _in(self.batchtopk_threshold_momentum, 0.0, 1.0), "must be in [0, 1)"),
               ("wandb_project", bool(self.wandb_project.strip()), "must name a project"))

    def dictionary_size(self, d_in: int) -> int:
        """Number of latents m for activations of width d_in."""
        if self.d_sae:
            return int(self.d_sae)
        if self.expansion == "auto":
            raise ValueError('expansion = "auto" is resolved by sae.recipe.resolve_recipe before training')
        return int(self.expansion) * int(d_in)

    def uses_sparse_kernels(self) -> bool:
        if self.sparse_decoder == "on":
            if self.architecture == "relu":
                raise ValueError("sparse_decoder='on' is only implemented for architecture='topk' or 'batchtopk'")
            return True
        return self.sparse_decoder == "auto" and self.architecture in ("topk", "batchtopk")

    def validate(self) -> None:
        if self.architecture not in ("relu", "topk", "batchtopk"):
            raise ValueError(f"unknown architecture {self.architecture!r}")
        if self.batch_size <= 0 or (self.total_tokens != "auto" and int(self.total_tokens) <= 0):
            raise ValueError("batch_size and total_tokens must be positive")
        if self.architecture != "relu" and self.k != "auto" and int(self.k) <= 0:
            raise ValueError("k must be positive for topk / batchtopk")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        if self.lr_decay not in ("none", "cosine", "linear"):
            raise ValueError(f"unknown lr_decay {self.lr_decay!r}")
        if self.mse_normalization not in ("reference", "none"):
            raise ValueError(f"unknown mse_normalization {self.mse_normalization!r}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"unknown b_dec_init {self.b_dec_init!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



# ----------------------------------------------------- [openai]: the openai latent namer
DEFAULT_PROMPT = (
    "The image shows several crops side by side. In each crop only the regions relevant to "
    "one visual concept are visible; everything else is blacked out. What concept do the "
    "visible regions share (an object, part, texture, colour, pattern or scene)? Answer with "
    "the concept in 2-3 words, lower case, no punctuation, nothing else."
)


@dataclass(frozen=True)
class OpenAINamerConfig:
    """`[openai]`: how the openai namer reaches its chat-completions endpoint."""

    model: str = _help("Chat model with image input, e.g. gpt-4o-mini or gpt-4o (ConceptScope used gpt-4o).",
                       default="gpt-4o-mini")
    base_url: Optional[str] = _help(
        "Base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1 for vLLM. "
        "Default: the openai client's (OPENAI_BASE_URL or api.openai.com).",
        default=None,
    )
    prompt: str = _help("Instruction sent with each latent's reference tile.", default=DEFAULT_PROMPT)
    max_tokens: int = _help("Upper bound on answer tokens per latent.", default=16)
    concurrency: int = _help("Requests in flight at once.", default=8)
    max_retries: int = _help("Retries per latent on rate limits, server errors and timeouts.", default=5)
    timeout_s: float = _help("Seconds before one request times out (then it is retried).", default=60.0)
    api_key_env: str = _help("Environment variable (or .env key in the project folder) holding the API key.",
                             default="OPENAI_API_KEY")
    backoff_base_s: float = _help("First retry wait in seconds; doubles each retry, with jitter.", default=1.0)
    backoff_max_s: float = _help("Longest wait between retries, Retry-After included.", default=60.0)
    max_words: int = _help("Answers are cut to at most this many words.", default=4)

    def __post_init__(self) -> None:
        _check(self,
               ("model", bool(self.model.strip()), "must name a model"),
               ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
               ("concurrency", self.concurrency >= 1, "must be >= 1"),
               ("max_retries", self.max_retries >= 0, "must be >= 0"),
               ("timeout_s", _finite(self.timeout_s) and self.timeout_s > 0, "must be > 0"),
               ("backoff_base_s", _finite(self.backoff_base_s) and self.backoff_base_s >= 0, "must be >= 0"),
               ("backoff_max_s", _finite(self.backoff_max_s) and self.backoff_max_s >= 0, "must be >= 0"),
               ("max_words", self.max_words >= 1, "must be >= 1"),
               ("api_key_env", bool(self.api_key_env.strip()), "must name an environment variable"))


# ------------------------------------------------------------------ [export]
#: Every format `cscope export` can write.
FORMATS = ("html", "csv", "json", "saelens")


@dataclass(frozen=True)
class ExportConfig:
    formats: list[str] = field(
        default_factory=lambda: list(FORMATS),
        metadata={"help": 'What to write: "html" (offline report), "csv" and "json" (class x concept tables), '
                          '"saelens" (the SAE as a SAELens folder plus a copy in cscope\'s own format).'})
    out_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Output folder (relative to the project). Default <outputs>/report/<dataset>/<split>."})
    title: Optional[str] = field(default=None, metadata={"help": "Report title (default: the project name)."})
    concepts: Literal["categorized", "all"] = field(
        default="categorized",
        metadata={"help": 'Concept pages in the report: "categorized" (latents that are a candidate of some class) '
                          'or "all" valid latents.'})
    thumbnail_size: int = field(default=96, metadata={"help": "Longest side, in pixels, of image thumbnails in the report."})
    tile_height: int = field(default=64, metadata={"help": "Height, in pixels, of a reference tile in the report."})
    image_format: Literal["webp", "jpeg"] = field(
        default="webp", metadata={"help": "Encoding of report images (webp is smaller; jpeg for old viewers)."})
    quality: int = field(default=70, metadata={"help": "JPEG/WebP quality of report images (1-100)."})
    max_images_per_concept: int = field(
        default=8, metadata={"help": "Top images of the dataset, with the activation heatmap, on a concept page."})
    class_examples: int = field(
        default=3, metadata={"help": "High- and low-activation images (each) of a class on a concept page; 0 disables."})
    top_classes: int = field(default=10, metadata={"help": "Classes listed by concept strength on a concept page."})
    heatmap_opacity: float = field(default=0.6, metadata={"help": "Opacity of the activation heatmap drawn over an image (0-1)."})
    single_file_max_mb: float = field(
        default=50.0,
        metadata={"help": "Largest single-file report in MB; above it the report is a folder (index.html + assets/)."})

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise FieldValueError("formats", f"unknown export format(s) {', '.join(map(repr, unknown))}; choose from {', '.join(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise FieldValueError("quality", f"must be in 1..100, got {self.quality}")
        for name in ("thumbnail_size", "tile_height"):
            if getattr(self, name) < 8:
                raise FieldValueError(name, f"must be at least 8 pixels, got {getattr(self, name)}")
        for name in ("max_images_per_concept", "class_examples", "top_classes"):
            if getattr(self, name) < 0:
                raise FieldValueError(name, f"must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.heatmap_opacity <= 1.0:
            raise FieldValueError("heatmap_opacity", f"must be in [0, 1], got {self.heatmap_opacity!r}")
        if not (math.isfinite(self.single_file_max_mb) and self.single_file_max_mb > 0):
            raise FieldValueError("single_file_max_mb", f"must be positive, got {self.single_file_max_mb!r}")

    def __post_init__(self) -> None:
        self.validate()


# ------------------------------------------------------------------ [ablate]
#: Scores a deletion / insertion curve can rank latents by (METHOD §6).
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
            raise FieldValueError("rankings", f"unknown ranking(s) {', '.join(map(repr, unknown))}; choose from {', '.join(RANKINGS)}")
        if not self.rankings:
            raise FieldValueError("rankings", "must name at least one score")
        if self.batch_size < 1:
            raise FieldValueError("batch_size", f"must be positive, got {self.batch_size}")
        if self.n_deletions < 1:
            raise FieldValueError("n_deletions", f"must be positive, got {self.n_deletions}")
        if self.max_images is not None and self.max_images < 1:
            raise FieldValueError("max_images", f"must be positive, got {self.max_images}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise FieldValueError("ks", f"must be a non-empty list of positive integers, got {self.ks}")
        if self.random_repeats < 1:
            raise FieldValueError("random_repeats", f"must be positive, got {self.random_repeats}")
        if not self.prompt_templates or not all(_fills(t) for t in self.prompt_templates):
            raise FieldValueError("prompt_templates", 'every prompt template must contain one "{}" (where the class '
                                                      f"name goes) and no other field, got {self.prompt_templates}")

    def __post_init__(self) -> None:
        self.validate()



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
