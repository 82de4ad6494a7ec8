"""Reference images: a latent's top images masked by its patch map, tiled in one row.

The patch map of latent k on image x is f_k over the patch tokens (CLS dropped),
reshaped to the patch grid, upsampled to the model's crop and min–max normalised per
image (METHOD §3). It is drawn on exactly the crop the model saw.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from conceptscope_cli.backbone.views import ModelView
from conceptscope_cli.data.datasets import SplitHandle, decode_image
from conceptscope_cli.devices import HeapWatch, host_to_device, release_free_memory
from conceptscope_cli.extract.images import TokenReader
from conceptscope_cli.masks import patch_map_to_mask
from conceptscope_cli.sae.model import SparseAutoencoder


def fetch_images(split: SplitHandle, row_indices: list[int]) -> dict[int, Image.Image]:
    """Decode the images of some rows (random access; one ordered pass when streaming)."""
    wanted = sorted({int(r) for r in row_indices})
    column = split.config.image_column
    out: dict[int, Image.Image] = {}
    if not split.streaming:
        for row in wanted:
            out[row] = decode_image(split.rows[row][column])
        return out
    remaining = set(wanted)
    for row, raw in split.iter_raw(0, wanted[-1] + 1 if wanted else 0):
        if row in remaining:
            out[row] = decode_image(raw[column])
            remaining.discard(row)
    return out


@torch.no_grad()
def patch_maps(
    reader: TokenReader, sae: SparseAutoencoder, positions: np.ndarray, latents: np.ndarray, grid: tuple[int, int],
    device: torch.device,
) -> np.ndarray:
    """f of `latents[i]` over the patch tokens of image `positions[i]`, (n, gh, gw).

    Needs an entry that stores every patch token in raster order (tokens "all" or "patches").
    """
    unique, inverse = np.unique(positions, return_inverse=True)
    acts = host_to_device(reader.read_images(unique), device).float()  # (u, T, d)
    n_patches = grid[0] * grid[1]
    first_patch = acts.shape[1] - n_patches  # 1 when CLS is stored, 0 for patches only
    if first_patch not in (0, 1):
        raise ValueError(f"activation entry has {acts.shape[1]} tokens; patch maps need all {n_patches} patch tokens")
    out = np.zeros((len(positions), *grid), dtype=np.float32)
    for u in range(len(unique)):
        f = sae.encode(acts[u, first_patch:])  # (P, m)
        rows = np.flatnonzero(inverse == u)
        out[rows] = f[:, torch.as_tensor(latents[rows], device=f.device)].T.reshape(len(rows), *grid).cpu().numpy()
    return out


def masked_tile(images: list[Image.Image], maps: np.ndarray, view: ModelView, gap: int = 2) -> Image.Image:
    """Each image's model crop times its normalised upsampled map, side by side, (H, n·W) PNG."""
    crops = []
    for image, patch_map in zip(images, maps):
        pixels = view.pixels(image)  # (3, H, W) in [0, 1]
        mask = patch_map_to_mask(torch.as_tensor(patch_map), (int(pixels.shape[1]), int(pixels.shape[2])))
        crops.append((pixels * torch.as_tensor(mask, dtype=pixels.dtype)[None]).clamp(0, 1))
    h, w = crops[0].shape[1:]
    tile = np.zeros((h, len(crops) * (w + gap) - gap, 3), dtype=np.uint8)
    for i, crop in enumerate(crops):
        tile[:, i * (w + gap): i * (w + gap) + w] = (crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(tile)


def write_reference_tiles(
    out_dir: Path,
    latents: np.ndarray,
    top_positions: np.ndarray,
    top_values: np.ndarray,
    *,
    reader: TokenReader,
    sae: SparseAutoencoder,
    split: SplitHandle,
    view: ModelView,
    grid: tuple[int, int],
    device: torch.device,
    n_images: int = 5,
    batch_images: int = 256,
) -> dict[int, dict[str, Any]]:
    """One `latent_XXXXX.png` per latent; returns {latent: {"path", "rows", "values"}}.

    Latents are drawn in batches of about `batch_images` top images (tokens, patch maps and
    decoded images of one batch at a time), so memory is bounded by the batch, not by the valid
    latents × `n_images` images (at ImageNet size ~10^5 images, ~10^11 bytes of float32 tokens).
    A `HeapWatch` after each batch and a trim at the end: the batches' forwards drift the C heap
    as the batch loops' do (devices.HeapWatch), and the tiles come just before the Gram pass."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heap = HeapWatch()
    chosen = {int(k): [int(p) for p, v in zip(top_positions[k][:n_images], top_values[k][:n_images]) if v > 0] for k in latents}
    result: dict[int, dict[str, Any]] = {}
    todo = deque(k for k in chosen if chosen[k])
    while todo:
        batch: list[int] = []
        while todo and (not batch or sum(len(chosen[k]) for k in batch) + len(chosen[todo[0]]) <= batch_images):
            batch.append(todo.popleft())
        positions = np.array([p for k in batch for p in chosen[k]], dtype=np.int64)
        owners = np.array([k for k in batch for _ in chosen[k]], dtype=np.int64)
        maps = patch_maps(reader, sae, positions, owners, grid, device)
        images = fetch_images(split, [int(reader.row_index[p]) for p in positions])
        cursor = 0
        for latent in batch:
            count = len(chosen[latent])
            rows = [int(reader.row_index[p]) for p in chosen[latent]]
            tile = masked_tile([images[r] for r in rows], maps[cursor:cursor + count], view)
            path = out_dir / f"latent_{latent:05d}.png"
            tile.save(path)
            result[latent] = {"path": path, "rows": rows, "values": [float(v) for v in top_values[latent][:count]]}
            cursor += count
        del maps, images
        heap.check()
    release_free_memory()  # what the tiles' forwards left free is not kept through the Gram pass
    return result
