"""Offline latent naming with CLIP (attributing-clip's recipe, METHOD §3).

s_k = mean normalised CLIP image embedding of latent k's top images;
score(k, label) = cos(s_k, T(label)) − cos(s_k, T("")): the empty prompt's similarity is
subtracted so that labels are compared by what they add over "any image".
name(k) = argmax score; clarity(k) = mean pairwise cosine of the top-image embeddings
(how consistent the top images are).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from conceptscope_cli.backbone.types import ClipModel
from conceptscope_cli.devices import host_to_device


def default_vocabulary() -> list[str]:
    """The shipped vocabulary: object names plus colours, textures, materials, scenes."""
    text = resources.files("conceptscope_cli").joinpath("data/vocabulary.txt").read_text(encoding="utf-8")
    return read_vocabulary_text(text)


def read_vocabulary_text(text: str) -> list[str]:
    words = [line.strip() for line in text.splitlines()]
    seen: dict[str, None] = {}
    for word in words:
        if word and not word.startswith("#"):
            seen.setdefault(word, None)
    return list(seen)


@dataclass
class ClipName:
    latent: int
    name: str
    score: float
    clarity: float
    runner_up: str | None


@torch.no_grad()
def embed_images(model: ClipModel, preprocess, images: list[Image.Image], device: torch.device, batch: int = 64) -> torch.Tensor:  # noqa: ANN001
    """L2-normalised CLIP image embeddings, (n, e)."""
    out = []
    for start in range(0, len(images), batch):
        x = host_to_device(torch.stack([preprocess(im) for im in images[start:start + batch]]), device)
        out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


@torch.no_grad()
def name_latents_clip(
    latent_rows: dict[int, list[int]],
    row_embeddings: dict[int, torch.Tensor],
    vocabulary: list[str],
    text_embeddings: torch.Tensor,
    empty_embedding: torch.Tensor,
) -> dict[int, ClipName]:
    """Name each latent from the embeddings of its top images.

    latent_rows: latent → dataset rows of its top images; row_embeddings: row → (e,);
    text_embeddings (V, e) for `vocabulary`, empty_embedding (e,), all L2-normalised.
    """
    names: dict[int, ClipName] = {}
    for latent, rows in latent_rows.items():
        if not rows:
            continue
        emb = torch.stack([row_embeddings[r] for r in rows])  # (n, e)
        mean = emb.mean(0)
        scores = text_embeddings @ mean - empty_embedding @ mean  # (V,)
        best = torch.topk(scores, k=min(2, len(vocabulary)))
        n = len(rows)
        gram = emb @ emb.T
        clarity = float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))) if n > 1 else 1.0
        names[latent] = ClipName(
            latent=latent,
            name=vocabulary[int(best.indices[0])],
            score=float(best.values[0]),
            clarity=clarity,
            runner_up=vocabulary[int(best.indices[1])] if len(best.indices) > 1 else None,
        )
    return names


def vocabulary_from(path: Path | None, extra: list[str] | None = None) -> list[str]:
    words = read_vocabulary_text(path.read_text(encoding="utf-8")) if path else default_vocabulary()
    return list(dict.fromkeys([*(extra or []), *words]))
