"""Consoles, output modes (-q / -v / --json), progress display and error rendering.

Human output goes to `console` (stdout) and progress, warnings and errors to `err_console`
(stderr). With `--json` the human output moves to stderr, so that stdout carries exactly one
JSON object. When stderr is not a terminal (a log file, CI, a pipe), progress is plain
lines instead of bars, and no line is wrapped, so a path is never cut in two.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, TextIO

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from conceptscope_cli.errors import CommandInterruptedError, CscopeError

# Wide enough that no path is wrapped when output goes to a file or a pipe (Rich would
# otherwise assume 80 columns); a terminal keeps its own width.
_LOG_WIDTH = 1000
# Plain progress prints at most one line per bar this often (seconds); -v prints every update.
PLAIN_INTERVAL = 5.0


def _console(stream: TextIO, *, stderr: bool) -> Console:
    terminal = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=None if terminal else _LOG_WIDTH)


console = _console(sys.stdout, stderr=False)
err_console = _console(sys.stderr, stderr=True)


@dataclass
class OutputMode:
    """What the user asked to see; set once per command by `configure`."""

    quiet: bool = False
    verbose: bool = False
    json: bool = False
    command: str | None = None


output = OutputMode()


def configure(command: str, *, quiet: bool, verbose: bool, json_output: bool) -> None:
    output.command, output.quiet, output.verbose, output.json = command, quiet, verbose, json_output
    if json_output:  # stdout is reserved for the JSON summary
        console.file = sys.stderr
    if quiet:
        console.quiet = True


def verbose(message: str) -> None:
    """A detail line shown only with -v (to stderr, so it never mixes with results)."""
    if output.verbose and not output.quiet:
        err_console.print(f"[dim]{escape(message)}[/]")


def warn(message: str) -> None:
    """A warning: shown even with -q."""
    err_console.print(f"[yellow]warning:[/] {escape(message)}")


def emit_json(payload: dict[str, Any]) -> None:
    """The machine-readable summary: one JSON object on the real stdout."""
    sys.stdout.write(json.dumps(payload, default=str, sort_keys=False) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- progress


@dataclass
class TaskState:
    description: str
    total: int | None
    unit: str
    completed: int = 0
    started: float = 0.0


# The bar in progress, whichever reporter runs it: an interruption names it.
_current: list[TaskState] = []


def current_task() -> TaskState | None:
    return _current[-1] if _current else None


def _rate_eta(task: TaskState, now: float) -> tuple[float | None, float | None]:
    """Average rate since the bar started and the time left at that rate.

    An average over the whole bar, not Rich's 30-second window: training updates can be
    minutes apart, and a windowed estimate then never shows an ETA."""
    elapsed = now - task.started
    if task.completed <= 0 or elapsed <= 0:
        return None, None
    rate = task.completed / elapsed
    remaining = (task.total - task.completed) / rate if task.total is not None else None
    return rate, remaining


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_rate(per_second: float, unit: str) -> str:
    """A rate in the largest time unit that makes it at least 1 ("5,120.0 tokens/s", "1.8
    classes/min", "0.5 classes/h" at the slowest): a slow stage never shows "0.0 classes/s"."""
    for scale, suffix in ((1.0, "s"), (60.0, "min")):
        if per_second * scale >= 0.95:
            return f"{per_second * scale:,.1f} {unit}/{suffix}"
    return f"{per_second * 3600.0:,.1f} {unit}/h"


class _Interrupt:
    """Set by the SIGINT handler (command.py). Python raises the handler's KeyboardInterrupt in
    whatever code runs when the signal arrives; in a finaliser (a generator or object collected
    mid-step) it is printed as "Exception ignored" and lost, and the command would run on. Every
    progress update raises it again, so Ctrl-C stops the command within one update."""

    requested = False


interrupt = _Interrupt()


class _Tracking:
    """Keeps the state of the current bar (for the interruption message and plain lines)."""

    task_state: TaskState | None = None

    def task(self, description: str, total: int | None, unit: str = "images") -> None:
        self._finish_current()
        self.task_state = TaskState(description, total, unit, started=time.monotonic())
        _current[:] = [self.task_state]

    def advance(self, n: int) -> None:
        if interrupt.requested:
            raise KeyboardInterrupt
        if self.task_state is not None:
            self.task_state.completed += n

    def log(self, message: str) -> None:
        if not output.quiet:
            err_console.print(f"[yellow]{escape(message)}[/]")

    def _finish_current(self) -> None:
        pass

    def close(self, *, failed: bool = False) -> None:
        """End the display; after a failure (Ctrl-C) the bar stays current, for the message."""
        self._finish_current()
        if not failed:
            _current.clear()


class QuietReporter(_Tracking):
    """-q, or torchrun ranks other than 0: no progress at all."""

    def log(self, message: str) -> None:
        pass


class PlainReporter(_Tracking):
    """Progress as plain lines (stderr is not a terminal): a line when a bar starts, at most
    one every PLAIN_INTERVAL seconds while it runs (every update with -v), and one when it ends."""

    def __init__(self, stream: Console, interval: float = PLAIN_INTERVAL) -> None:
        self.stream = stream
        self.interval = interval
        self.last_line = 0.0

    def task(self, description: str, total: int | None, unit: str = "images") -> None:
        super().task(description, total, unit)
        self.last_line = time.monotonic()
        size = f" ({total:,} {unit})" if total is not None else ""
        self.stream.print(f"{escape(description)}: started{size}")

    def advance(self, n: int) -> None:
        super().advance(n)
        now = time.monotonic()
        if output.verbose or now - self.last_line >= self.interval:
            self.last_line = now
            self.stream.print(self._line(now))

    def _line(self, now: float, done: bool = False) -> str:
        task = self.task_state
        assert task is not None
        rate, remaining = _rate_eta(task, now)
        of = f"/{task.total:,}" if task.total is not None else ""
        pct = f" ({100 * task.completed / task.total:.0f}%)" if task.total else ""
        speed = f", {format_rate(rate, task.unit)}" if rate else ""
        tail = f", {format_duration(now - task.started)} elapsed" if done else f", eta {format_duration(remaining)}"
        return f"{escape(task.description)}: {task.completed:,}{of} {task.unit}{pct}{speed}{tail}"

    def _finish_current(self) -> None:
        if self.task_state is not None:
            self.stream.print(self._line(time.monotonic(), done=True))
            self.task_state = None


class _RateColumn(ProgressColumn):
    """Units per second, averaged since the bar started (e.g. `5,120.0 tokens/s`)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        elapsed = task.finished_time if task.finished else task.elapsed
        speed = task.completed / elapsed if elapsed and task.completed else None
        return Text(format_rate(speed, unit) if speed else f"- {unit}/s", style="cyan")


class _EtaColumn(ProgressColumn):
    """Time left at the average rate since the bar started (see `_rate_eta`)."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("")
        elapsed = task.elapsed
        if not (elapsed and task.completed and task.total is not None):
            return Text("eta -:--:--", style="dim")
        remaining = (task.total - task.completed) * elapsed / task.completed
        return Text(f"eta {format_duration(remaining)}", style="green")


class RichReporter(_Tracking):
    """`progress.Reporter` backed by one Rich progress display (one bar per task)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.current: TaskID | None = None

    def task(self, description: str, total: int | None, unit: str = "images") -> None:
        super().task(description, total, unit)
        self.current = self.progress.add_task(escape(description), total=total, unit=unit)

    def advance(self, n: int) -> None:
        super().advance(n)
        if self.current is not None:
            self.progress.advance(self.current, n)

    def log(self, message: str) -> None:
        if not output.quiet:
            self.progress.console.print(f"[yellow]{escape(message)}[/]")

    def _finish_current(self) -> None:
        if self.current is not None:
            task = self.progress.tasks[self.current]
            if task.total is None:
                self.progress.update(self.current, total=task.completed)
            self.current = None


class MetricsTable:
    """The latest training metrics: a live table under the bars, or a plain line per update."""

    COLUMNS = ("step", "tokens_per_s", "loss", "mse", "fvu", "l0", "dead_fraction", "dense_fraction", "lr")

    def __init__(self, plain: Console | None = None, interval: float = PLAIN_INTERVAL) -> None:
        self.latest: dict[str, float] = {}
        self.plain = plain
        self.interval = interval
        self.last_line = 0.0

    def update(self, row: dict) -> None:
        self.latest = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        now = time.monotonic()
        if self.plain is not None and (output.verbose or now - self.last_line >= self.interval):
            self.last_line = now
            shown = [c for c in self.COLUMNS if c in self.latest]
            self.plain.print("metrics: " + ", ".join(f"{c} {_fmt(self.latest[c])}" for c in shown))

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


def plain_progress() -> bool:
    """Progress as lines instead of bars: stderr is not a terminal."""
    return not err_console.is_terminal


def metrics_table() -> MetricsTable:
    return MetricsTable(plain=err_console if plain_progress() and not (output.quiet or console.quiet) else None)


@contextlib.contextmanager
def progress_reporter(extra: RenderableType | None = None) -> Iterator[_Tracking]:
    """The reporter for this command's output mode: bars, plain lines or nothing."""
    if output.quiet or console.quiet:  # console.quiet: torchrun ranks other than 0 stay silent
        reporter: _Tracking = QuietReporter()
    elif plain_progress():
        reporter = PlainReporter(err_console)
    else:
        yield from _rich_progress(extra)
        return
    try:
        yield reporter
    except BaseException:
        reporter.close(failed=True)
        raise
    reporter.close()


def _rich_progress(extra: RenderableType | None) -> Iterator[_Tracking]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        _EtaColumn(),
        console=err_console,
        transient=False,
    )
    reporter = RichReporter(progress)
    from rich.console import Group
    from rich.live import Live

    display = progress if extra is None else Live(Group(progress, extra), console=err_console, refresh_per_second=4)
    with display:
        try:
            yield reporter
        except BaseException:
            reporter.close(failed=True)
            raise
        reporter.close()


def interruption_message(command: str) -> str:
    """One line: what was interrupted, and that a re-run resumes."""
    task = current_task()
    where = ""
    if task is not None and task.total is not None and task.completed >= task.total:
        where = f" after {task.description} finished"
    elif task is not None:
        of = f"/{task.total:,}" if task.total is not None else ""
        where = f" during {task.description} ({task.completed:,}{of} {task.unit})"
    return (f"`cscope {command}` stopped{where}; completed work is kept, "
            f"run `cscope {command}` again to resume")


def render_error(error: CscopeError) -> None:
    # Messages quote manifest sections like [backbone]: escape them, or Rich eats them as markup.
    rank = f"(rank {os.environ['RANK']}) " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""
    label = "[yellow]interrupted:[/]" if isinstance(error, CommandInterruptedError) else "[bold red]error:[/]"
    err_console.print(f"{label} {rank}{escape(error.message)}")
    if error.hint:
        err_console.print(f"[dim]hint:[/] {escape(error.hint)}")

