"""Rich console, progress display and error rendering for the CLI."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from conceptscope_cli.errors import CscopeError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class _RateColumn(TextColumn):
    """Units per second of the task, e.g. `312.4 images/s`."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # noqa: ANN001, ANN201 - Rich's column protocol
        from rich.text import Text

        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


class RichReporter:
    """`progress.Reporter` backed by one Rich progress display (one bar per task)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.current: TaskID | None = None

    def task(self, description: str, total: int | None, unit: str = "images") -> None:
        self._finish_current()
        self.current = self.progress.add_task(description, total=total, unit=unit)

    def advance(self, n: int) -> None:
        if self.current is not None:
            self.progress.advance(self.current, n)

    def log(self, message: str) -> None:
        self.progress.console.print(f"[yellow]{message}[/]")

    def _finish_current(self) -> None:
        if self.current is not None:
            task = self.progress.tasks[self.current]
            if task.total is None:
                self.progress.update(self.current, total=task.completed)
            self.current = None

    def close(self) -> None:
        self._finish_current()


@contextlib.contextmanager
def progress_reporter() -> Iterator[RichReporter]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    reporter = RichReporter(progress)
    with progress:
        try:
            yield reporter
        finally:
            reporter.close()


def render_error(error: CscopeError) -> None:
    err_console.print(f"[bold red]error:[/] {error.message}", soft_wrap=True)
    if error.hint:
        err_console.print(f"[dim]hint:[/] {error.hint}", soft_wrap=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
