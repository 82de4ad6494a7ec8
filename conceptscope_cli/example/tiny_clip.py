"""A tiny open_clip CLIP trained on the example world, shipped as package data.

The model is a plain ``open_clip.model.CLIP`` (tiny ViT + tiny text transformer) with
the standard bundled BPE tokenizer (``SimpleTokenizer``), so every consumer loads it
through the ordinary open_clip path::

    path = ensure_tiny_clip()                      # unpacks the shipped archive once
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")

Shipping format: ``assets/tiny_clip/tiny_clip.tar.xz`` holds an open_clip local-dir
folder (``open_clip_config.json`` + ``open_clip_model.safetensors``). The text token
embedding (49408 x width) dominates the parameter count, so rows of tokens that never
occur in the world's captions and prompts are kept at zero during training (they get
no gradient and are excluded from weight decay); xz turns those zero rows into almost
nothing. The archive is unpacked into a cache folder named after its SHA-256, so a
newly shipped model never reuses a stale cache. The archive (not a bare folder) is
what ships because a local-dir folder whose weights were still compressed would make
open_clip silently build a randomly initialised model.

Training (:func:`train_tiny_clip`) is contrastive on captions generated from the
ground-truth attributes, with a *multi-positive* loss: a caption such as ``"a photo of
grass."`` counts as a positive for every image in the batch that it truthfully
describes, not only for the image it was sampled from. See
``conceptscope_cli/example/train_tiny_clip.py`` for the recipe of the shipped weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from conceptscope_cli.backbone.resolve import EXAMPLE_PREFIX, ResolvedModel, local_dir_fingerprint
from conceptscope_cli.backbone.types import ClipModel
from conceptscope_cli.errors import CscopeError
from conceptscope_cli.example import world as W

ASSET_DIR: Path = Path(__file__).resolve().parent / "assets" / "tiny_clip"
ARCHIVE_NAME = "tiny_clip.tar.xz"
METRICS_NAME = "metrics.json"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
ZERO_SHOT_TEMPLATE = "a photo of a {}."

# Pixel normalisation used by both training and the shipped preprocess config.
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.25, 0.25, 0.25)


def tiny_clip_model_cfg(
    image_size: int = 64,
    patch_size: int = 8,
    vision_width: int = 128,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 2,
    embed_dim: int = 64,
    context_length: int = 32,
    pool_type: str = "avg",
) -> dict[str, Any]:
    """open_clip ``model_cfg`` of the tiny CLIP (``CLIP(**cfg)``-compatible).

    ``pool_type="avg"``: the image embedding is the mean of the patch tokens (CLS kept in the
    sequence). With only four blocks, CLS pooling let the patch tokens stay local (colour, edge,
    texture) and put the shape into CLS alone, so an SAE over all tokens found no latent that
    detects a class; pooling the patches makes them carry the object, as deep CLIPs' patch
    tokens do by the second-to-last block.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": vision_layers,
            "width": vision_width,
            "head_width": 32,
            "patch_size": patch_size,
            "mlp_ratio": 4.0,
            "pool_type": pool_type,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": max(1, text_width // 32),
            "layers": text_layers,
        },
    }


def preprocess_cfg(image_size: int = 64) -> dict[str, Any]:
    """open_clip ``preprocess_cfg``. At the native size the resize is a no-op."""
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": list(MEAN),
        "std": list(STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


# ----------------------------------------------------------------------------- prompts


def attribute_prompt(attribute: str, value: str) -> str:
    """Prompt naming one attribute value, e.g. ``"a photo of grass."``.

    Used both as a training caption type and for the per-word AUROC evaluation.
    """
    if attribute == "class_name":
        return ZERO_SHOT_TEMPLATE.format(value)
    if attribute == "background":
        return f"a photo of {value}."
    if attribute in ("object_color", "object_texture"):
        return f"a photo of something {value}."
    if attribute == "co_object":
        return f"a photo of a small {value}."
    raise ValueError(f"unknown attribute {attribute!r}")


_KEYS: tuple[str, ...] = ("class_name",) + W.ATTRIBUTES


def _compose(c: dict[str, str]) -> str:
    """Caption text for a partial attribute assignment ``c`` (keys from ``_KEYS``)."""
    if len(c) == 1:
        (k, v), = c.items()
        return attribute_prompt(k, v)
    words = [c[k] for k in ("object_color", "object_texture") if k in c]
    noun = c.get("class_name", "shape")
    text = "a photo of a " + " ".join(words + [noun])
    if "background" in c:
        text += f" on {c['background']}"
    if c.get("co_object", "none") != "none":
        text += f" with a small {c['co_object']}"
    return text + "."


def sample_caption(row: dict[str, str], rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """A random caption that is true of ``row`` and the constraints it states.

    Mix: 20% class-only prompt, 30% the full scene caption, 50% a random subset of
    the attributes (each kept with p=0.5). Class-only captions make the class noun
    carry the shape on its own, which is what the tiny ViT finds hardest. ``row`` may lack
    keys (attributes a mask hid, see :func:`mask_augment`): captions then only state
    what is visible, and the full scene caption is not used.
    """
    present = [k for k in _KEYS if k in row]
    u = rng.random()
    if u < 0.2 and "class_name" in row:
        c = {"class_name": row["class_name"]}
    elif u < 0.5 and len(present) == len(_KEYS):
        c = {k: row[k] for k in _KEYS}
        # The full caption omits "with ..." for no co-object, which states its absence.
        return W.caption_for(**{k: row[k] for k in _KEYS}), c
    else:
        keys = [k for k in present if not (k == "co_object" and row[k] == "none")]
        if not keys:
            raise ValueError("nothing visible to caption")
        c = {k: row[k] for k in keys if rng.random() < 0.5}
        if not c:
            k = keys[int(rng.integers(len(keys)))]
            c = {k: row[k]}
    return _compose(c), c


def fixed_prompts(info: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """Every class prompt and every attribute prompt of a world, with constraints."""
    out = [(ZERO_SHOT_TEMPLATE.format(c), {"class_name": c}) for c in info["class_names"]]
    for attr in W.ATTRIBUTES:
        for v in info["vocabulary"][attr]:
            if v != "none":
                out.append((attribute_prompt(attr, v), {attr: v}))
    return out


def world_token_ids(info: dict[str, Any], tokenizer: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """Sorted ids of every token any world caption or prompt can produce."""
    vocab = info["vocabulary"]
    words = set(vocab["class_name"]) | {w for a in W.ATTRIBUTES for w in vocab[a]} | {"shape"}
    texts = [_compose({"class_name": "shape", "background": "grass", "co_object": "star"})]
    texts += [W.caption_for("circle", "grass", "red", "solid", "star"), ZERO_SHOT_TEMPLATE.format("x")]
    texts += [attribute_prompt(a, "x") for a in _KEYS]
    texts += sorted(words)
    ids = torch.unique(tokenizer(texts))
    return ids


# ----------------------------------------------------------------------------- data


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> normalised float32 (n, 3, H, W), same as the preprocess."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _codes(rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> np.ndarray:
    """Attribute codes (n, len(_KEYS)) int64, index into each attribute's vocabulary."""
    vocab = info["vocabulary"]
    return np.array([[vocab[k].index(r[k]) for k in _KEYS] for r in rows], dtype=np.int64)


def _constraint_codes(constraints: Sequence[dict[str, str]], info: dict[str, Any]) -> np.ndarray:
    """Constraint codes (t, len(_KEYS)) int64, -1 where a caption says nothing."""
    vocab = info["vocabulary"]
    out = np.full((len(constraints), len(_KEYS)), -1, dtype=np.int64)
    for j, c in enumerate(constraints):
        for k, v in c.items():
            out[j, _KEYS.index(k)] = vocab[k].index(v)
    return out


def multi_positive_clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric contrastive loss with several positives per row and column.

    image_emb (B, D) and text_emb (T, D) are L2-normalised; positives (B, T) bool says
    which captions are true of which images. Each side maximises the total softmax
    probability of its positives, ``-log sum_{p in P} softmax(logits)_p``; texts with
    no true image in the batch are skipped on the text side.
    """
    logits = logit_scale * image_emb @ text_emb.t()
    neg_inf = torch.finfo(logits.dtype).min
    pos_i = torch.logsumexp(logits.masked_fill(~positives, neg_inf), dim=1)
    loss_i = (torch.logsumexp(logits, dim=1) - pos_i).mean()
    has = positives.any(dim=0)
    pos_t = torch.logsumexp(logits.masked_fill(~positives, neg_inf), dim=0)
    loss_t = (torch.logsumexp(logits, dim=0) - pos_t)[has].mean()
    return 0.5 * (loss_i + loss_t)


def _random_shift(x: torch.Tensor, max_shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Shift each image (B, C, H, W) by up to ``max_shift`` pixels, replicating edges."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offs = rng.integers(0, 2 * max_shift + 1, size=(b, 2))
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs.tolist())])


# Image attribute code of an attribute a mask hid: no caption that states a value of it is true.
ABSENT = -2
# A masked image shows a part (object, co-object, background) when at least this fraction of
# the part's pixel weight survives the mask.
VISIBLE_FRACTION = 0.35
# Mask sources of :func:`mask_augment` and their probabilities.
_MASK_SOURCES: tuple[str, ...] = ("object", "co_object", "background", "random")
_MASK_SOURCE_P: tuple[float, ...] = (0.35, 0.15, 0.2, 0.3)


def mask_augment(
    pixels: torch.Tensor,
    object_mask: torch.Tensor,
    co_object_mask: torch.Tensor,
    codes: torch.Tensor,
    none_code: int,
    rng: np.random.Generator,
    *,
    patch_size: int,
    prob: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Show CLIP the masked images ConceptScope's alignment scores will show it.

    ``cscope categorize`` scores a latent by the class similarity of ``x ⊙ m^0.5`` (only the
    latent's region) and ``x ⊙ (1 − m^0.001)`` (that region blacked out), ``m`` being an
    upsampled patch map (:mod:`conceptscope_cli.masks`). A CLIP that never saw black
    regions answers arbitrarily on such images (the first tiny CLIP gave a black image a higher
    "cross" similarity than real crosses). Here a fraction ``prob`` of a batch is masked the
    same way, by the same code, with patch maps of a ground-truth part (object, co-object,
    background) or random patches, and each image's attribute codes follow what stays visible:
    a part is visible when at least :data:`VISIBLE_FRACTION` of its pixel weight survives;
    a hidden object makes class, colour and texture ``ABSENT``, a hidden background ``ABSENT``,
    a hidden co-object ``none``. An image with nothing left visible keeps its original pixels.

    Args:
        pixels: (B, 3, H, W) float in [0, 1].
        object_mask, co_object_mask: (B, H, W) float coverage in [0, 1].
        codes: (B, len(_KEYS)) int64 attribute codes of the unmasked images.
        none_code: the code of ``"none"`` in the co-object vocabulary.

    Returns:
        ``(pixels, codes)`` of the batch after masking (new tensors).
    """
    from conceptscope_cli.masks import GAMMA_NECESSITY, GAMMA_SUFFICIENCY, mask_weights, patch_maps_to_masks

    b, _, h, w = pixels.shape
    chosen = np.flatnonzero(rng.random(b) < prob)
    pixels, codes = pixels.clone(), codes.clone()
    if len(chosen) == 0:
        return pixels, codes
    gh, gw = h // patch_size, w // patch_size
    background = (1.0 - object_mask - co_object_mask).clamp(0.0, 1.0)
    parts = {"object": object_mask, "co_object": co_object_mask, "background": background}
    sources = rng.choice(len(_MASK_SOURCES), size=len(chosen), p=_MASK_SOURCE_P)
    maps = torch.zeros(len(chosen), gh, gw)
    for j, i in enumerate(chosen.tolist()):
        source = _MASK_SOURCES[sources[j]]
        if source == "co_object" and float(co_object_mask[i].sum()) == 0.0:
            source = "object"
        if source == "random":
            noise = rng.random((gh, gw))
            keep = noise >= np.quantile(noise, 1.0 - rng.uniform(0.1, 0.6))
            maps[j] = torch.from_numpy(np.where(keep, noise, 0.0)).float()
        else:
            maps[j] = F.avg_pool2d(parts[source][i][None, None], patch_size)[0, 0]
    masks = patch_maps_to_masks(maps, (h, w))
    remove = torch.from_numpy(rng.random(len(chosen)) < 0.5)[:, None, None]
    idx = torch.from_numpy(chosen)
    # The pixel weights of categorize's sufficiency / necessity images (x ⊙ weight).
    weight = torch.where(remove, mask_weights(masks, GAMMA_NECESSITY, invert=True),
                         mask_weights(masks, GAMMA_SUFFICIENCY, invert=False))
    masked = (pixels[idx] * weight[:, None]).clamp(0.0, 1.0)

    def visible(part: torch.Tensor) -> torch.Tensor:
        total = part[idx].sum(dim=(1, 2))
        return (weight * part[idx]).sum(dim=(1, 2)) >= VISIBLE_FRACTION * total.clamp_min(1e-6)

    obj_vis, bg_vis = visible(object_mask), visible(background)
    has_co = co_object_mask[idx].sum(dim=(1, 2)) > 0
    co_vis = visible(co_object_mask) & has_co
    new = codes[idx].clone()
    for key in ("class_name", "object_color", "object_texture"):
        new[~obj_vis, _KEYS.index(key)] = ABSENT
    new[~bg_vis, _KEYS.index("background")] = ABSENT
    new[has_co & ~co_vis, _KEYS.index("co_object")] = none_code
    anything = obj_vis | bg_vis | co_vis
    pixels[idx[anything]] = masked[anything]
    codes[idx[anything]] = new[anything]
    return pixels, codes


def _visible_row(codes: np.ndarray, info: dict[str, Any]) -> dict[str, str]:
    """The attribute values an image's codes say are visible (ABSENT ones left out)."""
    vocab = info["vocabulary"]
    return {k: vocab[k][int(c)] for k, c in zip(_KEYS, codes) if c >= 0}


def cone_penalty(image_emb: torch.Tensor, text_emb: torch.Tensor, floor: float) -> torch.Tensor:
    """Mean of ``relu(floor − cos)^2`` over all image–text pairs (embeddings L2-normalised).

    Web-trained CLIPs put every image–text cosine in a narrow positive band (about 0.1–0.4):
    ConceptScope's sufficiency and necessity are *ratios* of such cosines and assume it. A tiny
    CLIP trained only contrastively spreads its embeddings over the sphere, and a ratio with a
    negative or near-zero denominator flips or explodes. This keeps cosines above ``floor``.
    """
    return F.relu(floor - image_emb @ text_emb.t()).pow(2).mean()


# A patch is labelled by the part that covers at least this share of it (object, co-object),
# or as background when the two together cover at most 1 - PATCH_PART_SHARE; mixed patches are
# left out of the patch loss.
PATCH_PART_SHARE = 0.75


def patch_positives(object_cover: torch.Tensor, co_cover: torch.Tensor, codes: torch.Tensor,
                    fixed_codes: torch.Tensor) -> torch.Tensor:
    """Which fixed prompts are true of each patch, from what covers it (B, P, F) bool.

    object_cover, co_cover (B, P): the object's and co-object's share of each patch; codes (B, K)
    the images' attribute codes; fixed_codes (F, K) the fixed prompts' constraints (-1: any).
    An object patch makes the class, colour and texture prompts true, a co-object patch its
    co-object prompt, a background patch its background prompt; a mixed patch none."""
    stated = fixed_codes >= 0  # (F, K): the attribute each fixed prompt names
    agrees = (fixed_codes[None] == codes[:, None]) | ~stated[None]  # (B, F, K)
    true = agrees.all(-1)  # (B, F): the prompt is true of the image
    names = {k: stated[:, i] for i, k in enumerate(_KEYS)}  # (F,) per attribute
    object_prompt = names["class_name"] | names["object_color"] | names["object_texture"]
    is_object = object_cover >= PATCH_PART_SHARE
    is_co = co_cover >= PATCH_PART_SHARE
    is_background = (object_cover + co_cover) <= 1.0 - PATCH_PART_SHARE
    positives = (is_object[..., None] & object_prompt) | (is_co[..., None] & names["co_object"])
    positives = positives | (is_background[..., None] & names["background"])
    return positives & true[:, None, :]


def patch_loss(patch_emb: torch.Tensor, fixed_text: torch.Tensor, positives: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    """Multi-positive cross-entropy of each labelled patch over the fixed prompts.

    patch_emb (B, P, e) and fixed_text (F, e) L2-normalised; positives (B, P, F). Patches without a
    true prompt are left out. Makes a patch token at the last block say what is under it, the
    local patch semantics real CLIP ViTs have at their middle blocks. Off in the shipped recipe:
    measured, it did not make the example's bias claims more precise (train_tiny_clip's docstring)."""
    logits = scale * patch_emb @ fixed_text.t()  # (B, P, F)
    labelled = positives.any(-1)
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    pos = logits.masked_fill(~positives, float("-inf")).logsumexp(-1)
    return (logits.logsumexp(-1) - pos)[labelled].mean()


@dataclass
class TrainResult:
    """What :func:`train_tiny_clip` produced."""

    model_dir: Path
    steps: int
    seconds: float
    final_loss: float
    loss_curve: list[tuple[int, float]]


def train_tiny_clip(
    world_dir: Path,
    out_dir: Path,
    *,
    steps: int = 1000,
    batch_size: int = 128,
    seed: int = 0,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    max_shift: int = 2,
    mask_prob: float = 0.5,
    cone_floor: float = 0.05,
    cone_weight: float = 1.0,
    patch_weight: float = 0.0,
    init_weights: Path | None = None,
    model_cfg: dict[str, Any] | None = None,
    split: str = "train",
    threads: int = 2,
    log: Callable[[str], None] | None = print,
    log_every: int = 50,
    on_eval: Callable[[ClipModel, int], None] | None = None,
    eval_every: int = 0,
) -> TrainResult:
    """Train a tiny CLIP on ``world_dir/split`` and save an open_clip local-dir folder.

    Each step takes ``batch_size`` random images, masks a fraction ``mask_prob`` of them as
    the alignment scores will (:func:`mask_augment`), applies random horizontal flips and
    shifts of up to ``max_shift`` pixels, samples one caption per image that is true of what
    stays visible (:func:`sample_caption`), adds every class and attribute prompt, and
    minimises :func:`multi_positive_clip_loss` plus ``cone_weight`` × :func:`cone_penalty` plus
    ``patch_weight`` × :func:`patch_loss` on the unmasked images' patch tokens.
    AdamW, linear warm-up then cosine decay. Token-embedding rows outside the world's token
    set stay exactly zero. The images and their part masks are re-rendered from the world's
    config (``world.json``), which reproduces the PNGs on disk exactly.
    ``on_eval(model, step)`` (model in eval mode) runs every ``eval_every`` steps.
    ``init_weights``: a safetensors state of the same model to start from (fine-tuning).
    """
    import open_clip
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    info = W.load_world_info(world_dir)
    rows = W.load_metadata(world_dir, split)
    world = W.render_split_layers(W.WorldConfig.from_json(info["config"]), split)
    images = world.images
    object_masks = torch.from_numpy(world.object_masks)
    co_object_masks = torch.from_numpy(world.co_object_masks)
    image_size = images.shape[1]
    cfg = model_cfg or tiny_clip_model_cfg(image_size=image_size)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (n, 3, H, W)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    codes = torch.from_numpy(_codes(rows, info))  # (n, K)
    none_code = info["vocabulary"]["co_object"].index("none")
    patch_size = int(cfg["vision_cfg"]["patch_size"])

    model = CLIP(**cfg)
    if init_weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(init_weights)))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    keep = world_token_ids(info, tokenizer)
    unused = torch.ones(cfg["text_cfg"]["vocab_size"], dtype=torch.bool)
    unused[keep] = False
    with torch.no_grad():
        model.token_embedding.weight[unused] = 0.0
    # Rows of unused tokens must stay zero: mask their gradient, no decay on embeddings.
    model.token_embedding.weight.register_hook(lambda g: g.masked_fill(unused[:, None], 0.0))

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    fixed = fixed_prompts(info)
    fixed_tokens = tokenizer([t for t, _ in fixed])
    fixed_codes = torch.from_numpy(_constraint_codes([c for _, c in fixed], info))

    model.train()
    curve: list[tuple[int, float]] = []
    t0 = time.time()
    running = float("nan")
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(rows), size=batch_size, replace=False))
        x01, batch_codes = mask_augment(
            pixels[idx].float() / 255.0, object_masks[idx], co_object_masks[idx], codes[idx], none_code, rng,
            patch_size=patch_size, prob=mask_prob,
        )
        x = (x01 - mean) / std
        if patch_weight > 0:
            unmasked = (x01 == pixels[idx].float() / 255.0).flatten(1).all(1)
            # The part masks ride along as extra channels, so flips and shifts move them with the
            # pixels (the shifts' draws do not depend on the channels: the shipped path is unchanged).
            x = torch.cat([x, object_masks[idx][:, None], co_object_masks[idx][:, None]], 1)
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if max_shift > 0:
            # Random translation with edge padding: the tiny ViT overfits a few
            # thousand images quickly; shifts keep every attribute true.
            x = _random_shift(x, max_shift, rng)
        x, parts = x[:, :3], x[:, 3:]  # parts: (B, 2, H, W) with the patch loss, else empty
        sampled = [sample_caption(_visible_row(c, info), rng) for c in batch_codes.numpy()]
        tokens = torch.cat([tokenizer([t for t, _ in sampled]), fixed_tokens])
        ccodes = torch.cat([torch.from_numpy(_constraint_codes([c for _, c in sampled], info)), fixed_codes])
        # positives[i, j]: caption j states nothing false about image i.
        positives = ((ccodes[None] == -1) | (ccodes[None] == batch_codes[:, None])).all(-1)

        if patch_weight > 0:
            model.visual.output_tokens = True
            pooled, patch_tokens = model.visual(x)
            model.visual.output_tokens = False
            img = F.normalize(pooled, dim=-1)
        else:
            img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = multi_positive_clip_loss(img, txt, positives, model.logit_scale.exp())
        if cone_weight > 0:
            loss = loss + cone_weight * cone_penalty(img, txt, cone_floor)
        if patch_weight > 0 and bool(unmasked.any()):
            cover = F.avg_pool2d(parts[unmasked], patch_size).flatten(2)  # (b, 2, P)
            patch_pos = patch_positives(cover[:, 0], cover[:, 1], batch_codes[unmasked], fixed_codes)
            patch_emb = F.normalize(patch_tokens[unmasked] @ model.visual.proj, dim=-1)
            loss = loss + patch_weight * patch_loss(patch_emb, txt[len(sampled):], patch_pos, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((step + 1, round(running, 4)))
            if log is not None:
                log(f"step {step + 1}/{steps} loss {running:.4f} scale {model.logit_scale.exp().item():.1f} "
                    f"{time.time() - t0:.0f}s")
        if on_eval is not None and eval_every > 0 and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            on_eval(model, step + 1)
            model.train()
    seconds = time.time() - t0

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg(image_size)}, indent=2) + "\n",
        encoding="utf-8",
    )
    return TrainResult(out_dir, steps, seconds, running, curve)


# ----------------------------------------------------------------------------- packing


def pack_tiny_clip(model_dir: Path, asset_dir: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``asset_dir/tiny_clip.tar.xz`` (deterministic tar of the local-dir folder)."""
    model_dir, asset_dir = Path(model_dir), Path(asset_dir)
    asset_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            data = (model_dir / name).read_bytes()
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            tar.addfile(ti, io.BytesIO(data))
    archive = asset_dir / ARCHIVE_NAME
    archive.write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    if metrics is not None:
        (asset_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return archive


def default_cache_dir() -> Path:
    """``$CONCEPTSCOPE_CACHE`` or ``$XDG_CACHE_HOME/conceptscope`` (``~/.cache/conceptscope``)."""
    env = os.environ.get("CONCEPTSCOPE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conceptscope"


def ensure_tiny_clip(dest_dir: Path | None = None, archive: Path | None = None) -> Path:
    """Unpack the shipped tiny CLIP (once) and return its open_clip local-dir folder.

    The folder is ``dest_dir/tiny_clip-<sha256[:12]>``; it is built in a temporary
    sibling and renamed into place, so concurrent callers never see a half-written one.
    """
    archive = Path(archive) if archive is not None else ASSET_DIR / ARCHIVE_NAME
    if not archive.is_file():
        raise FileNotFoundError(f"tiny CLIP archive missing: {archive}")
    dest_dir = Path(dest_dir) if dest_dir is not None else default_cache_dir()
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    target = dest_dir / f"tiny_clip-{digest}"
    if (target / CONFIG_FILE).is_file() and (target / WEIGHTS_FILE).is_file():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny_clip-", dir=dest_dir))
    try:
        with tarfile.open(fileobj=io.BytesIO(lzma.decompress(archive.read_bytes())), mode="r") as tar:
            for member in tar.getmembers():
                if member.name not in (CONFIG_FILE, WEIGHTS_FILE) or not member.isfile():
                    raise ValueError(f"unexpected member {member.name!r} in {archive}")
                f = tar.extractfile(member)
                assert f is not None
                (tmp / member.name).write_bytes(f.read())
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first; its copy is identical.
            if not (target / WEIGHTS_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_clip_dir(cache_dir: Path | None = None) -> Path:
    """Ready open_clip local-dir folder of the shipped model (alias of :func:`ensure_tiny_clip`)."""
    return ensure_tiny_clip(cache_dir)


def resolve_example_model(model: str, cache_root: Path) -> ResolvedModel:
    """`example:tiny-clip` -> the shipped model's local-dir folder (materialised under the cache)."""
    name = model[len(EXAMPLE_PREFIX):]
    if name != "tiny-clip":
        raise CscopeError(f"unknown example model {model!r}", hint="the embedded example model is example:tiny-clip")
    folder = tiny_clip_dir(cache_root / "example-models")
    return ResolvedModel(f"local-dir:{folder}", None, local_dir_fingerprint(folder, cache_root), model)


def load_tiny_clip(
    cache_dir: Path | None = None, device: str | torch.device = "cpu"
) -> tuple[ClipModel, Callable[[Image.Image], torch.Tensor], Callable[..., torch.Tensor]]:
    """``(model, preprocess, tokenizer)`` of the shipped model via the standard open_clip path."""
    import open_clip

    path = ensure_tiny_clip(cache_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    model.eval()
    return model, preprocess, tokenizer


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def encode_images(
    model: ClipModel,
    preprocess: Callable[[Image.Image], torch.Tensor],
    images: Sequence[Image.Image],
    batch_size: int = 256,
) -> torch.Tensor:
    """L2-normalised image embeddings (n, embed_dim)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([preprocess(im) for im in images[i : i + batch_size]]).to(device)
        out.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_texts(model: ClipModel, tokenizer: Callable[..., torch.Tensor], texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings (len(texts), embed_dim)."""
    device = next(model.parameters()).device
    return F.normalize(model.encode_text(tokenizer(list(texts)).to(device)).float(), dim=-1).cpu()


def _split_images(dataset_dir: Path, split: str) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    rows = W.load_metadata(dataset_dir, split)
    d = Path(dataset_dir) / split
    return [Image.open(d / r["file_name"]).convert("RGB") for r in rows], rows


def zero_shot_accuracy(
    model: ClipModel,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    dataset_dir: Path,
    split: str = "test",
    template: str = ZERO_SHOT_TEMPLATE,
) -> float:
    """Top-1 accuracy of ``argmax_c cos(image, template.format(class_c))`` on a world split."""
    info = W.load_world_info(dataset_dir)
    images, rows = _split_images(Path(dataset_dir), split)
    img = encode_images(model, preprocess, images)
    txt = encode_texts(model, tokenizer, [template.format(c) for c in info["class_names"]])
    pred = (img @ txt.t()).argmax(dim=1).numpy()
    return float((pred == np.array([r["label"] for r in rows])).mean())


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    scores (n,) float, truth (n,) bool. NaN when one class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks (1-based) over runs of equal scores.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = 0.5 * (s + e - 1) + 1
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def attribute_aurocs(
    model: ClipModel,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    dataset_dir: Path,
    split: str = "test",
    attributes: Sequence[str] = ("class_name",) + W.ATTRIBUTES,
) -> dict[str, dict[str, float]]:
    """AUROC of ``cos(image, attribute_prompt(attr, word))`` against ground truth.

    Returns ``{attribute: {word: auroc}}`` for every word except ``"none"``.
    """
    info = W.load_world_info(dataset_dir)
    images, rows = _split_images(Path(dataset_dir), split)
    img = encode_images(model, preprocess, images)
    out: dict[str, dict[str, float]] = {}
    for attr in attributes:
        words = [w for w in info["vocabulary"][attr] if w != "none"]
        txt = encode_texts(model, tokenizer, [attribute_prompt(attr, w) for w in words])
        sims = (img @ txt.t()).numpy()
        out[attr] = {
            w: auroc(sims[:, k], np.array([r[attr] == w for r in rows])) for k, w in enumerate(words)
        }
    return out


def evaluate(
    model: ClipModel,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    dataset_dir: Path,
    split: str = "test",
) -> dict[str, Any]:
    """Zero-shot accuracy plus per-word AUROCs and their per-attribute minimum/mean."""
    acc = zero_shot_accuracy(model, preprocess, tokenizer, dataset_dir, split)
    aurocs = attribute_aurocs(model, preprocess, tokenizer, dataset_dir, split)
    summary = {
        a: {"min": round(min(v.values()), 4), "mean": round(float(np.mean(list(v.values()))), 4)}
        for a, v in aurocs.items()
    }
    return {
        "zero_shot_accuracy": round(acc, 4),
        "auroc_summary": summary,
        "auroc": {a: {w: round(x, 4) for w, x in v.items()} for a, v in aurocs.items()},
    }


@torch.no_grad()
def mask_calibration(
    model: ClipModel,
    tokenizer: Callable[..., torch.Tensor],
    dataset_dir: Path,
    split: str = "test",
    limit: int = 200,
) -> dict[str, float]:
    """How the model's class similarity reacts to ConceptScope's masks, on ground-truth parts.

    For the first ``limit`` images of a world split: the mean cosine with the image's class
    prompt of the image itself, of the object kept alone (``x ⊙ m^0.5``, m from the object's
    patch coverage) and of the object removed (``x ⊙ (1 − m^0.001)``), the same for the
    background kept alone, the fraction of negative cosines among all of them, and the mean
    sufficiency / necessity ratios ConceptScope would compute for an ideal "object" latent and
    an ideal "background" latent. A calibrated model gives object sufficiency near 1 and
    necessity above 1, and background sufficiency below 1 and necessity near 1.
    """
    from conceptscope_cli.masks import masked_variants, patch_maps_to_masks

    info = W.load_world_info(dataset_dir)
    world = W.render_split_layers(W.WorldConfig.from_json(info["config"]), split, limit)
    device = next(model.parameters()).device
    x01 = torch.from_numpy(world.images).permute(0, 3, 1, 2).float() / 255.0
    patch = int(model.visual.patch_size[0])
    obj = torch.from_numpy(world.object_masks)
    co = torch.from_numpy(world.co_object_masks)
    bg = (1 - obj - co).clamp(0, 1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    txt = encode_texts(model, tokenizer, [ZERO_SHOT_TEMPLATE.format(c) for c in info["class_names"]])
    labels = torch.tensor([s.label for s in world.samples])

    def sims(x: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(model.encode_image(((x - mean) / std).to(device)).float(), dim=-1).cpu()
        return (emb * txt[labels]).sum(-1)

    out: dict[str, float] = {}
    base = sims(x01)
    every = [base]
    out["sim_image"] = float(base.mean())
    for name, part in (("object", obj), ("background", bg)):
        masks = patch_maps_to_masks(F.avg_pool2d(part[:, None], patch)[:, 0], (int(x01.shape[-2]), int(x01.shape[-1])))
        keep, drop = masked_variants(x01, masks)
        s_keep, s_drop = sims(keep), sims(drop)
        every += [s_keep, s_drop]
        out[f"sim_{name}_kept"] = float(s_keep.mean())
        out[f"sim_{name}_removed"] = float(s_drop.mean())
        out[f"{name}_sufficiency"] = float((s_keep / base).mean())
        out[f"{name}_necessity"] = float((base / s_drop).mean())
    out["negative_fraction"] = float((torch.cat(every) < 0).float().mean())
    return {k: round(v, 4) for k, v in out.items()}


__all__ = [
    "ASSET_DIR",
    "ZERO_SHOT_TEMPLATE",
    "TrainResult",
    "attribute_aurocs",
    "attribute_prompt",
    "auroc",
    "default_cache_dir",
    "encode_images",
    "encode_texts",
    "ensure_tiny_clip",
    "evaluate",
    "images_to_tensor",
    "load_tiny_clip",
    "cone_penalty",
    "mask_augment",
    "mask_calibration",
    "multi_positive_clip_loss",
    "pack_tiny_clip",
    "preprocess_cfg",
    "sample_caption",
    "resolve_example_model",
    "tiny_clip_dir",
    "tiny_clip_model_cfg",
    "train_tiny_clip",
    "zero_shot_accuracy",
]
