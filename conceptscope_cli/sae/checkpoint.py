"""Saving, loading and importing SAEs; resumable training checkpoints.

Final SAE directory (names chosen so SAELens / sparsify users recognise them):

    sae.safetensors   W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,),
                      threshold () for batchtopk
    cfg.json          architecture, d_in, d_sae, k, threshold, input scaling, provenance,
                      training config, eval metrics, versions

Training checkpoint (`checkpoints/step-00001234/`, written to a temporary directory and
renamed into place, so a directory that exists is complete):

    model.safetensors      raw (unfolded) parameters + threshold buffer
    optimizer.safetensors  optimizer state tensors; optimizer.json: param groups and layout
    trainer.safetensors    firing-tracker counters and RNG states
    state.json             step, data-stream position, input scale, metrics so far
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from .model import SparseAutoencoder

SAE_WEIGHTS = "sae.safetensors"
SAE_CONFIG = "cfg.json"
CHECKPOINT_DIR = "checkpoints"
SAE_FORMAT = "cscope-sae"
SAE_FORMAT_VERSION = 1


# --------------------------------------------------------------------- final SAE
def versions() -> dict[str, str]:
    import safetensors

    import conceptscope_cli

    return {"cscope": conceptscope_cli.__version__, "torch": torch.__version__,
            "safetensors": getattr(safetensors, "__version__", "unknown")}


def sae_config_dict(sae: SparseAutoencoder, *, input_scale: float = 1.0, provenance: Optional[dict] = None,
                    training: Optional[dict] = None, eval_metrics: Optional[dict] = None,
                    extra: Optional[dict] = None) -> dict[str, Any]:
    """cfg.json content for an SAE whose weights take raw activations (scale already folded)."""
    provenance = dict(provenance or {})
    threshold = float(sae.threshold) if sae.architecture == "batchtopk" else None
    cfg: dict[str, Any] = {
        "format": SAE_FORMAT,
        "format_version": SAE_FORMAT_VERSION,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k if sae.architecture != "relu" else None,
        "threshold": threshold,
        # SAELens vocabulary: b_dec is subtracted before encoding, inputs are raw.
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "activation_fn_str": "relu" if sae.architecture == "relu" else "topk",
        "activation_fn_kwargs": {"k": sae.k} if sae.architecture == "topk" else {},
        # The factor the SAE was trained with (inputs were multiplied by it); already folded
        # into W_enc/W_dec/b_dec, so decoder rows have norm 1/input_scale.
        "input_scale_folded": float(input_scale),
        "model_name": provenance.get("backbone"),
        "hook_layer": provenance.get("layer"),
        "token_selection": provenance.get("token_selection"),
        "provenance": provenance,
        "training": training,
        "eval": eval_metrics,
        "versions": versions(),
    }
    if extra:
        cfg.update(extra)
    return cfg


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def sae_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    tensors = {name: getattr(sae, name).detach().float().cpu().contiguous()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.architecture == "batchtopk":
        tensors["threshold"] = sae.threshold.detach().float().cpu().reshape(())
    return tensors


def save_sae(sae: SparseAutoencoder, directory: Path | str, cfg: dict[str, Any]) -> Path:
    """Write sae.safetensors + cfg.json into directory (created); returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (SAE_WEIGHTS + ".tmp")
    save_file(sae_tensors(sae), str(tmp), metadata={"format": SAE_FORMAT})
    os.replace(tmp, out / SAE_WEIGHTS)
    _write_json_atomic(out / SAE_CONFIG, cfg)
    return out


def load_sae(path: Path | str, device: str | torch.device = "cpu") -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Load an SAE saved by `save_sae` (path = its directory or its sae.safetensors).

    Returns (sae in eval mode taking raw activations, cfg dict)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    cfg = json.loads((directory / SAE_CONFIG).read_text())
    tensors = load_file(str(directory / SAE_WEIGHTS))
    sae = SparseAutoencoder(int(cfg["d_in"]), int(cfg["d_sae"]), cfg["architecture"], int(cfg.get("k") or 32))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
        if "threshold" in tensors:
            sae.threshold.copy_(tensors["threshold"].reshape(()))
    return sae.to(device).eval(), cfg


# ----------------------------------------------------------- training checkpoints
def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state_dict["param_groups"], "state": {}}
    for index, entry in state_dict["state"].items():
        plain_entry: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
                plain_entry[key] = {"tensor": f"state.{index}.{key}"}
            else:
                plain_entry[key] = value
        plain["state"][str(index)] = plain_entry
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for index, entry in plain["state"].items():
        state[int(index)] = {key: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
                             for key, value in entry.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_training_checkpoint(run_dir: Path, step: int, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any], extra_tensors: dict[str, torch.Tensor], keep: int = 2) -> Path:
    """Atomically write checkpoints/step-XXXXXXXX/ and prune all but the newest `keep`."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    tmp = root / f".tmp-{checkpoint_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model_tensors = {name: value.detach().cpu().contiguous() for name, value in sae.state_dict().items()}
    save_file(model_tensors, str(tmp / "model.safetensors"))
    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_plain, default=float))
    save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / "trainer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, default=float))
    for name in os.listdir(tmp):  # make the files durable before the rename publishes them
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_training_checkpoints(run_dir)[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_training_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)
             and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Returns {"model": state_dict, "optimizer": state_dict, "extra": tensors, "state": json dict}."""
    path = Path(path)
    opt_plain = json.loads((path / "optimizer.json").read_text())
    return {
        "model": load_file(str(path / "model.safetensors")),
        "optimizer": _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), opt_plain),
        "extra": load_file(str(path / "trainer.safetensors")),
        "state": json.loads((path / "state.json").read_text()),
    }


# ------------------------------------------------------------------- importers
class UnsafeCheckpointError(ValueError):
    """A .pt file references Python objects we refuse to unpickle."""


_PATH_GLOBALS = {"pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
                 "pathlib.Path", "pathlib._local.PosixPath", "pathlib._local.WindowsPath"}


def _is_config_class(qualified_name: str) -> bool:
    """Config classes are recognised by name (…Config / …Cfg); they are never imported or run."""
    return re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*(Config|Cfg)", qualified_name) is not None


def _config_stand_in(qualified_name: str) -> type:
    class ConfigStandIn:
        """Receives the pickled fields of a config object as plain data; runs no foreign code."""

        _qualified_name = qualified_name

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.__dict__["_args"] = list(args)
            self.__dict__.update(kwargs)

        def __setstate__(self, state: Any) -> None:
            if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
                for part in state:
                    if isinstance(part, dict):
                        self.__dict__.update(part)
            elif isinstance(state, dict):
                self.__dict__.update(state)
            else:
                self.__dict__["_state"] = state

    return ConfigStandIn


class _PathStandIn(str):
    def __new__(cls, *parts: Any) -> "_PathStandIn":
        return super().__new__(cls, "/".join(str(p) for p in parts))


def _to_plain(value: Any) -> Any:
    """Convert stand-ins and torch scalars to JSON-friendly data (tensors are kept)."""
    if hasattr(value, "_qualified_name") and not isinstance(value, type):
        fields = {k: _to_plain(v) for k, v in value.__dict__.items() if k != "_args" or v}
        return fields
    if isinstance(value, _PathStandIn):
        return str(value)
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value) if isinstance(value, list) else tuple(_to_plain(v) for v in value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return value


def restricted_torch_load(path: Path | str) -> Any:
    """torch.load a zip-format .pt with weights_only=True, letting through only config classes
    (mapped to stand-ins that hold their fields) and pathlib paths (mapped to str).

    Raises UnsafeCheckpointError naming every other global the file references."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(f"{path}: not a zip-format torch checkpoint (legacy .pt files are not supported)")
    referenced = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = []
    refused: list[str] = []
    for name in referenced:
        if _is_config_class(name):
            allowed.append((_config_stand_in(name), name))
        elif name in _PATH_GLOBALS:
            allowed.append((_PathStandIn, name))
        else:
            refused.append(name)
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load; it references Python globals that are not plain data: "
            f"{', '.join(sorted(refused))}. Only tensors, builtin containers and a config object are accepted.")
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only unpickler messages name the offending global
        raise UnsafeCheckpointError(f"{path}: could not be loaded safely: {error}") from error
    return _to_plain(obj)


def _sae_from_weights(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                      architecture: str, k: int, threshold: Optional[float] = None) -> SparseAutoencoder:
    d_in, d_sae = W_enc.shape
    if tuple(W_dec.shape) != (d_sae, d_in) or b_enc.shape[-1] != d_sae or b_dec.shape[-1] != d_in:
        raise ValueError(f"inconsistent SAE weight shapes: W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
                         f"b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}")
    sae = SparseAutoencoder(d_in, d_sae, architecture, k)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.float())
        sae.b_enc.copy_(b_enc.float().reshape(-1))
        sae.W_dec.copy_(W_dec.float())
        sae.b_dec.copy_(b_dec.float().reshape(-1))
        if threshold is not None:
            sae.threshold.fill_(float(threshold))
    return sae.eval()


def import_conceptscope_pt(path: Path | str, out_dir: Optional[Path | str] = None,
                           provenance: Optional[dict] = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read a ConceptScope / PatchSAE checkpoint ({"cfg": <config object>, "state_dict": {W_enc, b_enc,
    W_dec, b_dec}}) without arbitrary unpickling; returns (sae, cfg) in our format and writes it
    to out_dir when given. The original config becomes plain data under cfg["imported_from"]."""
    payload = restricted_torch_load(path)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(f"{path}: expected a dict with 'cfg' and 'state_dict'")
    state = payload["state_dict"]
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") if name not in state]
    if missing:
        raise ValueError(f"{path}: state_dict lacks {missing}")
    sae = _sae_from_weights(state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], "relu", 32)
    raw_cfg = payload.get("cfg")
    source_cfg = raw_cfg if isinstance(raw_cfg, dict) else {"value": repr(raw_cfg)}
    source_cfg = {k: v for k, v in source_cfg.items() if not isinstance(v, torch.Tensor)}
    merged_provenance = {
        "backbone": source_cfg.get("model_name"),
        "layer": source_cfg.get("block_layer", source_cfg.get("hook_point_layer")),
        "token_selection": source_cfg.get("class_token"),
        **(provenance or {}),
    }
    cfg = sae_config_dict(sae, provenance=merged_provenance,
                          extra={"imported_from": {"format": "conceptscope-pt", "path": str(path), "config": source_cfg}})
    if out_dir is not None:
        save_sae(sae, out_dir, cfg)
    return sae, cfg


def import_saelens(directory: Path | str, out_dir: Optional[Path | str] = None, input_scale: Optional[float] = None,
                   provenance: Optional[dict] = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read a SAELens SAE directory (cfg.json + sae_weights.safetensors) into our format.

    Handles architecture "standard" (ReLU), "topk", and "jumprelu" with one threshold for all
    latents (cscope's batchtopk at inference); apply_b_dec_to_input=False is folded
    into b_enc; normalize_activations="expected_average_only_in" needs the scale the SAE was
    trained with (`input_scale`, inputs were multiplied by it) and folds it in."""
    directory = Path(directory)
    source = json.loads((directory / "cfg.json").read_text())
    tensors = load_file(str(directory / "sae_weights.safetensors"))
    architecture_name = source.get("architecture", "standard")
    activation = source.get("activation_fn_str", "relu")
    kwargs = source.get("activation_fn_kwargs") or {}
    threshold: Optional[float] = None
    if architecture_name == "topk" or activation == "topk":
        architecture, k = "topk", int(source.get("k") or kwargs.get("k") or 0)
        if k <= 0:
            raise ValueError(f"{directory}: topk SAE without k in cfg.json")
    elif architecture_name == "standard" and activation == "relu":
        architecture, k = "relu", 32
    elif architecture_name == "jumprelu":
        # BatchTopK at inference is JumpReLU with one threshold for every latent: that case maps
        # onto cscope's batchtopk (k only matters for training; kept when cscope wrote the file).
        theta = tensors["threshold"].float().reshape(-1)
        if not torch.allclose(theta, theta[0].expand_as(theta)) or float(theta[0]) < 0:
            raise ValueError(f"{directory}: a JumpReLU SAE with per-latent (or negative) thresholds is not "
                             "supported; cscope's batchtopk has one threshold θ ≥ 0 for all latents")
        cscope_meta = (source.get("metadata") or {}).get("cscope") or {}
        architecture, k, threshold = "batchtopk", int(cscope_meta.get("k") or 32), float(theta[0])
    else:
        raise ValueError(f"{directory}: SAELens architecture {architecture_name!r} / activation {activation!r} "
                         "is not supported (supported: standard ReLU, topk, jumprelu with one threshold)")
    W_enc, b_enc, W_dec, b_dec = (tensors[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if "scaling_factor" in tensors and not torch.allclose(tensors["scaling_factor"].float(), torch.ones(())):
        if architecture != "relu":
            raise ValueError(f"{directory}: a per-latent scaling_factor on a topk SAE cannot be folded")
        factor = tensors["scaling_factor"].float()
        W_enc, b_enc = W_enc * factor, b_enc * factor  # ReLU(x)·s = ReLU(x·s) for s > 0
    if not source.get("apply_b_dec_to_input", True):
        # Encoder saw z, not z − b_dec: z W + b = (z − b_dec) W + (b + b_dec W).
        b_enc = b_enc + b_dec @ W_enc
    sae = _sae_from_weights(W_enc, b_enc, W_dec, b_dec, architecture, k, threshold)
    normalization = source.get("normalize_activations") or "none"
    scale = 1.0
    if normalization == "expected_average_only_in":
        if input_scale is None:
            raise ValueError(f"{directory}: trained with normalize_activations='expected_average_only_in'; "
                             "pass input_scale (the factor inputs were multiplied by) to fold it in")
        from .model import fold_input_scale

        fold_input_scale(sae, input_scale)
        scale = float(input_scale)
    elif normalization != "none":
        raise ValueError(f"{directory}: normalize_activations={normalization!r} is per-token and cannot be folded")
    merged_provenance = {"backbone": source.get("model_name"), "layer": source.get("hook_layer"),
                         "hook_name": source.get("hook_name"), **(provenance or {})}
    cfg = sae_config_dict(sae, input_scale=scale, provenance=merged_provenance,
                          extra={"imported_from": {"format": "saelens", "path": str(directory), "config": source}})
    if out_dir is not None:
        save_sae(sae, out_dir, cfg)
    return sae, cfg


def sae_fingerprint(sae_dir: Path) -> str:
    """Content hash of a final SAE folder (weights and config), the key stages downstream use."""
    digest = hashlib.sha256()
    for name in ("sae.safetensors", "cfg.json"):
        digest.update((sae_dir / name).read_bytes())
    return "sha256:" + digest.hexdigest()
