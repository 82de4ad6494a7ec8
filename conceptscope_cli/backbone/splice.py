"""Splice an SAE into the ViT's residual stream at one block.

At the output of `visual.transformer.resblocks[L]` (normalised to batch-first (B, T, d)),
the spliced tokens are replaced by

    z′ = ẑ′ + (z − ẑ).detach()        ẑ = f W_dec + b_dec,  f = SAE.encode(z)
                                       ẑ′ = edit(f) W_dec + b_dec

With no edit, z′ equals z numerically (the forward pass is unchanged) while the backward
pass runs through the latents f, so ∂y/∂f is available for attribution (METHOD §6).
With an edit, the error term of the *clean* reconstruction is kept, as in saev's
interventions (METHOD §8). Dropping the error term gives the SAE-only model z′ = ẑ′.

Tokens that are not spliced pass through untouched. The same object serves attribution
(`retain_grad=True`, read `latents.grad` after backward) and ablations (`edit=`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from conceptscope_cli.backbone.capture import _batch_first, select_tokens
from conceptscope_cli.backbone.types import SaeLike, TokenSelection, VisualTower

# (latents (B, Ts, m), token positions (Ts,)) -> edited latents (B, Ts, m); Ts = the spliced tokens of T
LatentEditFn = Callable[[Float[Tensor, "B Ts m"], Int[Tensor, " Ts"]], Float[Tensor, "B Ts m"]]
TokenSpec = TokenSelection | Sequence[int] | torch.Tensor


@dataclass
class LatentEdit:
    """Zero, scale or set some latents, optionally only at some token positions.

    latents: latent ids, (k,) shared by the whole batch, or (B, k) one row per image
        (e.g. each image's own top-i latents in a deletion curve).
    mode: "zero" (f_k ← 0), "scale" (f_k ← value·f_k), "set" (f_k ← value).
    tokens: full-sequence token positions to edit (0 = CLS, 1.. = patches); None = every
        spliced token.
    """

    latents: Sequence[int] | torch.Tensor
    mode: Literal["zero", "scale", "set"] = "zero"
    value: float = 0.0
    tokens: Sequence[int] | torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("zero", "scale", "set"):
            raise ValueError(f"unknown latent edit mode {self.mode!r}")

    def __call__(self, f: Float[Tensor, "B Ts m"], positions: Int[Tensor, " Ts"]) -> Float[Tensor, "B Ts m"]:
        batch, n_tokens, m = f.shape
        ids = torch.as_tensor(self.latents, dtype=torch.long, device=f.device)
        latent_mask = torch.zeros(batch, m, dtype=torch.bool, device=f.device)
        if ids.numel():
            ids = ids.reshape(1, -1).expand(batch, -1) if ids.ndim == 1 else ids
            if ids.shape[0] != batch:
                raise ValueError(f"per-image latent ids have {ids.shape[0]} rows for a batch of {batch}")
            latent_mask.scatter_(1, ids, True)
        if self.tokens is None:
            token_mask = torch.ones(n_tokens, dtype=torch.bool, device=f.device)
        else:
            wanted = torch.as_tensor(self.tokens, dtype=torch.long, device=f.device)
            token_mask = torch.isin(positions.to(f.device), wanted)
        mask = latent_mask[:, None, :] & token_mask[None, :, None]  # (B, Ts, m)
        if self.mode == "zero":
            return f.masked_fill(mask, 0.0)
        if self.mode == "scale":
            return torch.where(mask, f * self.value, f)
        return torch.where(mask, torch.full_like(f, self.value), f)


def token_positions(n_tokens: int, tokens: TokenSpec) -> Int[Tensor, " Ts"]:
    """Full-sequence positions (Ts,) named by a selection or given explicitly."""
    if isinstance(tokens, str):
        return select_tokens(n_tokens, tokens)
    positions = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if positions.numel() and (positions.min() < 0 or positions.max() >= n_tokens):
        raise ValueError(f"token positions {positions.tolist()} outside a sequence of {n_tokens}")
    return positions


class SAESplice:
    """Context manager that splices `sae` into `visual` after block `layer`.

    Args:
        visual: an open_clip VisionTransformer.
        sae: object with encode((N, d) -> (N, m)) and decode((N, m) -> (N, d)) and b_dec (d,).
        layer: non-negative block index.
        tokens: which tokens go through the SAE ("all", "cls", "patches" or positions).
        keep_error: add the detached error term z − ẑ (forward unchanged); False runs the
            SAE reconstruction only.
        edit: applied to f before decoding (see `LatentEdit`).
        retain_grad: make `latents` keep its gradient (read `latents.grad` after backward).

    After each forward pass (the last one if several ran inside the context):
        latents      (B, Ts, m)  the latents that were decoded (after the edit)
        clean_latents(B, Ts, m)  the encoder's latents before the edit (no grad)
        error        (B, Ts, d)  z − ẑ of the clean reconstruction (detached)
        inputs       (B, Ts, d)  z at the spliced tokens (detached)
        output       (B, Ts, d)  z′ at the spliced tokens; keeps its gradient when retain_grad
        positions    (Ts,)       full-sequence token positions of the spliced tokens
    """

    def __init__(
        self,
        visual: VisualTower,
        sae: SaeLike,
        layer: int,
        *,
        tokens: TokenSpec = "all",
        keep_error: bool = True,
        edit: LatentEditFn | None = None,
        retain_grad: bool = False,
    ) -> None:
        blocks = visual.transformer.resblocks
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} does not exist: the model has {len(blocks)} blocks")
        self.visual = visual
        self.sae = sae
        self.layer = layer
        self.tokens = tokens
        self.keep_error = keep_error
        self.edit = edit
        self.retain_grad = retain_grad
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self.latents: Float[Tensor, "B Ts m"] | None = None
        self.clean_latents: Float[Tensor, "B Ts m"] | None = None
        self.error: Float[Tensor, "B Ts d"] | None = None
        self.inputs: Float[Tensor, "B Ts d"] | None = None
        self.output: Float[Tensor, "B Ts d"] | None = None
        self.positions: Int[Tensor, " Ts"] | None = None

    def __enter__(self) -> "SAESplice":
        if self._handle is not None:
            raise RuntimeError("SAESplice is already active")
        self._handle = self.visual.transformer.resblocks[self.layer].register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _decode(self, f: Float[Tensor, "B Ts m"]) -> Float[Tensor, "B Ts d"]:
        """(B, Ts, m) -> (B, Ts, d)."""
        batch, n_tokens, m = f.shape
        return self.sae.decode(f.reshape(batch * n_tokens, m)).reshape(batch, n_tokens, -1)

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        batch_first = _batch_first(self.visual)
        z = output if batch_first else output.transpose(0, 1)  # (B, T, d)
        batch, n_tokens, d = z.shape
        positions = token_positions(n_tokens, self.tokens).to(z.device)
        z_s = z[:, positions]  # (B, Ts, d)
        # The SAE runs in its own dtype (fp32); the stream goes back in the model's dtype.
        sae_dtype = self.sae.b_dec.dtype
        flat = z_s.reshape(-1, d).to(sae_dtype)
        f = self.sae.encode(flat).reshape(batch, len(positions), -1)  # (B, Ts, m)
        if self.retain_grad and self.edit is None and not f.requires_grad:
            f.requires_grad_(True)  # nothing upstream needs a gradient: f is the leaf of the backward pass
        recon = self._decode(f)
        error = (flat.reshape(batch, len(positions), d) - recon).detach()
        clean = f.detach()
        if self.edit is not None:
            f = self.edit(f, positions)
            if self.retain_grad and not f.requires_grad:
                f = f.detach().requires_grad_(True)
            recon = self._decode(f)
        if self.retain_grad:
            f.retain_grad()  # a no-op on a leaf, needed when the graph goes on upstream
        spliced = recon + error if self.keep_error else recon
        if self.retain_grad:
            spliced.retain_grad()
        out = z.clone()
        out[:, positions] = spliced.to(z.dtype)
        self.latents, self.clean_latents, self.error = f, clean, error
        self.inputs, self.output, self.positions = z_s.detach(), spliced, positions
        return out if batch_first else out.transpose(0, 1)


def pooled_tokens(visual: VisualTower, n_tokens: int) -> Int[Tensor, " n_read"] | None:
    """Token positions of the last block's output that the image embedding reads.

    None means every token (attentional pooling, or no pooling). Earlier blocks reach every
    token through attention, so this only matters for a splice at the last block.
    """
    if getattr(visual, "attn_pool", None) is not None:
        return None
    pool_type = getattr(visual, "pool_type", "tok")
    if pool_type == "tok":
        return torch.tensor([0])
    if pool_type == "avg":
        return torch.arange(1, n_tokens)
    return None


def splice_reaches_output(visual: VisualTower, layer: int, positions: Int[Tensor, " Ts"], n_tokens: int) -> bool:
    """Whether latents spliced at `positions` after block `layer` can change the image embedding."""
    if layer < len(visual.transformer.resblocks) - 1:
        return len(positions) > 0
    read = pooled_tokens(visual, n_tokens)
    if read is None:
        return len(positions) > 0
    return bool(torch.isin(positions.cpu(), read).any())
