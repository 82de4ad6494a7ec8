"""Training settings for `cscope train` (the `[sae]` section of `cscope.toml`).

Only plain field types are used (str, int, float, bool, Optional of those, Literal of
str) so the manifest system can turn this dataclass into TOML and back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional

Architecture = Literal["relu", "topk", "batchtopk"]


@dataclass
class SAEConfig:
    architecture: Literal["relu", "topk", "batchtopk"] = field(
        default="relu",
        metadata={"help": "relu: ReLU + L1 (ConceptScope/PatchSAE); topk: keep the k largest latents per token; "
                          "batchtopk: keep the k*B largest latents across the batch, learned threshold at inference."})
    expansion: int = field(default=32, metadata={"help": "Dictionary size as a multiple of the activation width d."})
    d_sae: Optional[int] = field(default=None, metadata={"help": "Explicit dictionary size; overrides expansion when set."})
    k: int = field(default=32, metadata={"help": "Active latents per token for topk / batchtopk."})
    l1_coefficient: float = field(default=8e-5, metadata={"help": "Weight of the L1 sparsity penalty (relu only)."})
    lr: float = field(default=4e-4, metadata={"help": "Adam learning rate after warm-up."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2."})
    warmup_steps: int = field(default=500, metadata={"help": "Linear learning-rate warm-up steps (0 disables)."})
    lr_decay: Literal["none", "cosine", "linear"] = field(
        default="none", metadata={"help": "Learning-rate decay after decay_start: none, cosine or linear."})
    decay_start: float = field(default=0.8, metadata={"help": "Fraction of training after which lr_decay begins."})
    min_lr_fraction: float = field(default=0.0, metadata={"help": "Final learning rate as a fraction of lr when decaying."})
    grad_clip: Optional[float] = field(default=None, metadata={"help": "Clip the global gradient norm to this value (unset = no clipping)."})
    batch_size: int = field(default=4096, metadata={"help": "Tokens per optimisation step (global, across all ranks)."})
    total_tokens: int = field(default=100_000_000, metadata={"help": "Training budget in TOKENS (not images); epochs repeat as needed."})
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

    def dictionary_size(self, d_in: int) -> int:
        """Number of latents m for activations of width d_in."""
        return int(self.d_sae) if self.d_sae else int(self.expansion) * int(d_in)

    def uses_sparse_kernels(self) -> bool:
        if self.sparse_decoder == "on":
            if self.architecture == "relu":
                raise ValueError("sparse_decoder='on' is only implemented for architecture='topk' or 'batchtopk'")
            return True
        return self.sparse_decoder == "auto" and self.architecture in ("topk", "batchtopk")

    def validate(self) -> None:
        if self.architecture not in ("relu", "topk", "batchtopk"):
            raise ValueError(f"unknown architecture {self.architecture!r}")
        if self.batch_size <= 0 or self.total_tokens <= 0:
            raise ValueError("batch_size and total_tokens must be positive")
        if self.architecture != "relu" and self.k <= 0:
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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown SAE settings: {sorted(unknown)}")
        return cls(**values)
