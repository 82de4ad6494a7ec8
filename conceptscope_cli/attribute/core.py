"""Gradient × activation attribution of CLIP image–text similarity to SAE latents.

Notation: B images, P prompts, Ts spliced tokens, m latents, d residual width.

    y_bp = cos(CLIP_img(x_b), CLIP_txt(t_p))                     objective "cosine"
    y_bp = softmax_p(s · cos(·, t_p))                              objective "probability"
    R_bpk = Σ_t f_btk · ∂y_bp/∂f_btk                               (METHOD §6)

With the SAE spliced as z′ = f W_dec + b_dec + e (e detached), ∂y/∂f = (∂y/∂z′) W_decᵀ,
so the attributions are complete:

    Σ_k R_k + g·e + g·b_dec = g·z′        g = ∂y/∂z′ summed over the spliced tokens

Images do not interact in a ViT forward pass, so ∂(Σ_b y_bp)/∂f_b = ∂y_bp/∂f_b: one
backward pass per prompt covers the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from conceptscope_cli.backbone.splice import SAESplice, TokenSpec
from conceptscope_cli.backbone.types import ClipModel
from conceptscope_cli.sae.model import SparseAutoencoder

Objective = Literal["cosine", "probability"]


@dataclass
class BatchAttribution:
    """Scores of one batch. Top/bottom lists are per (image, prompt), strongest first.

    similarity, probability, objective   (B, P)   cos, softmax over prompts, the attributed y
    attribution                          (B, P, m) R_k
    activation                           (B, m)   mean of f_k over the spliced tokens
    error_term, bias_term, layer_term    (B, P)   g·e, g·b_dec, g·z′ (completeness terms)
    top_latents, bottom_latents          (B, P, k) ids by R descending / ascending
    top_maps, bottom_maps                (B, P, k, Ts) per-token R of those latents
    active_latents                       (B, k)   ids by activation descending
    active_maps                          (B, k, Ts) f of those latents per token
    positions                            (Ts,)    full-sequence token positions
    """

    similarity: Float[Tensor, "B P"]
    probability: Float[Tensor, "B P"]
    objective: Float[Tensor, "B P"]
    attribution: Float[Tensor, "B P m"]
    activation: Float[Tensor, "B m"]
    error_term: Float[Tensor, "B P"]
    bias_term: Float[Tensor, "B P"]
    layer_term: Float[Tensor, "B P"]
    top_latents: Int[Tensor, "B P k"]
    top_maps: Float[Tensor, "B P k Ts"]
    bottom_latents: Int[Tensor, "B P k"]
    bottom_maps: Float[Tensor, "B P k Ts"]
    active_latents: Int[Tensor, "B k"]
    active_maps: Float[Tensor, "B k Ts"]
    positions: Int[Tensor, " Ts"]


def image_text_scores(
    image_features: Float[Tensor, "B e"], text_embeddings: Float[Tensor, "P e"], logit_scale: float
) -> tuple[Float[Tensor, "B P"], Float[Tensor, "B P"]]:
    """(cos (B, P), softmax over prompts of logit_scale·cos (B, P)); text already normalised."""
    image = torch.nn.functional.normalize(image_features, dim=-1)
    cos = image @ text_embeddings.to(image.dtype).T
    return cos, torch.softmax(logit_scale * cos, dim=-1)


def _gather_maps(per_token: Float[Tensor, "B Ts m"], ids: Int[Tensor, "B k"]) -> Float[Tensor, "B k Ts"]:
    """per_token (B, Ts, m), ids (B, k) -> (B, k, Ts)."""
    return per_token.gather(2, ids[:, None, :].expand(-1, per_token.shape[1], -1)).transpose(1, 2)


def attribute_batch(
    model: ClipModel,
    sae: SparseAutoencoder,
    images: Float[Tensor, "B 3 H W"],
    text_embeddings: Float[Tensor, "P e"],
    *,
    layer: int,
    tokens: TokenSpec = "all",
    objective: Objective = "cosine",
    logit_scale: float = 100.0,
    top_k: int = 10,
) -> BatchAttribution:
    """Attribute y for every (image, prompt) pair of a batch.

    model: an open_clip CLIP (encode_image, .visual); images (B, 3, H, W) normalised model
    input; text_embeddings (P, e) L2-normalised.
    """
    if objective not in ("cosine", "probability"):
        raise ValueError(f"unknown objective {objective!r}")
    splice = SAESplice(model.visual, sae, layer, tokens=tokens, retain_grad=True)
    with torch.enable_grad(), splice:
        features = model.encode_image(images)
        cos, prob = image_text_scores(features.float(), text_embeddings, logit_scale)
        y = cos if objective == "cosine" else prob
        f, z = splice.latents, splice.output  # (B, Ts, m), (B, Ts, d)
        assert f is not None and z is not None and splice.error is not None
        error, b_dec = splice.error, sae.b_dec.detach()
        k = min(top_k, f.shape[-1])
        n_prompts = y.shape[1]
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in (
            "attribution", "error", "bias", "layer", "top", "top_maps", "bottom", "bottom_maps")}
        for p in range(n_prompts):
            grad_f, grad_z = torch.autograd.grad(y[:, p].sum(), [f, z], retain_graph=p < n_prompts - 1)
            per_token = f.detach() * grad_f  # (B, Ts, m)
            scores = per_token.sum(1)  # (B, m)
            outputs["attribution"].append(scores)
            outputs["error"].append((grad_z * error).sum((1, 2)))
            outputs["bias"].append((grad_z * b_dec).sum((1, 2)))
            outputs["layer"].append((grad_z * z.detach()).sum((1, 2)))
            top = scores.topk(k, dim=-1).indices  # (B, k)
            bottom = (-scores).topk(k, dim=-1).indices
            outputs["top"].append(top)
            outputs["top_maps"].append(_gather_maps(per_token, top))
            outputs["bottom"].append(bottom)
            outputs["bottom_maps"].append(_gather_maps(per_token, bottom))
    latents = f.detach()
    activation = latents.mean(1)  # (B, m)
    active = activation.topk(k, dim=-1).indices
    stack = {name: torch.stack(values, dim=1).detach() for name, values in outputs.items()}
    return BatchAttribution(
        similarity=cos.detach(), probability=prob.detach(), objective=y.detach(),
        attribution=stack["attribution"], activation=activation,
        error_term=stack["error"], bias_term=stack["bias"], layer_term=stack["layer"],
        top_latents=stack["top"], top_maps=stack["top_maps"],
        bottom_latents=stack["bottom"], bottom_maps=stack["bottom_maps"],
        active_latents=active, active_maps=_gather_maps(latents, active),
        positions=splice.positions.detach().cpu() if splice.positions is not None else torch.empty(0, dtype=torch.long),
    )


def concat_batches(parts: list[BatchAttribution]) -> BatchAttribution:
    """Join batches along the image axis (positions are shared)."""
    fields = BatchAttribution.__dataclass_fields__
    joined = {name: torch.cat([getattr(part, name).cpu() for part in parts], dim=0) for name in fields if name != "positions"}
    return BatchAttribution(**joined, positions=parts[0].positions)
