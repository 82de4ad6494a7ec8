"""Rich console, progress display and error rendering for the CLI."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console, RenderableType
from rich.markup import escape
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

    def render(self, task):  # noqa: ANN001, ANN202 - Rich's column protocol
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
        if self.progress.disable:
            return
        self.progress.console.print(f"[yellow]{escape(message)}[/]")

    def _finish_current(self) -> None:
        if self.current is not None:
            task = self.progress.tasks[self.current]
            if task.total is None:
                self.progress.update(self.current, total=task.completed)
            self.current = None

    def close(self) -> None:
        self._finish_current()


class MetricsTable:
    """A live table of the latest training metrics, rendered under the progress bars."""

    COLUMNS = ("step", "loss", "mse", "fvu", "l0", "dead_fraction", "dense_fraction", "lr")

    def __init__(self) -> None:
        self.latest: dict[str, float] = {}

    def update(self, row: dict) -> None:
        self.latest = {k: v for k, v in row.items() if isinstance(v, (int, float))}

    def __rich__(self):  # noqa: ANN204 - Rich renderable protocol
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        shown = [c for c in self.COLUMNS if c in self.latest] or ["step"]
        for column in shown:
            table.add_column(column, justify="right")
        table.add_row(*[_fmt(self.latest.get(c)) for c in shown])
        return table


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


@contextlib.contextmanager
def progress_reporter(extra: RenderableType | None = None) -> Iterator[RichReporter]:
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
        disable=console.quiet,  # torchrun ranks other than 0 stay silent
    )
    reporter = RichReporter(progress)
    if extra is None or console.quiet:
        with progress:
            try:
                yield reporter
            finally:
                reporter.close()
        return
    from rich.console import Group
    from rich.live import Live

    with Live(Group(progress, extra), console=err_console, refresh_per_second=4):
        try:
            yield reporter
        finally:
            reporter.close()


def render_error(error: CscopeError) -> None:
    # Messages quote manifest sections like [backbone]: escape them, or Rich eats them as markup.
    import os

    rank = f"(rank {os.environ['RANK']}) " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""
    err_console.print(f"[bold red]error:[/] {rank}{escape(error.message)}", soft_wrap=True)
    if error.hint:
        err_console.print(f"[dim]hint:[/] {escape(error.hint)}", soft_wrap=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
