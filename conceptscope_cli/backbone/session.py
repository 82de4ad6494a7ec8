"""What every stage that splices an SAE into the backbone checks first, in one place.

`check_sae_fits`: the SAE's width and recorded layer match the backbone; `check_reachable`: the
spliced tokens can change the pooled embedding at all (METHOD §6 caveat); `logit_scale_of`: the
model's CLIP logit scale (100, CLIP's trained value, when the model has none).
"""

from __future__ import annotations

from typing import Any, Protocol

from conceptscope_cli.backbone.capture import select_tokens
from conceptscope_cli.backbone.splice import splice_reaches_output
from conceptscope_cli.backbone.types import ClipModel, TokenSelection
from conceptscope_cli.errors import CscopeError

TOKEN_SELECTIONS: tuple[TokenSelection, ...] = ("all", "cls", "patches")
DEFAULT_LOGIT_SCALE = 100.0


class SaeShape(Protocol):
    """The part of an SAE the checks read."""

    d_in: int


def logit_scale_of(model: ClipModel) -> float:
    """exp(logit_scale) of a CLIP model; 100 when it has no learned scale."""
    return float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else DEFAULT_LOGIT_SCALE


def sae_layer(cfg: dict[str, Any], n_layers: int) -> int | None:
    """The block index the SAE was trained on, from cfg.json (None when it does not say).

    Raises CscopeError when the recorded layer cannot exist in a model of `n_layers` blocks,
    or when the as-written layer and the resolved index disagree (a model of another depth)."""
    provenance = cfg.get("provenance") or {}
    index = provenance.get("layer_index")
    written = cfg.get("hook_layer", provenance.get("layer"))
    index = int(index) if isinstance(index, int) else None
    written = int(written) if isinstance(written, int) and not isinstance(written, bool) else None
    if written is not None:
        resolved = written + n_layers if written < 0 else written
        if index is not None and resolved != index:
            raise CscopeError(
                f"the SAE was trained on layer {written} = block {index}, which is block {resolved} of this "
                f"{n_layers}-block backbone: it was trained on a different model",
                hint="train an SAE for this backbone (`cscope train`)",
            )
        index = resolved if index is None else index
    if index is not None and not 0 <= index < n_layers:
        raise CscopeError(f"the SAE was trained on block {index}, but the backbone has {n_layers} blocks")
    return index


def check_sae_fits(sae: SaeShape, cfg: dict[str, Any], backbone: Any, project_layer: int) -> tuple[int, TokenSelection]:
    """(layer, token selection) to splice at; CscopeError on any mismatch with the backbone."""
    if int(sae.d_in) != backbone.d_model:
        raise CscopeError(
            f"the SAE takes {sae.d_in}-dimensional inputs but the backbone's residual stream is {backbone.d_model}-dimensional",
            hint="the SAE was trained on another model; check [backbone] model and [dict] sae",
        )
    layer = sae_layer(cfg, backbone.n_layers)
    if layer is not None and layer != project_layer:
        raise CscopeError(
            f"the SAE was trained on block {layer}'s output, but [backbone] layer is block {project_layer}",
            hint="set [backbone] layer to the SAE's layer, or train an SAE for this layer",
        )
    tokens = cfg.get("token_selection")
    return project_layer, next((t for t in TOKEN_SELECTIONS if t == tokens), "all")


def check_reachable(backbone: Any, layer: int, tokens: TokenSelection) -> None:
    """METHOD §6 caveat: latents the pooled embedding cannot see would score exactly zero."""
    n_tokens = 1 + backbone.grid_size[0] * backbone.grid_size[1]
    positions = select_tokens(n_tokens, tokens)
    if not splice_reaches_output(backbone.visual, layer, positions, n_tokens):
        pool = getattr(backbone.visual, "pool_type", "?")
        reads = "the CLS token" if pool == "tok" else "the patch tokens"
        raise CscopeError(
            f"the SAE reads {tokens} tokens after the last block ({layer}), but the image embedding is "
            f"pooled from {reads} only ({pool!r} pooling): no latent can change the output, every attribution would be zero",
            hint="attribute with an SAE on an earlier layer (e.g. [backbone] layer = -2) or one that includes the pooled token",
        )
