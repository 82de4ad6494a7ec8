"""Write an open_clip model as a `local-dir:` folder (the layout open_clip's Hub loader reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def save_local_dir(model: torch.nn.Module, model_cfg: dict[str, Any], folder: Path, preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Save `model` so that `open_clip.create_model_and_transforms("local-dir:" + folder)` loads it.

    Writes `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and
    `open_clip_model.safetensors` (contiguous, shared tensors cloned: safetensors refuses aliasing).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder
