"""The trained SAE in SAELens' folder format and in cscope's own format.

SAELens (https://github.com/jbloomAus/SAELens) reads a folder with `cfg.json` and
`sae_weights.safetensors`. The tensors are the same four as ours — W_enc (d_in, d_sae),
b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,) — and both libraries encode
f = σ((z − b_dec) W_enc + b_enc), decode ẑ = f W_dec + b_dec, so the weights are copied
unchanged. cscope folds any input scale into the weights, so the SAE takes raw residual
activations (`normalize_activations = "none"`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from conceptscope_cli.sae.checkpoint import read_cfg_json

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"


def saelens_config(cfg: dict[str, Any], *, context_size: Optional[int], dataset_path: Optional[str],
                   hook_layer: Optional[int], model_name: Optional[str]) -> dict[str, Any]:
    """SAELens `cfg.json` for a cscope SAE on a CLIP vision tower.

    Fields, read the way they apply to a vision hook point:

    - `architecture`: "standard" (ReLU, cscope `relu`), "topk" (with `k`; cscope `topk`), or
      "jumprelu" (cscope `batchtopk`: at inference BatchTopK is ReLU with one learned threshold θ,
      i.e. JumpReLU with θ for every latent, stored as the `threshold` tensor).
    - `d_in`: width of the residual stream (the ViT's `width`); `d_sae`: number of latents.
    - `dtype` "float32", `device` "cpu": how the weights are stored; move them as you like.
    - `model_name`: the open_clip model (name or `local-dir:` path) whose visual tower was hooked.
    - `hook_name`: `visual.transformer.resblocks.{L}` — the open_clip module whose *output* is the
      residual stream after block L (0-based, resolved from a negative `[backbone] layer`);
      `hook_layer`: that L. There is no TransformerLens hook for open_clip; the module path is
      what a forward hook in open_clip attaches to.
    - `hook_head_index`: null (the whole residual stream, not one attention head).
    - `context_size`: tokens per image (CLS + patches, e.g. 197 for ViT-B/16 at 224 px) — an
      image plays the role a text sequence plays in SAELens. Every token of the image was used.
    - `prepend_bos`: false (images have no BOS token; token 0 is CLS when kept).
    - `apply_b_dec_to_input`: true (b_dec is subtracted before encoding).
    - `normalize_activations`: "none" (any training-time input scale is folded into the weights).
    - `dataset_path`: the `[datasets.NAME]` source the activations came from (Hub id or folder);
      `dataset_trust_remote_code`: false.
    - `activation_fn_str` / `activation_fn_kwargs`: "relu" / {} or "topk" / {"k": k}, the
      SAELens < 6 spelling of the architecture, kept so older readers agree.
    - `metadata`: the same identifying fields nested the SAELens ≥ 6 way, plus cscope provenance.
    """
    architecture = cfg["architecture"]
    saelens_arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu"}[architecture]
    k = int(cfg["k"]) if architecture == "topk" else None
    hook_name = f"visual.transformer.resblocks.{hook_layer}" if hook_layer is not None else None
    identity: dict[str, Any] = {
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": hook_layer,
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": False,
        "dataset_path": dataset_path,
        "dataset_trust_remote_code": False,
        "model_class_name": "open_clip.CLIP.visual",
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
        "sae_lens_training_version": None,
    }
    out: dict[str, Any] = {
        "architecture": saelens_arch,
        "d_in": int(cfg["d_in"]),
        "d_sae": int(cfg["d_sae"]),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "activation_fn_str": "topk" if architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": k} if k is not None else {},
        "neuronpedia_id": None,
        **identity,
        "metadata": {**identity, "cscope": {"architecture": architecture, "k": cfg.get("k"), "provenance": cfg.get("provenance"),
                                            "eval": cfg.get("eval"), "input_scale_folded": cfg.get("input_scale_folded")}},
    }
    if k is not None:
        out["k"] = k
    return out


def export_sae(sae_dir: Path, out_dir: Path, *, context_size: Optional[int] = None, dataset_path: Optional[str] = None,
               ) -> dict[str, Path]:
    """Write `out_dir/saelens/{cfg.json, sae_weights.safetensors}` and `out_dir/cscope/{sae.safetensors,
    cfg.json}` (a byte copy of ours, readable by `load_sae`); returns the two folders."""
    cfg = read_cfg_json(sae_dir / "cfg.json")
    provenance = cfg.get("provenance") or {}
    hook_layer = provenance.get("layer_index", cfg.get("hook_layer"))
    if hook_layer is not None and int(hook_layer) < 0:
        hook_layer = None  # a negative layer cannot name a module; leave it to the reader
    model_name = cfg.get("model_name") or provenance.get("backbone")

    ours = out_dir / "cscope"
    ours.mkdir(parents=True, exist_ok=True)
    for name in ("sae.safetensors", "cfg.json"):
        shutil.copyfile(sae_dir / name, ours / name)

    lens = out_dir / "saelens"
    lens.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(sae_dir / "sae.safetensors"))
    weights = {name: tensors[name].float().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg["architecture"] == "batchtopk":
        theta = float(tensors["threshold"].reshape(()).clamp_min(0.0)) if "threshold" in tensors else 0.0
        weights["threshold"] = torch.full((int(cfg["d_sae"]),), theta)
    tmp = lens / (SAELENS_WEIGHTS + ".tmp")
    save_file(weights, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, lens / SAELENS_WEIGHTS)
    lens_cfg = saelens_config(cfg, context_size=context_size, dataset_path=dataset_path,
                              hook_layer=None if hook_layer is None else int(hook_layer), model_name=model_name)
    (lens / SAELENS_CONFIG).write_text(json.dumps(lens_cfg, indent=2, default=str) + "\n")
    return {"saelens": lens, "cscope": ours}
