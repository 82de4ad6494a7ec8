"""Capture the residual stream after one ViT block and stop the forward pass there.

A forward hook on block L stores its output and raises `_StopForward`, so later
blocks, `ln_post`, the projection and the text tower never run. Hooks work for any
open_clip VisionTransformer whatever its internals; the only layout difference is
whether the transformer runs batch-first (open_clip >= 2.24) or sequence-first (older
checkpoints), which we normalise to (batch, tokens, d).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from conceptscope_cli.backbone.types import VisualTower


class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the capture hook once block L has produced its output."""


def _batch_first(visual: VisualTower) -> bool:
    return bool(getattr(visual.transformer, "batch_first", True))


class ResidualCapture:
    """Callable that maps preprocessed images (B, 3, H, W) to block-L activations (B, T, d)."""

    def __init__(self, visual: VisualTower, layer: int) -> None:
        self.visual = visual
        self.layer = layer
        self.block = visual.transformer.resblocks[layer]
        self._captured: torch.Tensor | None = None

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._captured = output if _batch_first(self.visual) else output.transpose(0, 1)
        raise _StopForward

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        handle = self.block.register_forward_hook(self._hook)
        self._captured = None
        try:
            context = (
                torch.autocast(device_type=images.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with context:
                self.visual(images)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if self._captured is None:  # the hook never ran: the block is not on the forward path
            raise RuntimeError(f"block {self.layer} was not reached by the visual forward pass")
        out, self._captured = self._captured, None
        return out


@contextlib.contextmanager
def recording(visual: VisualTower, layer: int,
              keep: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> Iterator[list[torch.Tensor]]:
    """Record `keep(block L's output (B, T, d))` for every forward run inside the block, without
    stopping them: a stage that runs the whole model anyway gets block L's tokens for free."""
    outputs: list[torch.Tensor] = []
    batch_first = _batch_first(visual)

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        outputs.append(keep(output if batch_first else output.transpose(0, 1)))

    handle = visual.transformer.resblocks[layer].register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def select_tokens(n_tokens: int, selection: str) -> torch.Tensor:
    """Token positions kept by a selection: all, cls (position 0) or patches (1..T-1)."""
    if selection == "all":
        return torch.arange(n_tokens)
    if selection == "cls":
        return torch.tensor([0])
    if selection == "patches":
        return torch.arange(1, n_tokens)
    raise ValueError(f"unknown token selection {selection!r}")
