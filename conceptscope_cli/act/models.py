"""Classifiers check-model evaluates: the backbone's zero-shot head, a linear probe cscope trains
on the split's cached image features, and the user's own model (TorchScript or an entry point).

The user-model contract (README, "cscope check-model"): a `torch.nn.Module` mapping a float batch
of preprocessed images (B, 3, H, W) to logits (B, C), C = the dataset's classes in `class_names`
order. Its preprocessing (PIL image → (3, H, W) tensor) is, in order: the module's `preprocess`
attribute (entry points only), or `--image-size/--mean/--std`, or the backbone's own.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from conceptscope_cli.errors import CscopeError

Preprocess = Callable[[Any], torch.Tensor]


@dataclass
class ImageClassifier:
    kind: str  # zeroshot | probe | torchscript | entrypoint
    description: str
    module: torch.nn.Module  # (B, 3, H, W) -> (B, C)
    preprocess: Preprocess


class ZeroShot(torch.nn.Module):
    """CLIP zero-shot head: logits = scale · normalize(encode_image(x)) · text (C, e)ᵀ."""

    text: torch.Tensor  # registered buffer (C, e)

    def __init__(self, model: torch.nn.Module, text: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale
        self.register_buffer("text", text)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)  # type: ignore[operator]
        return self.scale * features @ self.text.T


def declared_preprocess(image_size: int | None, mean: list[float] | None, std: list[float] | None) -> Preprocess | None:
    """Resize (shorter side) + centre crop to image_size, to tensor, normalise; None when nothing is declared."""
    if image_size is None and mean is None and std is None:
        return None
    if image_size is None or mean is None or std is None or len(mean) != 3 or len(std) != 3:
        raise CscopeError("declare the model's preprocessing completely",
                          hint="pass --image-size N --mean R,G,B --std R,G,B together (or none of them)")
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                               lambda im: im.convert("RGB"), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def load_torchscript(path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise CscopeError(f"model file not found: {path}")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+ prefers torch.export; TorchScript still loads
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means "not a TorchScript archive"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CscopeError(f"{path} is not a TorchScript file ({first})",
                          hint="save it with torch.jit.save(torch.jit.script(model), PATH), or use --entry-point") from None


def load_entry_point(spec: str, search_path: Path) -> torch.nn.Module:
    """`package.module:function`: import the module (the project folder on sys.path) and call the function."""
    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise CscopeError(f"bad entry point {spec!r}", hint="write it as package.module:function")
    if str(search_path) not in sys.path:
        sys.path.insert(0, str(search_path))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's import failing is their error, shown plainly
        raise CscopeError(f"entry point {spec!r}: could not import {module_name!r} ({type(exc).__name__}: {exc})",
                          hint=f"the module must be importable from {search_path} or the environment") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise CscopeError(f"entry point {spec!r}: {module_name} has no callable {function!r}")
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001
        raise CscopeError(f"entry point {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise CscopeError(f"entry point {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def logits_of(classifier: ImageClassifier, images: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, C) logits, checked: a wrong shape or a failing forward is the user's error, named."""
    try:
        with torch.no_grad():
            out = classifier.module(images)
    except Exception as exc:  # noqa: BLE001
        raise CscopeError(f"{classifier.description} failed on a batch of shape {tuple(images.shape)}: "
                          f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                          hint="check the declared preprocessing (--image-size/--mean/--std)") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CscopeError(f"{classifier.description} returned {shape} for {images.shape[0]} images; "
                          f"expected logits of shape (B, {n_classes})")
    if out.shape[1] != n_classes:
        raise CscopeError(f"{classifier.description} gives {out.shape[1]} class scores, the dataset has {n_classes} "
                          "classes", hint="the logits must follow the dataset's class_names order")
    return out.float()


# ----------------------------------------------------------------- linear probe


def mean_features(reader: Any, chunk_images: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image features = mean over the cached tokens of the layer's activations: (N, d), labels, row_index."""
    feats, labels, rows = [], [], []
    for acts, y, r in reader.iter_chunks(chunk_images):
        feats.append(np.asarray(acts, dtype=np.float32).mean(1))
        labels.append(y)
        rows.append(r)
    d = reader.d_model
    return (np.concatenate(feats) if feats else np.zeros((0, d), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64),
            np.concatenate(rows) if rows else np.zeros(0, np.int64))


PROBE_L2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # candidate L2 strengths (per image, on standardised features)


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, *, steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression, full-batch L-BFGS (deterministic): (W (d, C), b (C,))."""
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def train_probe(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> dict[str, Any]:
    """Standardise, choose L2 on a seeded 20% hold-out of the split, refit on all of it."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    order = np.random.default_rng(seed).permutation(len(y))
    cut = max(1, len(y) // 5)
    held, fit = order[:cut], order[cut:]
    scores = {}
    for l2 in PROBE_L2:
        w, b = fit_logistic(z[fit], y[fit], n_classes, l2)
        scores[l2] = float(((z[held] @ w + b).argmax(1) == y[held]).mean())
    best = max(PROBE_L2, key=lambda l2: (scores[l2], l2))  # ties: the stronger penalty
    w, b = fit_logistic(z, y, n_classes, best)
    return {"W": w.astype(np.float32), "b": b.astype(np.float32), "mean": mean.astype(np.float32),
            "std": std.astype(np.float32), "l2": best, "holdout_accuracy": scores,
            "train_accuracy": float(((z @ w + b).argmax(1) == y).mean())}


def probe_logits(probe: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return ((x - probe["mean"]) / probe["std"]) @ probe["W"] + probe["b"]
