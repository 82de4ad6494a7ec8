"""The backbone loader and the residual-stream capture, on a tiny ViT saved to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conceptscope_cli.backbone.capture import ResidualCapture
from conceptscope_cli.backbone.loader import load_backbone
from conceptscope_cli.backbone.resolve import ALIASES, resolve_model
from conceptscope_cli.errors import CscopeError


def _load(tiny_model_dir: Path, tmp_path: Path):
    resolved = resolve_model(f"local-dir:{tiny_model_dir}", None, project_root=tmp_path, cache_root=tmp_path / "cache")
    return load_backbone(resolved, torch.device("cpu"))


def test_local_dir_loads_saved_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import load_file

    backbone = _load(tiny_model_dir, tmp_path)
    saved = load_file(str(tiny_model_dir / "open_clip_model.safetensors"))
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert backbone.n_layers == 3 and backbone.d_model == 32 and backbone.grid_size == (4, 4)
    assert backbone.resolved.fingerprint.startswith("sha256:")
    assert isinstance(backbone.tokenizer, open_clip.tokenizer.SimpleTokenizer)


def test_capture_equals_manual_forward_up_to_block(tiny_model_dir: Path, tmp_path: Path) -> None:
    backbone = _load(tiny_model_dir, tmp_path)
    visual = backbone.visual
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layer = backbone.resolve_layer(-2)
    assert layer == 1
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, 16, d)
        cls = visual.class_embedding.expand(x.shape[0], 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
        for block in visual.transformer.resblocks[: layer + 1]:
            x = block(x)
    captured = ResidualCapture(visual, layer)(images)
    assert captured.shape == (5, 17, 32)
    torch.testing.assert_close(captured, x)


def test_capture_stops_after_block(tiny_model_dir: Path, tmp_path: Path) -> None:
    backbone = _load(tiny_model_dir, tmp_path)
    calls: list[str] = []
    visual = backbone.visual
    hooks = [
        visual.transformer.resblocks[2].register_forward_hook(lambda *a: calls.append("block2")),
        visual.ln_post.register_forward_hook(lambda *a: calls.append("ln_post")),
    ]
    ResidualCapture(visual, 1)(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert calls == []
    # The model still works normally afterwards (the capture hook is removed).
    assert backbone.model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 16)


def test_sequence_first_layout_is_normalised(tiny_model_dir: Path, tmp_path: Path) -> None:
    backbone = _load(tiny_model_dir, tmp_path)
    visual = backbone.visual
    images = torch.randn(2, 3, 32, 32)
    expected = ResidualCapture(visual, 1)(images)
    # Simulate an old open_clip checkpoint that runs its transformer sequence-first.
    visual.transformer.batch_first = False
    for block in visual.transformer.resblocks:
        block.attn.batch_first = False
    captured = ResidualCapture(visual, 1)(images)
    torch.testing.assert_close(captured, expected)


def test_alias_resolution_and_errors(tmp_path: Path) -> None:
    resolved = resolve_model("openai/clip-vit-large-patch14", None, project_root=tmp_path, cache_root=tmp_path)
    assert (resolved.model_name, resolved.pretrained) == ALIASES["openai/clip-vit-large-patch14"] == ("ViT-L-14", "openai")
    with pytest.raises(CscopeError, match="not an open_clip model folder"):
        resolve_model(str(tmp_path / "nowhere"), None, project_root=tmp_path, cache_root=tmp_path)


def test_layer_out_of_range(tiny_model_dir: Path, tmp_path: Path) -> None:
    backbone = _load(tiny_model_dir, tmp_path)
    assert backbone.resolve_layer(-1) == 2 and backbone.resolve_layer(0) == 0
    with pytest.raises(CscopeError, match="layer 7 does not exist: the model has 3 blocks"):
        backbone.resolve_layer(7)
