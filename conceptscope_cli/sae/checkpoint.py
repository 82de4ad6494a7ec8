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
import math
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from conceptscope_cli.errors import CscopeError

from .model import ARCHITECTURES, SparseAutoencoder

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

    The tensors are the truth: cfg.json must agree with their shapes, and name a known
    architecture with a usable k, or InvalidSAEError says what is wrong (nothing is allocated
    from cfg values). Returns (sae in eval mode taking raw activations, cfg dict)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    cfg = read_cfg_json(directory / SAE_CONFIG)
    tensors = read_safetensors(directory / SAE_WEIGHTS)
    where = str(directory)
    d_in, d_sae = check_sae_tensors(tensors, where)
    check_cfg_dims(cfg, d_in, d_sae, where)
    architecture = cfg.get("architecture")
    if architecture not in ARCHITECTURES:
        raise InvalidSAEError(f"{where}/cfg.json: architecture {architecture!r} is not one of {list(ARCHITECTURES)}")
    k = cfg_k(cfg, "k", d_sae, where) if architecture != "relu" else 32
    if architecture == "batchtopk" and "threshold" not in tensors:
        raise InvalidSAEError(f"{where}: a batchtopk SAE without its threshold tensor")
    sae = SparseAutoencoder(d_in, d_sae, architecture, k)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name].reshape(getattr(sae, name).shape))
        if "threshold" in tensors:
            sae.threshold.copy_(tensors["threshold"].reshape(()))
    return sae.to(device).eval(), cfg


# --------------------------------------------------------------- validation
class InvalidSAEError(CscopeError, ValueError):
    """An SAE file that cannot be read exactly: wrong types, shapes, dtypes, non-finite values."""


# A safetensors header is JSON describing the tensors; anything near this is not a real file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or InvalidSAEError for a missing, truncated or forged one."""
    if not path.is_file():
        raise InvalidSAEError(f"{path} not found", hint="an SAE folder holds sae.safetensors + cfg.json "
                                                        "(a SAELens one: sae_weights.safetensors + cfg.json)")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    header = int.from_bytes(head, "little") if len(head) == 8 else -1
    if header < 0 or header > min(size - 8, _MAX_HEADER_BYTES):
        raise InvalidSAEError(f"{path}: not a safetensors file (header length {header} for a file of {size} bytes: "
                              "truncated or corrupt)")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise InvalidSAEError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None


EVAL_NAME = "eval.json"


def write_eval_json(run_dir: Path, metrics: dict[str, float]) -> None:
    """`eval.json` of a trained SAE: its held-out metrics (mse, fvu, l0, dead/dense fractions)."""
    (Path(run_dir) / EVAL_NAME).write_text(json.dumps(metrics, indent=2) + "\n")


def read_eval_metrics(sae_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The held-out metrics of an SAE folder: `eval.json`, else `cfg.json`'s `eval` (imported SAEs), else {}."""
    path = Path(sae_dir) / EVAL_NAME
    return json.loads(path.read_text()) if path.is_file() else (cfg.get("eval") or {})


def read_cfg_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidSAEError(f"{path.parent} has no {path.name}",
                              hint="an SAE folder holds its weights and a cfg.json (see conceptscope_cli/FORMATS.md)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidSAEError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(cfg, dict):
        raise InvalidSAEError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def check_tensor(value: Any, name: str, where: str) -> torch.Tensor:
    """A real floating-point tensor with only finite values (int8, complex, NaN, Inf refused)."""
    if not isinstance(value, torch.Tensor):
        raise InvalidSAEError(f"{where}: {name} is a {type(value).__name__}, not a tensor")
    if not value.dtype.is_floating_point:
        raise InvalidSAEError(f"{where}: {name} has dtype {value.dtype}; SAE weights must be real floating point")
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise InvalidSAEError(f"{where}: {name} holds {bad} NaN or infinite value(s)")
    return value


def check_sae_tensors(tensors: dict[str, Any], where: str) -> tuple[int, int]:
    """(d_in, d_sae) from W_enc (d, m), b_enc (m,), W_dec (m, d), b_dec (d,) (+ threshold () or (m,))."""
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
    if missing:
        raise InvalidSAEError(f"{where}: the weights lack {missing}")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "scaling_factor"):
        if name in tensors:
            check_tensor(tensors[name], name, where)
    W_enc, b_enc, W_dec, b_dec = (tensors[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if W_enc.dim() != 2 or min(W_enc.shape) < 1:
        raise InvalidSAEError(f"{where}: W_enc must be a non-empty matrix (d_in, d_sae), found {tuple(W_enc.shape)}")
    d_in, d_sae = (int(x) for x in W_enc.shape)
    if (tuple(W_dec.shape) != (d_sae, d_in) or b_enc.numel() != d_sae or b_dec.numel() != d_in
            or b_enc.dim() > 1 or b_dec.dim() > 1):
        raise InvalidSAEError(f"{where}: inconsistent SAE weight shapes: W_enc {tuple(W_enc.shape)}, W_dec "
                              f"{tuple(W_dec.shape)}, b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}")
    for name in ("threshold", "scaling_factor"):
        if name in tensors and tensors[name].numel() not in (1, d_sae):
            raise InvalidSAEError(f"{where}: {name} has {tensors[name].numel()} values for {d_sae} latents")
    return d_in, d_sae


def cfg_int(cfg: dict[str, Any], key: str, where: str, *, low: int, high: int) -> int:
    value = cfg.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSAEError(f"{where}/cfg.json: {key} must be an integer, found {value!r}")
    if not low <= value <= high:
        raise InvalidSAEError(f"{where}/cfg.json: {key} = {value} is outside [{low}, {high}]")
    return value


def cfg_k(cfg: dict[str, Any], key: str, d_sae: int, where: str) -> int:
    """The active-latent count: an integer in [1, d_sae] (0 is not 'unset', a list is not a number)."""
    return cfg_int(cfg, key, where, low=1, high=d_sae)


def cfg_bool(cfg: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):  # "false" is a non-empty string, i.e. true: never guess
        raise InvalidSAEError(f"{where}/cfg.json: {key} must be true or false, found {value!r}")
    return value


def check_cfg_dims(cfg: dict[str, Any], d_in: int, d_sae: int, where: str) -> None:
    """cfg.json's d_in / d_sae, when given, must be the tensors' (which are what gets used)."""
    for key, actual in (("d_in", d_in), ("d_sae", d_sae)):
        if cfg.get(key) is not None and cfg_int(cfg, key, where, low=1, high=1 << 40) != actual:
            raise InvalidSAEError(f"{where}/cfg.json: {key} = {cfg[key]} but the weights have {key} = {actual}")


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
    try:
        referenced = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # noqa: BLE001 - a damaged archive or a pickle opcode the scanner does not know
        raise UnsafeCheckpointError(f"{path}: could not be inspected safely ({type(error).__name__}: {error})") from None
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
    """An SAE from already validated weights (`check_sae_tensors`)."""
    d_in, d_sae = W_enc.shape
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
    if not isinstance(state, dict):
        raise InvalidSAEError(f"{path}: state_dict is a {type(state).__name__}, not a dict of tensors")
    check_sae_tensors(state, str(path))
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
    """Read a SAELens SAE directory (cfg.json + sae_weights.safetensors) into our format, exactly.

    Handles architecture "standard" (ReLU), "topk", and "jumprelu" with one threshold for all
    latents (cscope's batchtopk at inference). Everything is checked against the tensors before
    anything is written (InvalidSAEError otherwise). Flags that change the encoding are folded
    into the weights so cscope's encoder gives the same latents:
    - apply_b_dec_to_input = false: the encoder saw z, so b_dec W_enc moves into b_enc;
    - rescale_acts_by_decoder_norm = true (topk): SAELens multiplies the pre-activations by the
      decoder row norms n before the top-k and divides the latents by n before decoding, so
      W_enc·n, b_enc·n and W_dec/n give the same latents and the same reconstruction;
    - normalize_activations = "expected_average_only_in" needs the scale the SAE was trained
      with (`input_scale`, `cscope train --import PATH --input-scale X`) and folds it in."""
    directory = Path(directory)
    where = str(directory)
    source = read_cfg_json(directory / "cfg.json")
    tensors = read_safetensors(directory / "sae_weights.safetensors")
    d_in, d_sae = check_sae_tensors(tensors, where)
    check_cfg_dims(source, d_in, d_sae, where)
    architecture_name = source.get("architecture", "standard")
    activation = source.get("activation_fn_str", "relu" if architecture_name != "topk" else "topk")
    kwargs = source.get("activation_fn_kwargs") or {}
    if not isinstance(architecture_name, str) or not isinstance(activation, str) or not isinstance(kwargs, dict):
        raise InvalidSAEError(f"{where}/cfg.json: architecture / activation_fn_str must be strings and "
                              f"activation_fn_kwargs an object")
    apply_b_dec = cfg_bool(source, "apply_b_dec_to_input", where, True)
    rescale = cfg_bool(source, "rescale_acts_by_decoder_norm", where, False)
    normalization = source.get("normalize_activations") or "none"
    if not isinstance(normalization, str):
        raise InvalidSAEError(f"{where}/cfg.json: normalize_activations must be a string, found {normalization!r}")
    threshold: Optional[float] = None
    if architecture_name == "topk" or activation == "topk":
        key_source = source if source.get("k") is not None else kwargs
        if key_source.get("k") is None:
            raise InvalidSAEError(f"{where}/cfg.json: a topk SAE without k")
        architecture, k = "topk", cfg_k(key_source, "k", d_sae, where)
    elif architecture_name == "standard" and activation == "relu":
        architecture, k = "relu", 32
    elif architecture_name == "jumprelu":
        # BatchTopK at inference is JumpReLU with one threshold for every latent: that case maps
        # onto cscope's batchtopk (k only matters for training; kept when cscope wrote the file).
        if "threshold" not in tensors:
            raise InvalidSAEError(f"{where}: a jumprelu SAE without its threshold tensor")
        theta = tensors["threshold"].float().reshape(-1)
        if not torch.allclose(theta, theta[0].expand_as(theta)) or float(theta[0]) < 0:
            raise InvalidSAEError(f"{where}: a JumpReLU SAE with per-latent (or negative) thresholds is not "
                                  "supported; cscope's batchtopk has one threshold θ ≥ 0 for all latents")
        metadata = source.get("metadata")
        cscope_meta = metadata.get("cscope") if isinstance(metadata, dict) else None
        if not isinstance(cscope_meta, dict):
            cscope_meta = {}
        k = cfg_k(cscope_meta, "k", d_sae, where) if cscope_meta.get("k") is not None else min(32, d_sae)
        architecture, threshold = "batchtopk", float(theta[0])
    else:
        raise InvalidSAEError(f"{where}: SAELens architecture {architecture_name!r} / activation {activation!r} "
                              "is not supported (supported: standard ReLU, topk, jumprelu with one threshold)")
    if normalization not in ("none", "expected_average_only_in"):
        raise InvalidSAEError(f"{where}: normalize_activations={normalization!r} is per-token and cannot be folded")
    if normalization == "expected_average_only_in" and input_scale is None:
        raise InvalidSAEError(f"{where}: trained with normalize_activations='expected_average_only_in'",
                              hint="pass the factor its inputs were multiplied by: "
                                   "`cscope train --import PATH --input-scale X`")
    if input_scale is not None and normalization != "expected_average_only_in":
        raise InvalidSAEError(f"{where}: an input scale was given, but the SAE was trained on raw inputs "
                              f"(normalize_activations = {normalization!r})")
    if input_scale is not None and not (math.isfinite(input_scale) and input_scale > 0):
        raise InvalidSAEError(f"--input-scale must be a positive finite number, got {input_scale}")
    # Folding in float64, so the folded float32 weights are the exact ones rounded once.
    W_enc, W_dec = tensors["W_enc"].double(), tensors["W_dec"].double()
    b_enc, b_dec = tensors["b_enc"].double().reshape(-1), tensors["b_dec"].double().reshape(-1)
    if "scaling_factor" in tensors and not torch.allclose(tensors["scaling_factor"].float(), torch.ones(())):
        if architecture != "relu":
            raise InvalidSAEError(f"{where}: a per-latent scaling_factor on a {architecture} SAE cannot be folded")
        factor = tensors["scaling_factor"].double().reshape(-1)
        if bool((factor <= 0).any()):
            raise InvalidSAEError(f"{where}: scaling_factor must be positive to fold into a ReLU encoder")
        W_enc, b_enc = W_enc * factor, b_enc * factor  # ReLU(x)·s = ReLU(x·s) for s > 0
    if not apply_b_dec:
        # Encoder saw z, not z − b_dec: z W + b = (z − b_dec) W + (b + b_dec W).
        b_enc = b_enc + b_dec @ W_enc
    if rescale:
        if architecture not in ("topk", "relu"):
            raise InvalidSAEError(f"{where}: rescale_acts_by_decoder_norm on a {architecture_name} SAE is not supported")
        norms = W_dec.norm(dim=-1)  # (m,)
        if bool((norms <= 0).any()):
            raise InvalidSAEError(f"{where}: rescale_acts_by_decoder_norm with an all-zero decoder row cannot be folded")
        # top-k and ReLU commute with a positive per-latent scale applied before them.
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec)):
        check_tensor(value.float(), f"{name} after folding", where)
    sae = _sae_from_weights(W_enc, b_enc, W_dec, b_dec, architecture, k, threshold)
    scale = 1.0
    if normalization == "expected_average_only_in":
        from .model import fold_input_scale

        assert input_scale is not None
        fold_input_scale(sae, input_scale)
        scale = float(input_scale)
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
