"""Issue 20: imports of folders written by real SAELens give SAELens' own latents.

The folders under tests/fixtures/saelens/ were written by SAELens 6.54.12 (regenerate them
with tests/fixtures/saelens/make_fixtures.py); `expected.safetensors` holds the latents and
reconstructions SAELens computes for its sample rows after loading each folder back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptscope_cli.sae.checkpoint import import_saelens, load_sae

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
CASES = {  # folder: cscope architecture it must become
    "standard": "relu",
    "topk": "topk",
    "topk_rescaled": "topk",
    "topk_training_save_model": "topk",
    "jumprelu": "batchtopk",
    "batchtopk": "batchtopk",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_saelens_folder_imports_to_the_same_latents(name: str, tmp_path: Path) -> None:
    folder = FIXTURES / name
    expected = load_file(str(folder / "expected.safetensors"))
    imported, _ = import_saelens(folder, out_dir=tmp_path / "ours")
    reloaded, _ = load_sae(tmp_path / "ours")  # and what later stages read back
    assert imported.architecture == reloaded.architecture == CASES[name]
    for sae in (imported, reloaded):
        with torch.no_grad():
            acts = sae.encode(expected["x"])
            recon = sae.decode(acts)
        assert torch.equal(acts > 0, expected["acts"] > 0), f"{name}: different active latents"
        torch.testing.assert_close(acts, expected["acts"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(recon, expected["recon"], rtol=1e-5, atol=1e-5)
    assert int((expected["acts"] > 0).sum()) > len(expected["x"])  # the fixture has real work to do


@pytest.mark.parametrize("name", ["topk_rescaled", "topk_training_save_model"])
def test_decoder_norm_rescaling_matters_in_these_fixtures(name: str) -> None:
    """Ignoring rescale_acts_by_decoder_norm (what the old importer did) picks other latents."""
    folder = FIXTURES / name
    assert json.loads((folder / "cfg.json").read_text())["rescale_acts_by_decoder_norm"] is True
    weights = load_file(str(folder / "sae_weights.safetensors"))
    norms = weights["W_dec"].norm(dim=-1)
    assert float(norms.max() / norms.min()) > 2  # decoder rows far from unit norm
    expected = load_file(str(folder / "expected.safetensors"))
    pre = (expected["x"] - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    naive = torch.zeros_like(pre).scatter(-1, pre.topk(6, dim=-1).indices, 1.0) > 0
    assert int((naive != (expected["acts"] > 0)).sum()) > 10
