"""A small progress protocol so that the science never imports Rich.

Stages report through a `Reporter`; the CLI passes one backed by a Rich progress
display, tests and library users get `NullReporter`.
"""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def task(self, description: str, total: int | None, unit: str = "images") -> None:
        """Start a new bar (finishing the previous one)."""

    def advance(self, n: int) -> None:
        """Record `n` more units done on the current bar."""

    def log(self, message: str) -> None:
        """A line of information printed above the bars."""


class NullReporter:
    def task(self, description: str, total: int | None, unit: str = "images") -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def log(self, message: str) -> None:
        pass
