"""User-facing errors.

Everything a user can get wrong (a manifest key, a missing artifact, a bad flag) raises a
`CscopeError`. The CLI prints its message and hint and exits non-zero without a traceback;
`--debug` shows the traceback too. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


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
