"""Issue 20: an SAE import is exact or refused with a clear error, before anything is written.

The tensors are the truth: cfg.json must agree with them, weights must be finite real floats,
and files that are not what they claim (truncated, forged headers, odd pickles) are refused."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

from conceptscope_cli.errors import CscopeError
from conceptscope_cli.sae.checkpoint import load_sae, sae_config_dict, save_sae
from conceptscope_cli.sae.importing import import_sae
from conceptscope_cli.sae.model import SparseAutoencoder
from helpers import run_cli

torch.set_num_threads(1)
D, M, K = 8, 32, 4


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, M, generator=g), "b_enc": torch.randn(M, generator=g) * 0.1,
            "W_dec": torch.randn(M, D, generator=g), "b_dec": torch.randn(D, generator=g)}


def _saelens(folder: Path, cfg: Any = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors or _weights(), str(folder / "sae_weights.safetensors"))
    base = {"architecture": "topk", "d_in": D, "d_sae": M, "k": K, "apply_b_dec_to_input": True,
            "normalize_activations": "none"}
    (folder / "cfg.json").write_text(json.dumps(base if cfg is None else cfg(base) if callable(cfg) else cfg))
    return folder


def _with(**changes: Any) -> Callable[[dict], dict]:
    return lambda base: {**base, **changes}


def _refused(source: Path, out: Path, match: str) -> CscopeError:
    with pytest.raises(CscopeError, match=match) as caught:
        import_sae(source, out)
    assert caught.value.exit_code == 1
    assert not out.exists()  # nothing written
    return caught.value


@pytest.mark.parametrize(("cfg", "match"), [
    (_with(d_sae=99), "d_sae = 99 but the weights have d_sae = 32"),
    (_with(d_in=4096), "d_in = 4096 but the weights have d_in = 8"),
    (_with(k=0), r"k = 0 is outside \[1, 32\]"),
    (_with(k=10**9), r"k = 1000000000 is outside \[1, 32\]"),
    (_with(k=[4]), r"k must be an integer, found \[4\]"),
    (_with(k=True), "k must be an integer, found True"),
    (_with(architecture="evil", activation_fn_str="evil"), "architecture 'evil' / activation 'evil' is not supported"),
    (_with(apply_b_dec_to_input="false"), "apply_b_dec_to_input must be true or false, found 'false'"),
    (_with(rescale_acts_by_decoder_norm="yes"), "rescale_acts_by_decoder_norm must be true or false"),
    (_with(normalize_activations=["x"]), "normalize_activations must be a string"),
    ([1, 2, 3], "expected a JSON object, found list"),
])
def test_saelens_cfg_is_checked_against_the_tensors(tmp_path: Path, cfg: Any, match: str) -> None:
    _refused(_saelens(tmp_path / "lens", cfg), tmp_path / "out", match)


@pytest.mark.parametrize(("change", "match"), [
    (lambda t: t["W_enc"].__setitem__((0, 0), float("nan")), "W_enc holds 1 NaN or infinite"),
    (lambda t: t["b_dec"].__setitem__(1, float("inf")), "b_dec holds 1 NaN or infinite"),
    (lambda t: t.update(W_dec=(t["W_dec"] * 10).to(torch.int8)), "W_dec has dtype torch.int8"),
    (lambda t: t.update(W_dec=t["W_dec"][:, :3].contiguous()), "inconsistent SAE weight shapes"),
    (lambda t: t.pop("b_enc"), r"the weights lack \['b_enc'\]"),
])
def test_saelens_weights_must_be_finite_real_floats(tmp_path: Path, change: Callable, match: str) -> None:
    tensors = _weights()
    change(tensors)
    _refused(_saelens(tmp_path / "lens", tensors=tensors), tmp_path / "out", match)


def test_truncated_and_forged_safetensors_are_refused(tmp_path: Path) -> None:
    folder = _saelens(tmp_path / "lens")
    weights = folder / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _refused(folder, tmp_path / "out", "not a readable safetensors file")
    weights.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    _refused(folder, tmp_path / "out", r"header length 4611686018427387904 for a file of \d+ bytes")
    weights.write_bytes(b"abc")
    _refused(folder, tmp_path / "out", "header length -1")


def test_expected_average_hint_names_a_real_option(tmp_path: Path) -> None:
    folder = _saelens(tmp_path / "lens", _with(normalize_activations="expected_average_only_in"))
    error = _refused(folder, tmp_path / "out", "expected_average_only_in")
    assert error.hint is not None and "--input-scale" in error.hint
    help_text = run_cli(["train", "--help"], tmp_path).stdout
    assert "--input-scale" in help_text
    import_sae(folder, tmp_path / "out", input_scale=2.0)
    assert load_sae(tmp_path / "out")[1]["input_scale_folded"] == 2.0
    with pytest.raises(CscopeError, match="an input scale was given"):
        import_sae(_saelens(tmp_path / "raw"), tmp_path / "out2", input_scale=2.0)


def _pt(path: Path, state: Any) -> Path:
    torch.save({"cfg": {"model_name": "vit"}, "state_dict": state}, path)
    return path


def test_conceptscope_pt_values_are_checked(tmp_path: Path) -> None:
    good = _weights()
    _refused(_pt(tmp_path / "a.pt", {**good, "W_enc": "not a tensor"}), tmp_path / "o", "W_enc is a str, not a tensor")
    _refused(_pt(tmp_path / "b.pt", {**good, "b_enc": torch.full((M,), float("nan"))}), tmp_path / "o",
             "b_enc holds 32 NaN")
    _refused(_pt(tmp_path / "c.pt", {**good, "W_dec": good["W_dec"].to(torch.complex64)}), tmp_path / "o",
             "W_dec has dtype torch.complex64")
    _refused(_pt(tmp_path / "d.pt", [1, 2]), tmp_path / "o", "state_dict is a list")


def test_pickle_with_an_unsupported_opcode_is_refused(tmp_path: Path) -> None:
    source = _pt(tmp_path / "ok.pt", _weights())
    odd = tmp_path / "odd.pt"
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(odd, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = b"\x80\x02\x82\x01."  # EXT1: an extension-registry lookup no safe loader performs
            zout.writestr(item, data)
    _refused(odd, tmp_path / "o", "refused to load")


def _cscope_sae(folder: Path, **cfg_changes: Any) -> Path:
    sae = SparseAutoencoder(D, M, "topk", K, generator=torch.Generator().manual_seed(0))
    save_sae(sae, folder, {**sae_config_dict(sae), **cfg_changes})
    return folder


@pytest.mark.parametrize(("changes", "match"), [
    ({"k": 0}, r"k = 0 is outside \[1, 32\]"),
    ({"k": 10**9}, "is outside"),
    ({"d_sae": 2**40}, "d_sae = 1099511627776 but the weights have d_sae = 32"),
    ({"architecture": "evil"}, "architecture 'evil' is not one of"),
])
def test_load_sae_trusts_the_tensors(tmp_path: Path, changes: dict, match: str) -> None:
    """`[dict] sae` folders are read by `load_sae`: k = 0 used to become 32, a huge d_sae was allocated."""
    with pytest.raises(CscopeError, match=match):
        load_sae(_cscope_sae(tmp_path / "sae", **changes))


def test_dict_sae_folder_without_cfg_is_a_clear_error(tiny_project: Path, tmp_path: Path) -> None:
    folder = _cscope_sae(tmp_path / "sae")
    (folder / "cfg.json").unlink()
    with open(tiny_project / "cscope.toml", "a") as manifest:
        manifest.write(f'\n[dict]\nsae = "{folder}"\n')
    result = run_cli(["dict"], tiny_project)
    assert result.exit_code == 3, result.output  # a missing upstream artifact: the hint names `cscope train --import`
    assert f"[dict] sae: no cfg.json in {folder}" in result.stderr
