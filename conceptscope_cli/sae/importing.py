"""`cscope train --import PATH`: convert an existing SAE into cscope's format."""

from __future__ import annotations

from pathlib import Path

from conceptscope_cli.errors import CscopeError


def import_sae(source: Path, out_dir: Path, *, input_scale: float | None = None) -> Path:
    """ConceptScope/PatchSAE `.pt` file or SAELens folder → `out_dir/{sae.safetensors,cfg.json}`."""
    from conceptscope_cli.sae.checkpoint import UnsafeCheckpointError, import_conceptscope_pt, import_saelens

    if not source.exists():
        raise CscopeError(f"nothing to import at {source}")
    try:
        if source.is_dir():
            if not (source / "cfg.json").is_file():
                raise CscopeError(f"{source} has no cfg.json", hint="a SAELens folder holds cfg.json + sae_weights.safetensors")
            import_saelens(source, out_dir, input_scale=input_scale)
        else:
            if input_scale is not None:
                raise CscopeError("--input-scale applies to SAELens folders only")
            import_conceptscope_pt(source, out_dir)
    except CscopeError:  # InvalidSAEError already says what and where
        raise
    except UnsafeCheckpointError as exc:
        raise CscopeError(f"refused to load {source}: {exc}", hint="only checkpoints holding tensors and plain config data are accepted") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CscopeError(f"could not import {source}: {exc}") from None
    return out_dir
