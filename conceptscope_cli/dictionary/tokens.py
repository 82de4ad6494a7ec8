"""Block-L tokens of a few images recomputed from the images (no token cache needed)."""

from __future__ import annotations

import numpy as np
import torch

from conceptscope_cli.data.datasets import SplitHandle
from conceptscope_cli.devices import HeapWatch
from conceptscope_cli.dictionary.reference import fetch_images
from conceptscope_cli.extract.images import ImageTokens


class ImageTokenReader:
    """`read_images` by running the backbone on the requested images (positions index row_index)."""

    def __init__(self, tokens: ImageTokens, split: SplitHandle, row_index: np.ndarray, labels: np.ndarray,
                 batch_size: int = 64) -> None:
        self.tokens, self.split, self.batch_size = tokens, split, int(batch_size)
        self.row_index = np.asarray(row_index, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    @property
    def n_images(self) -> int:
        return int(len(self.row_index))

    @property
    def n_tokens(self) -> int:
        return self.tokens.n_tokens

    def read_images(self, positions: np.ndarray) -> np.ndarray:
        """(n,) entry positions -> (n, T, d) float32, in the order given."""
        rows = [int(self.row_index[p]) for p in np.asarray(positions, dtype=np.int64)]
        images = fetch_images(self.split, rows)
        preprocess = self.tokens.backbone.preprocess
        out = []
        heap = HeapWatch()  # a batch loop of forwards, like the stages': a drifting heap is trimmed
        for lo in range(0, len(rows), self.batch_size):
            batch = torch.stack([preprocess(images[r]) for r in rows[lo:lo + self.batch_size]])
            out.append(self.tokens(batch).cpu().numpy())
            del batch
            heap.check()
        d = self.tokens.backbone.d_model
        return np.concatenate(out) if out else np.zeros((0, self.n_tokens, d), np.float32)
