"""User-facing errors and the exit codes a shell sees.

Everything a user can get wrong (a manifest key, a missing artifact, a bad flag) raises a
`CscopeError`. The CLI prints its message and hint and exits with the class's code without
a traceback; `--debug` shows the traceback too. Bugs stay ordinary exceptions (exit 70).

Exit codes: 0 success, 1 user error, 2 usage or manifest error (click's usage errors too),
3 missing upstream artifact, 70 internal error (a bug), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import errno
import re

EXIT_OK = 0
EXIT_USER = 1
EXIT_USAGE = 2
EXIT_MISSING_ARTIFACT = 3
EXIT_INTERNAL = 70  # EX_SOFTWARE in sysexits.h
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class CscopeError(Exception):
    """An error caused by the user's input or environment, with an optional hint."""

    exit_code: int = EXIT_USER

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(CscopeError):
    """A flag's value makes no sense (click's own usage errors exit 2 the same way)."""

    exit_code = EXIT_USAGE


class ManifestError(CscopeError):
    """A problem in `cscope.toml`: names the key, the section and the line."""

    exit_code = EXIT_USAGE

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message, hint=hint)
        self.path = path
        self.line = line


class MissingArtifactError(CscopeError):
    """An artifact another command makes is missing: the hint names that command."""

    exit_code = EXIT_MISSING_ARTIFACT

    def __init__(self, message: str, *, command: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or (f"run `{command}` first" if command else None))
        self.command = command


class CommandInterruptedError(CscopeError):
    """The user pressed Ctrl-C (SIGINT): what was running, and that a re-run resumes."""

    exit_code = EXIT_INTERRUPTED


# Errors of the machine, not of cscope: a full disk, a read-only or forbidden folder.
_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
}


def disk_error(error: BaseException) -> CscopeError | None:
    """A user-facing error for a failed write (full disk, read-only folder...), else None.

    h5py raises OSError or RuntimeError without `errno` but quotes it in the message
    ("errno = 28"), so the message is searched too."""
    if not isinstance(error, (OSError, RuntimeError)):
        return None
    code = error.errno if isinstance(error, OSError) else None
    text = str(error)
    if code not in _DISK_ERRNOS:
        match = re.search(r"errno = (\d+)", text)
        code = int(match.group(1)) if match else None
    if code not in _DISK_ERRNOS:
        return None
    name = error.filename if isinstance(error, OSError) else None
    if name is None:
        match = re.search(r"name = '([^']+)'", text)
        name = match.group(1) if match else None
    where = f" writing {name}" if name else ""
    return CscopeError(f"{_DISK_ERRNOS[code]}{where}; nothing was marked complete",
                       hint="free space or fix the permissions (or point CSCOPE_CACHE / [project] outputs_dir "
                            "elsewhere), then run the same command again to resume")
