"""What every `cscope` command shares: -q / -v / --json, Ctrl-C handling, and exit codes.

`command(group)` registers a function as a command and adds the three output options to
it; the function may return a dict, which `--json` prints as the command's summary.
`run(app)` is the console-script entry point: it maps each outcome to an exit code
(errors.py) whatever click typer bundles, because it never needs click's classes: usage
errors are handled by typer itself (standalone mode: usage message, exit 2), ours and
Python's propagate out of it.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
from typing import Annotated, Any, Callable

import typer

from conceptscope_cli.cli import ui
from conceptscope_cli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, CommandInterruptedError, CscopeError, disk_error

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors: no progress, no result lines.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Also show details: resolved project, every progress update.")]
JsonOutput = Annotated[bool, typer.Option(
    "--json", help="Print a JSON summary of what the command did and where its outputs are on stdout "
                   "(human output goes to stderr).")]

_OUTPUT_PARAMETERS = [
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Quiet),
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Verbose),
    inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOutput),
]


# Run after every command that succeeded; each returns keys for the --json summary and may raise.
after_each: list[Callable[[], dict[str, Any]]] = []


def _on_sigint(signum: int, frame: Any) -> None:  # noqa: ANN401 - signal handler protocol
    ui.interrupt.requested = True  # the progress reporters raise again if this raise is swallowed
    raise KeyboardInterrupt


def with_output_options(function: Callable[..., Any], path: str) -> Callable[..., Any]:
    """`function` with -q/-v/--json added to its signature (typer reads `__signature__`)."""
    signature = inspect.signature(function, eval_str=True)

    @functools.wraps(function)
    def wrapper(*args: Any, quiet: bool = False, verbose: bool = False, json_output: bool = False,
                **kwargs: Any) -> Any:
        ui.configure(path, quiet=quiet, verbose=verbose, json_output=json_output)
        try:
            summary = function(*args, **kwargs)
        except KeyboardInterrupt:
            raise CommandInterruptedError(ui.interruption_message(path)) from None
        except CscopeError:
            raise
        except Exception as error:
            if ui.interrupt.requested:  # e.g. a DataLoader worker killed by the same Ctrl-C
                raise CommandInterruptedError(ui.interruption_message(path)) from error
            raise
        summary = dict(summary or {})
        for hook in after_each:  # e.g. result warnings, which --strict turns into a failure
            summary.update(hook())
        if json_output:
            ui.emit_json({"command": path, "ok": True, "exit_code": 0, **summary})
        return None

    parameters = list(signature.parameters.values()) + _OUTPUT_PARAMETERS
    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    del wrapper.__wrapped__  # typer must see the new signature, not the original one
    return wrapper


def command(group: typer.Typer, name: str | None = None, *, prefix: str = "") -> Callable[[Callable[..., Any]], Any]:
    """`@group.command(name)` with the shared output options."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        command_name = name or function.__name__.replace("_", "-")
        group.command(command_name)(with_output_options(function, f"{prefix}{command_name}"))
        return function

    return register


def _fail(error: CscopeError) -> None:
    ui.render_error(error)
    if ui.output.json:
        ui.emit_json({"command": ui.output.command, "ok": False, "exit_code": error.exit_code,
                      "error": error.message, "hint": error.hint})
    sys.exit(error.exit_code)


def run(app: typer.Typer, *, debug: Callable[[], bool], before: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None) -> None:
    """Run the app and exit with the code errors.py documents."""
    from conceptscope_cli import numerics
    from conceptscope_cli.heap import fix_mmap_threshold, threshold_from_env

    try:  # first: numpy and torch read their code-path variables once, when they load (numerics.py)
        numerics.apply()
    except CscopeError as error:
        _fail(error)
    try:
        threshold = threshold_from_env()
    except ValueError as error:
        ui.err_console.print(f"[bold red]error:[/] {ui.escape(str(error))}")
        sys.exit(2)
    if threshold is not None:  # opt-in, before any tensor exists: flatter peaks for some speed (heap.py)
        fix_mmap_threshold(threshold)
    ui.interrupt.requested = False
    previous = signal.signal(signal.SIGINT, _on_sigint) if signal.getsignal(signal.SIGINT) is signal.default_int_handler else None
    try:
        if before is not None:
            before()
        # Standalone mode: typer prints usage errors with the usage line and exits 2, and
        # handles --help, --version and completion; everything else propagates to us.
        app(prog_name="cscope", standalone_mode=True)
    except CscopeError as error:
        if debug():
            raise
        _fail(error)
    except KeyboardInterrupt:  # before or after a command ran (while importing, parsing)
        ui.err_console.print("[yellow]interrupted[/]: completed work is kept; run the same command again to resume")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:
        converted = disk_error(error)  # a full disk or read-only folder is the machine's fault, not a bug
        if converted is not None and not debug():
            _fail(converted)
        if debug() or os.environ.get("CSCOPE_DEBUG"):
            raise
        ui.err_console.print(f"[bold red]internal error:[/] {type(error).__name__}: {ui.escape(str(error))}")
        ui.err_console.print("[dim]this is a bug in cscope; rerun with --debug for the traceback and report it[/]")
        if ui.output.json:
            ui.emit_json({"command": ui.output.command, "ok": False, "exit_code": EXIT_INTERNAL,
                          "error": f"{type(error).__name__}: {error}"})
        sys.exit(EXIT_INTERNAL)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if after is not None:
            after()
