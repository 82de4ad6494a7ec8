"""Latent masks over the model's input crop and the masked images of the alignment scores.

ConceptScope scores a latent c on an image x by showing CLIP two edited copies of x:

* the *sufficiency* image ``x ⊙ m^γ`` (γ = 0.5): only the region where c fires survives;
* the *necessity* image ``x ⊙ (1 − m^γ)`` (γ = 0.001): that region is blacked out. With so small a
  γ, ``m^γ`` is ≈ 1 wherever m > 0, so the whole support of the mask is removed, not just its peak.

``m`` is the latent's patch map upsampled (bilinear) to the crop and min–max normalised per image.

Two rules keep this faithful, both of which the reference gets wrong or leaves implicit:

1. Masking happens on the *exact* crop the model sees (the preprocessed pixels, after resize and
   centre crop). The patch map is a map of that crop; applying it to a differently resized copy
   of the image (the reference stretches the full image to a square) misaligns mask and pixels.
2. Pixels are masked in [0, 1] space and the CLIP mean/std normalisation is applied AFTER masking,
   so "black" means zero pixels (as in the reference tiles), not the channel mean.
"""

from __future__ import annotations

from typing import TypeVar, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

ArrayLike = Union[np.ndarray, torch.Tensor]
T = TypeVar("T", np.ndarray, torch.Tensor)

# Below this range a map is treated as constant: nothing stands out, so the mask is all zero.
_RANGE_EPS = 1e-12


def _minmax(maps: Float[Tensor, "B H W"]) -> Float[Tensor, "B H W"]:
    """Per-map min–max normalisation of (B, H, W); constant maps become all-zero."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    span = hi - lo
    safe = torch.where(span > _RANGE_EPS, span, torch.ones_like(span))
    out = (maps - lo) / safe
    return torch.where(span > _RANGE_EPS, out, torch.zeros_like(out)).clamp_(0.0, 1.0)


def patch_maps_to_masks(patch_maps: Float[Tensor, "B gh gw"], out_size: tuple[int, int]) -> Float[Tensor, "B H W"]:
    """Batched :func:`patch_map_to_mask`: (B, gh, gw) -> (B, H, W) float32 in [0, 1]."""
    maps = torch.as_tensor(patch_maps).detach().to(torch.float32)
    if maps.ndim != 3:
        raise ValueError(f"patch maps must be (B, gh, gw), got shape {tuple(maps.shape)}")
    # Non-finite activations would poison the min-max; they carry no location information.
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    h, w = int(out_size[0]), int(out_size[1])
    if maps.shape[0] == 0:
        return torch.zeros((0, h, w), dtype=torch.float32)
    up = F.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return _minmax(up)


def patch_map_to_mask(patch_map: Float[T, "gh gw"], out_size: tuple[int, int]) -> Float[T, "H W"]:
    """Mask of one latent on one image, on the model's input crop.

    Args:
        patch_map: (gh, gw) activations of the latent on the patch tokens (CLS dropped).
        out_size: (H, W) of the preprocessed crop the model sees (e.g. (224, 224)).

    Returns:
        (H, W) float32 in [0, 1]: the map upsampled bilinearly (``align_corners=False``) to the
        crop, then min–max normalised over the image. An all-zero or constant map (including
        NaN/inf, which are read as 0) gives an all-zero mask, never NaN. Same container type as
        the input (numpy in, numpy out; torch in, torch out on CPU).
    """
    is_numpy = isinstance(patch_map, np.ndarray)
    tensor = torch.as_tensor(np.asarray(patch_map) if is_numpy else patch_map)
    if tensor.ndim != 2:
        raise ValueError(f"patch map must be (gh, gw), got shape {tuple(tensor.shape)}")
    mask = patch_maps_to_masks(tensor.cpu()[None], out_size)[0]
    # mypy cannot tie the constrained T to the is_numpy flag.
    return mask.numpy() if is_numpy else mask  # type: ignore[return-value]


# ConceptScope's mask exponents (METHOD §4): sufficiency keeps x ⊙ m^0.5, necessity x ⊙ (1 − m^0.001).
GAMMA_SUFFICIENCY = 0.5
GAMMA_NECESSITY = 0.001


def mask_weights(masks: Float[Tensor, "B H W"], gamma: float, invert: bool) -> Float[Tensor, "B H W"]:
    """Per-pixel weights (B, H, W) of :func:`apply_masks`: ``m^γ``, or ``1 − m^γ`` when ``invert``."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    weight = masks.clamp(0.0, 1.0).pow(gamma)
    return 1.0 - weight if invert else weight


def apply_masks(images: Float[ArrayLike, "B 3 H W"], masks: Float[ArrayLike, "B H W"], gamma: float,
                invert: bool) -> Float[Tensor, "B 3 H W"]:
    """Multiply each image by its mask raised to ``gamma`` (or by one minus that).

    Args:
        images: (B, 3, H, W) preprocessed but UNNORMALISED pixels in [0, 1]: the exact crop the
            model sees (resize + centre crop already applied), not a differently resized copy.
        masks: (B, H, W) in [0, 1] on that same crop (see :func:`patch_map_to_mask`); values
            outside [0, 1] are clipped.
        gamma: exponent of the mask; must be > 0 (0 ** gamma would otherwise not be 0).
        invert: False gives ``x ⊙ m^γ`` (keep the concept), True gives ``x ⊙ (1 − m^γ)`` (remove it).

    Returns:
        (B, 3, H, W) float tensor in [0, 1], on the images' device and dtype (float32 when the
        input is an integer or numpy array). Apply the CLIP mean/std normalisation to this
        result, never before masking: black must be zero pixels.
    """
    x = torch.as_tensor(images)
    if not torch.is_floating_point(x):
        x = x.to(torch.float32)
    m = torch.as_tensor(masks).to(device=x.device, dtype=x.dtype)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(x.shape)}")
    if m.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"masks must be (B, H, W) = {(x.shape[0], x.shape[2], x.shape[3])}, got {tuple(m.shape)}")
    return (x * mask_weights(m, gamma, invert)[:, None]).clamp(0.0, 1.0)


def masked_variants(
    images: Float[ArrayLike, "B 3 H W"], masks: Float[ArrayLike, "B H W"], gamma_suff: float = GAMMA_SUFFICIENCY,
    gamma_nec: float = GAMMA_NECESSITY,
) -> tuple[Float[Tensor, "B 3 H W"], Float[Tensor, "B 3 H W"]]:
    """Sufficiency and necessity images of a batch, both on the model's exact input crop.

    Args:
        images: (B, 3, H, W) unnormalised pixels in [0, 1] (the crop the model sees).
        masks: (B, H, W) in [0, 1], one per image (for one latent, or one latent per row).
        gamma_suff: exponent of the sufficiency mask (reference 0.5).
        gamma_nec: exponent of the necessity mask (reference 0.001).

    Returns:
        ``(suff, nec)``, each (B, 3, H, W): ``x ⊙ m^gamma_suff`` and ``x ⊙ (1 − m^gamma_nec)``.
        Normalise (CLIP mean/std) after this call.
    """
    suff = apply_masks(images, masks, gamma_suff, invert=False)
    nec = apply_masks(images, masks, gamma_nec, invert=True)
    return suff, nec
