"""User-facing errors.

Everything a user can get wrong (a manifest key, a missing artifact, a bad flag) raises a
`CscopeError`. The CLI prints its message and hint and exits non-zero without a traceback;
`--debug` shows the traceback too. Bugs stay ordinary exceptions.
"""

from __future__ import annotations

import errno
import re


class CscopeError(Exception):
    """An error caused by the user's input or environment, with an optional hint."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ManifestError(CscopeError):
    """A problem in `cscope.toml`: names the key, the section and the line."""

    exit_code = 2

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
    """An upstream stage's output is missing: the hint names the command that makes it."""

    exit_code = 3


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
