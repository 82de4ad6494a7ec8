"""SAE splicing and `cscope attribute` on the tiny ViT (3 blocks, width 32, 17 tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conceptscope_cli.artifacts import ConceptDict, ConceptEntry
from conceptscope_cli.attribute.core import attribute_batch
from conceptscope_cli.attribute.render import figure_size
from conceptscope_cli.attribute.run import attribute
from conceptscope_cli.backbone.splice import LatentEdit, SAESplice, splice_reaches_output
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.project import Project
from conceptscope_cli.sae.checkpoint import sae_config_dict, save_sae
from conceptscope_cli.sae.model import SparseAutoencoder
from helpers import TINY_MODEL_CFG

D_SAE = 64


def _tiny_clip(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_MODEL_CFG).eval().to(dtype).requires_grad_(False)


def _sae(d_in: int = 32, dtype: torch.dtype = torch.float32, seed: int = 1) -> SparseAutoencoder:
    """A random ReLU SAE with a positive encoder bias (about half the latents fire) and a
    non-zero decoder bias, so that every term of the completeness identity is exercised."""
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, D_SAE, "relu", generator=generator)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
        sae.b_dec.copy_(0.3 * torch.randn(d_in, generator=generator))
    return sae.to(dtype).eval().requires_grad_(False)


def _images(n: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(dtype)


def _texts(n: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    text = torch.randn(n, TINY_MODEL_CFG["embed_dim"], generator=torch.Generator().manual_seed(3))
    return torch.nn.functional.normalize(text, dim=-1).to(dtype)


def _cos(model: torch.nn.Module, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(model.encode_image(images), dim=-1) @ text.T


# ----------------------------------------------------------------- splicing
@pytest.mark.parametrize("tokens", ["all", "cls", "patches"])
def test_splice_with_error_term_keeps_the_output_and_passes_gradients(tokens: str) -> None:
    model, sae, images = _tiny_clip(), _sae(), _images()
    with torch.no_grad():
        original = model.encode_image(images)
    block = model.visual.transformer.resblocks[1]
    with SAESplice(model.visual, sae, 1, tokens=tokens, retain_grad=True) as splice:
        spliced = model.encode_image(images)
        spliced.pow(2).sum().backward()
    assert not block._forward_hooks  # the context removed its hook
    torch.testing.assert_close(spliced.detach(), original, atol=1e-5, rtol=1e-5)
    expected_tokens = {"all": 17, "cls": 1, "patches": 16}[tokens]
    assert splice.latents.shape == (3, expected_tokens, D_SAE)
    assert splice.latents.grad is not None and splice.latents.grad.abs().sum() > 0
    # the SAE's reconstruction is not exact here: the error term carries the difference
    assert splice.error.abs().max() > 1e-2


def test_splice_without_error_and_zeroed_latents_is_the_decoder_bias() -> None:
    model, sae, images = _tiny_clip(), _sae(), _images()
    everything = LatentEdit(list(range(D_SAE)), "zero")
    for tokens, replaced in (("all", slice(None)), ("patches", slice(1, None))):
        with torch.no_grad(), SAESplice(model.visual, sae, 1, tokens=tokens, keep_error=False, edit=everything):
            spliced = model.encode_image(images)

        def put_bias(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[:, replaced] = sae.b_dec  # noqa: B023 - the hook is removed within the iteration
            return output

        handle = model.visual.transformer.resblocks[1].register_forward_hook(put_bias)
        with torch.no_grad():
            reference = model.encode_image(images)
        handle.remove()
        torch.testing.assert_close(spliced, reference, atol=1e-6, rtol=1e-5)
        with torch.no_grad():
            assert (reference - model.encode_image(images)).abs().max() > 1e-3  # the edit did something


def test_splice_handles_sequence_first_transformers() -> None:
    """Older open_clip checkpoints run the blocks on (T, B, d): same latents, same scores."""
    model, sae, images, text = _tiny_clip(), _sae(), _images(2), _texts(2)
    expected = attribute_batch(model, sae, images, text, layer=1, tokens="patches", top_k=3)
    model.visual.transformer.batch_first = False
    for block in model.visual.transformer.resblocks:
        block.attn.batch_first = False
    with torch.no_grad(), SAESplice(model.visual, sae, 1, tokens="patches") as splice:
        model.encode_image(images)
    assert splice.latents.shape == (2, 16, D_SAE)
    got = attribute_batch(model, sae, images, text, layer=1, tokens="patches", top_k=3)
    torch.testing.assert_close(got.attribution, expected.attribution, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.top_maps, expected.top_maps, atol=1e-6, rtol=1e-5)


def test_latent_edits_zero_scale_set_on_chosen_tokens() -> None:
    f = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 1  # (B=2, Ts=3, m=4)
    positions = torch.tensor([0, 1, 2])
    zeroed = LatentEdit([1], "zero", tokens=[2])(f, positions)
    assert zeroed[:, 2, 1].eq(0).all() and zeroed[:, :2, 1].eq(f[:, :2, 1]).all()
    assert (zeroed[..., [0, 2, 3]] == f[..., [0, 2, 3]]).all()
    scaled = LatentEdit([0, 3], "scale", 2.0)(f, positions)
    assert torch.equal(scaled[..., [0, 3]], 2 * f[..., [0, 3]]) and torch.equal(scaled[..., 1:3], f[..., 1:3])
    set_ = LatentEdit(torch.tensor([[0], [2]]), "set", 7.0)(f, positions)  # one latent per image
    assert set_[0, :, 0].eq(7).all() and set_[1, :, 2].eq(7).all()
    assert torch.equal(set_[0, :, 1:], f[0, :, 1:]) and torch.equal(set_[1, :, [0, 1, 3]], f[1, :, [0, 1, 3]])


def test_caveat_patch_tokens_after_the_last_block_do_not_reach_the_cls_pooled_output() -> None:
    model, sae, images = _tiny_clip(), _sae(), _images(1)
    last = len(model.visual.transformer.resblocks) - 1
    assert not splice_reaches_output(model.visual, last, torch.arange(1, 17), 17)
    assert splice_reaches_output(model.visual, last, torch.arange(17), 17)
    assert splice_reaches_output(model.visual, last - 1, torch.arange(1, 17), 17)
    # and indeed: the attribution of every latent is exactly zero there
    scores = attribute_batch(model, sae, images, _texts(), layer=last, tokens="patches")
    assert scores.attribution.abs().max() == 0


# -------------------------------------------------------------- attribution
@pytest.mark.parametrize("objective", ["cosine", "probability"])
def test_attribution_is_the_first_order_effect_of_scaling_a_latent(objective: str) -> None:
    """R_k = Σ_t f_tk ∂y/∂f_tk is d/dε y(f_k ← (1+ε) f_k) at ε = 0 (the scale edit moves f_k
    along itself). Central differences in float64 agree to ~1e-9."""
    dtype = torch.float64
    model, sae, images, text = _tiny_clip(dtype), _sae(dtype=dtype), _images(2, dtype), _texts(3, dtype)
    scale = 10.0
    scores = attribute_batch(model, sae, images, text, layer=1, objective=objective, logit_scale=scale, top_k=4)
    eps = 1e-5
    checked = 0
    for b in range(2):
        for p in range(3):
            for k in scores.top_latents[b, p, :3].tolist() + scores.bottom_latents[b, p, :2].tolist():
                ys = []
                for sign in (1, -1):
                    edit = LatentEdit([k], "scale", 1 + sign * eps)
                    with torch.no_grad(), SAESplice(model.visual, sae, 1, edit=edit):
                        cos = _cos(model, images, text)
                    ys.append(cos if objective == "cosine" else torch.softmax(scale * cos, dim=-1))
                estimate = float((ys[0][b, p] - ys[1][b, p]) / (2 * eps))
                assert estimate == pytest.approx(float(scores.attribution[b, p, k]), rel=1e-6, abs=1e-10)
                checked += 1
    assert checked == 2 * 3 * 5
    # the top latents really are the ones with the largest effect among the active latents
    assert (scores.attribution.gather(2, scores.top_latents) >= scores.attribution.max(-1, keepdim=True).values - 1e-12)[..., 0].all()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_completeness_latents_plus_error_plus_bias_is_gradient_times_input(dtype: torch.dtype, tolerance: float) -> None:
    model, sae, images, text = _tiny_clip(dtype), _sae(dtype=dtype), _images(3, dtype), _texts(2, dtype)
    for tokens in ("all", "patches", "cls"):
        scores = attribute_batch(model, sae, images, text, layer=0, tokens=tokens, top_k=5)
        total = scores.attribution.sum(-1) + scores.error_term + scores.bias_term
        scale = scores.layer_term.abs().max()
        assert scale > 1e-3 and scores.error_term.abs().max() > 1e-4 and scores.bias_term.abs().max() > 1e-4
        assert (total - scores.layer_term).abs().max() <= tolerance * max(1.0, float(scale))
        # the per-token maps sum to the latent's attribution
        top_sum = scores.top_maps.sum(-1)
        torch.testing.assert_close(top_sum, scores.attribution.gather(2, scores.top_latents))
    # the activation ranking is the mean of f over the spliced tokens
    with torch.no_grad(), SAESplice(model.visual, sae, 0, tokens="cls") as splice:
        model.encode_image(images)
    torch.testing.assert_close(scores.activation, splice.latents.mean(1))


# ------------------------------------------------------------ the full call
def _write_sae(folder: Path, *, d_in: int = 32, layer: int = -2, layer_index: int = 1, tokens: str = "all") -> Path:
    sae = _sae(d_in)
    provenance = {"backbone": "tiny", "layer": layer, "layer_index": layer_index, "token_selection": tokens}
    return save_sae(sae, folder, sae_config_dict(sae, provenance=provenance))


def _use_sae(project_dir: Path, sae_dir: Path, layer: int | None = None) -> Project:
    manifest = project_dir / "cscope.toml"
    text = manifest.read_text()
    if layer is not None:
        text = text.replace("layer = -2", f"layer = {layer}")
    manifest.write_text(text + f'\n[dict]\nsae = "{sae_dir}"\n')
    return Project.open(project_dir)


def test_attribute_writes_scores_and_figures(tiny_project: Path, tmp_path: Path) -> None:
    sae_dir = _write_sae(tmp_path / "sae")
    project = _use_sae(tiny_project, sae_dir)
    images_dir = tiny_project.parent / "images"
    # a concept dictionary built with this SAE: names and reference tiles for two latents
    out = project.outputs_dir / "shapes" / "train"
    (out / "reference").mkdir(parents=True)
    Image.new("RGB", (32 * 3 + 4, 32), (0, 200, 0)).save(out / "reference" / "latent_00003.png")
    ConceptDict({"sae": str(sae_dir), "n_latents": D_SAE},
                {k: ConceptEntry(f"concept {k}", None, None, "none", None, "reference/latent_00003.png")
                 for k in range(D_SAE)}).save(out)

    prompts = ["a red square", "a green square", "a blue square"]
    result = attribute(project, [str(images_dir / "test"), str(images_dir / "train" / "0000[12].png")], prompts,
                       top_k=4, out_dir=tmp_path / "att")
    assert len(result.images) == 9 + 2 and result.layer == 1 and result.token_selection == "all"
    assert result.dictionary == out / "concept_dict.json" and result.notes == []
    for image in result.images:
        assert len(image.prompts) == 3
        assert sum(p.probability for p in image.prompts) == pytest.approx(1.0, abs=1e-5)
        for prompt in image.prompts:
            assert abs(prompt.completeness_gap) < 1e-4
            assert 0 < len(prompt.top) <= 4 and all(s.attribution > 0 for s in prompt.top)
            assert all(s.attribution < 0 for s in prompt.bottom)
            assert [s.attribution for s in prompt.top] == sorted((s.attribution for s in prompt.top), reverse=True)
            assert sum(s.share for s in prompt.top) <= 1 + 1e-6
            assert prompt.top[0].name == f"concept {prompt.top[0].latent}"
        figure = Image.open(image.figure)
        assert figure.size == figure_size([min(len(p.top), 5) for p in image.prompts])
    data = json.loads(result.json_path.read_text())
    assert data["meta"]["n_latents"] == D_SAE and data["meta"]["prompts"] == prompts
    first = data["images"][0]["prompts"][0]
    assert first["top"][0]["latent"] == result.images[0].prompts[0].top[0].latent
    assert first["top"][0]["reference_image"].endswith("latent_00003.png")
    assert sum(first["attribution"].values()) == pytest.approx(result.images[0].prompts[0].total, rel=1e-5)
    assert {Path(i["figure"]).name for i in data["images"]} == {p.name for p in (tmp_path / "att").glob("*.png")}


def test_attribute_without_dictionary_and_probability_objective(tiny_project: Path, tmp_path: Path) -> None:
    project = _use_sae(tiny_project, _write_sae(tmp_path / "sae", tokens="patches"))
    result = attribute(project, [str(tiny_project.parent / "images" / "test" / "*.png")], ["a red square", "a blue square"],
                       top_k=3, objective="probability", out_dir=tmp_path / "att")
    assert result.token_selection == "patches" and result.dictionary is None
    assert result.notes and "cscope dict" in result.notes[0]
    prompt = result.images[0].prompts[0]
    assert prompt.top[0].name is None and prompt.objective == pytest.approx(prompt.probability)
    # a softmax over two prompts: the attributions to the two probabilities are opposite
    other = result.images[0].prompts[1]
    assert prompt.total + prompt.error_term + prompt.bias_term == pytest.approx(
        -(other.total + other.error_term + other.bias_term), abs=1e-5)


def test_attribute_errors(tiny_project: Path, tmp_path: Path) -> None:
    images = tiny_project.parent / "images"
    project = _use_sae(tiny_project, _write_sae(tmp_path / "sae"))
    with pytest.raises(CscopeError, match="image not found: .*missing.png"):
        attribute(project, [str(images / "missing.png")], ["a dog"], out_dir=tmp_path / "att")
    with pytest.raises(CscopeError, match="cannot read image .*00005.png"):  # the corrupt file
        attribute(project, [str(images / "train" / "00005.png")], ["a dog"], out_dir=tmp_path / "att")
    with pytest.raises(CscopeError, match="matched no image"):
        attribute(project, [str(images / "*.jpeg")], ["a dog"], out_dir=tmp_path / "att")
    with pytest.raises(CscopeError, match="at least two prompts"):
        attribute(project, [str(images / "test")], ["a dog"], objective="probability", out_dir=tmp_path / "att")

    one = [str(images / "test" / "00000.png")]
    for name, sae_args, layer, message in [
        ("width", {"d_in": 16}, None, "16-dimensional inputs .* 32-dimensional"),
        ("layer", {"layer": 0, "layer_index": 0}, None, "trained on block 0's output, but .*block 1"),
        ("depth", {"layer": -1, "layer_index": 5}, None, "trained on a different model"),
        ("caveat", {"layer": -1, "layer_index": 2, "tokens": "patches"}, -1, "pooled from the CLS token"),
    ]:
        project_dir = tmp_path / f"proj-{name}"
        project_dir.mkdir()
        (project_dir / "cscope.toml").write_text((tiny_project / "cscope.toml").read_text().split("[dict]")[0]
                                                  .replace('path = "../images"', f'path = "{images}"'))
        project = _use_sae(project_dir, _write_sae(tmp_path / f"sae-{name}", **sae_args), layer)
        with pytest.raises(CscopeError, match=message):
            attribute(project, one, ["a dog"], out_dir=tmp_path / "att")


def test_attribute_with_the_trained_sae_and_its_dictionary(tiny_project: Path) -> None:
    """No [dict] sae: `cscope train`'s SAE is trained on the fly, then `cscope dict` names it."""
    from conceptscope_cli.dictionary.stage import build_dictionary
    from helpers import FAST_STAGES as SAE_AND_DICT

    with open(tiny_project / "cscope.toml", "a") as manifest:
        manifest.write(SAE_AND_DICT)
    project = Project.open(tiny_project)
    images = [str(tiny_project.parent / "images" / "test" / "0000[0-3].png")]
    unnamed = attribute(project, images, ["a red square"], top_k=3)
    assert unnamed.out_dir == project.outputs_dir / "attribute" and unnamed.notes
    assert unnamed.n_latents == 128 and unnamed.layer == 1 and unnamed.sae_path.parent.name == "sae"
    build_dictionary(project, None, "train")
    named = attribute(project, images, ["a red square"], top_k=3)
    assert any(s.name for image in named.images for s in image.prompts[0].top)
    concept = json.loads((project.outputs_dir / "shapes" / "train" / "concept_dict.json").read_text())["latents"]
    assert named.dictionary is not None and named.notes == []
    for image, before in zip(named.images, unnamed.images):
        prompt = image.prompts[0]
        assert [s.latent for s in prompt.top] == [s.latent for s in before.prompts[0].top]  # same SAE, same scores
        assert abs(prompt.completeness_gap) < 1e-5
        for score in prompt.top:
            entry = concept.get(str(score.latent))
            assert score.name == (entry["name"] if entry else None)
            assert (score.reference is not None) == bool(entry and entry["reference_image"])
