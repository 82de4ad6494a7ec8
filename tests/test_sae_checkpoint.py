"""Saving/loading SAEs, training-checkpoint round trip, ConceptScope .pt and SAELens imports."""

import json
import os
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptscope_cli.sae.checkpoint import (
    UnsafeCheckpointError,
    import_conceptscope_pt,
    import_saelens,
    list_training_checkpoints,
    load_sae,
    load_training_checkpoint,
    sae_config_dict,
    save_sae,
    save_training_checkpoint,
)
from conceptscope_cli.sae.model import SparseAutoencoder

torch.set_num_threads(1)


@dataclass
class ViTSAERunnerConfig:  # stands for sae_training.config.ViTSAERunnerConfig
    d_in: int = 8
    expansion_factor: int = 4
    l1_coefficient: float = 8e-5
    model_name: str = "openai/clip-vit-base-patch16"
    block_layer: int = -2
    class_token: bool = True


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _random_sae(architecture="relu", d=8, m=32, k=4):
    sae = SparseAutoencoder(d, m, architecture, k, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.threshold.fill_(0.3)
    return sae.eval()


def test_save_load_round_trip(tmp_path):
    for architecture in ("relu", "topk", "batchtopk"):
        sae = _random_sae(architecture)
        cfg = sae_config_dict(sae, input_scale=0.5, provenance={"backbone": "ViT-B-16", "layer": 10,
                                                                "token_selection": "all"})
        save_sae(sae, tmp_path / architecture, cfg)
        tensors = load_file(str(tmp_path / architecture / "sae.safetensors"))
        assert set(tensors) >= {"W_enc", "b_enc", "W_dec", "b_dec"}
        assert tensors["W_enc"].shape == (8, 32) and tensors["W_dec"].shape == (32, 8)
        loaded, loaded_cfg = load_sae(tmp_path / architecture)
        z = torch.randn(5, 8)
        assert torch.allclose(loaded.encode(z), sae.encode(z))
        assert loaded_cfg["d_in"] == 8 and loaded_cfg["d_sae"] == 32 and loaded_cfg["architecture"] == architecture
        assert loaded_cfg["model_name"] == "ViT-B-16" and loaded_cfg["hook_layer"] == 10
        assert (loaded_cfg["threshold"] is not None) == (architecture == "batchtopk")


def test_training_checkpoint_round_trip(tmp_path):
    sae = _random_sae()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae(torch.randn(4, 8)).recon.sum().backward()
    optimizer.step()
    for step in (10, 20, 30):
        save_training_checkpoint(tmp_path, step, sae, optimizer, {"data": {"tokens_consumed": step}},
                                 {"tracker.x": torch.arange(3)}, keep=2)
    found = list_training_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-00000020", "step-00000030"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    loaded = load_training_checkpoint(found[-1])
    assert loaded["state"]["step"] == 30 and loaded["state"]["data"]["tokens_consumed"] == 30
    fresh = torch.optim.Adam(sae.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    for a, b in zip(optimizer.state.values(), fresh.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert torch.equal(loaded["extra"]["tracker.x"], torch.arange(3))
    for name, value in sae.state_dict().items():
        assert torch.equal(loaded["model"][name], value)


def test_import_conceptscope_pt(tmp_path):
    sae = _random_sae()
    state_dict = {name: getattr(sae, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    path = tmp_path / "patchsae.pt"
    torch.save({"cfg": ViTSAERunnerConfig(), "state_dict": state_dict}, path)
    imported, cfg = import_conceptscope_pt(path, out_dir=tmp_path / "ours")
    z = torch.randn(6, 8)
    assert torch.allclose(imported.encode(z), sae.encode(z))
    source = cfg["imported_from"]["config"]
    assert source["l1_coefficient"] == 8e-5 and source["model_name"] == "openai/clip-vit-base-patch16"
    assert cfg["provenance"]["layer"] == -2
    reloaded, _ = load_sae(tmp_path / "ours")
    assert torch.allclose(reloaded.decode(reloaded.encode(z)), sae.decode(sae.encode(z)), atol=1e-6)


def test_import_refuses_unexpected_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"cfg": Exploit(), "state_dict": {}}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os|nt)\.system"):
        import_conceptscope_pt(path)


def test_import_saelens(tmp_path):
    sae = _random_sae("topk")
    directory = tmp_path / "saelens"
    directory.mkdir()
    W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
    b_dec = sae.b_dec.detach()
    # SAELens checkpoint that does NOT subtract b_dec before encoding: its b_enc absorbs −b_dec·W_enc
    save_file({"W_enc": W_enc.contiguous(), "b_enc": (b_enc - b_dec @ W_enc).clone(), "W_dec": sae.W_dec.detach().clone(),
               "b_dec": b_dec.clone()}, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": 8, "d_sae": 32, "hook_name": "blocks.9.hook_resid_post", "hook_layer": 9,
        "model_name": "vit", "apply_b_dec_to_input": False, "normalize_activations": "none",
        "activation_fn_kwargs": {"k": 4}}))
    imported, cfg = import_saelens(directory, out_dir=tmp_path / "ours")
    z = torch.randn(6, 8)
    assert imported.architecture == "topk" and imported.k == 4
    assert torch.allclose(imported.encode(z), sae.encode(z), atol=1e-5)
    assert cfg["provenance"]["hook_name"] == "blocks.9.hook_resid_post"
    cfg_json = json.loads((directory / "cfg.json").read_text())
    cfg_json["normalize_activations"] = "expected_average_only_in"
    (directory / "cfg.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match="expected_average_only_in"):
        import_saelens(directory)
    scaled, _ = import_saelens(directory, input_scale=2.0)
    assert torch.allclose(scaled.encode(z), sae.encode(2.0 * z), atol=1e-5)


def test_eval_json_is_read_back_and_falls_back_to_the_cfg(tmp_path):
    from conceptscope_cli.sae.checkpoint import read_eval_metrics, write_eval_json

    write_eval_json(tmp_path, {"fvu": 0.25, "l0": 4.0})
    assert read_eval_metrics(tmp_path, {"eval": {"fvu": 9.0}}) == {"fvu": 0.25, "l0": 4.0}
    assert read_eval_metrics(tmp_path / "imported", {"eval": {"fvu": 9.0}}) == {"fvu": 9.0}  # no eval.json
    assert read_eval_metrics(tmp_path / "imported", {}) == {}
