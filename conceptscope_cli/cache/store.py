"""The shared, content-addressed cache.

An entry lives at `<root>/<kind>/<key>/`, where `key` hashes everything that determines
its content. It is built in `<key>.partial/` (kept across interruptions so work can
resume), and becomes visible by one atomic `rename` after `record.json` is written:
an entry directory that exists is complete. A lock file serialises writers of the same
key across processes; a second writer waits, then finds the entry done and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import conceptscope_cli
from conceptscope_cli import numerics
from conceptscope_cli.errors import CscopeError

RECORD_NAME = "record.json"


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def content_key(inputs: dict[str, Any]) -> str:
    """Hash of an entry's inputs plus the on-disk format version (20 hex characters). Under
    CSCOPE_NUMERICS=portable the mode is hashed too, so portable results never reuse entries
    computed with the CPU's own code paths (native keys are unchanged)."""
    extra = {"numerics": "portable"} if numerics.mode_of() == "portable" else {}
    payload = canonical_json({"inputs": inputs, "format_version": conceptscope_cli.FORMAT_VERSION, **extra})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def software_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes cached content."""
    versions = {"cscope": conceptscope_cli.__version__, "python": platform.python_version()}
    for module in ("torch", "open_clip", "datasets", "h5py", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is simply not recorded
            continue
    return versions


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class CacheEntry:
    """A complete cache entry."""

    kind: str
    key: str
    path: Path

    @property
    def record(self) -> dict[str, Any]:
        return json.loads((self.path / RECORD_NAME).read_text())


@dataclass
class PendingEntry:
    """An entry being built; `path` is its private partial directory."""

    kind: str
    key: str
    path: Path
    inputs: dict[str, Any]
    started: float


class CacheStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---------------------------------------------------------------- lookup
    def entry_path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lookup(self, kind: str, key: str) -> CacheEntry | None:
        path = self.entry_path(kind, key)
        if (path / RECORD_NAME).is_file():
            return CacheEntry(kind, key, path)
        return None

    def entries(self) -> list[CacheEntry]:
        out: list[CacheEntry] = []
        if not self.root.is_dir():
            return out
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for entry in sorted(kind_dir.iterdir()):
                if entry.is_dir() and (entry / RECORD_NAME).is_file():
                    out.append(CacheEntry(kind_dir.name, entry.name, entry))
        return out

    def partials(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("*/*.partial"))

    # ---------------------------------------------------------------- writing
    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Exclusive, process-wide lock on one key (released by the OS if we die)."""
        with self._locked(kind, key, wait=True) as held:
            assert held
            yield

    @contextlib.contextmanager
    def try_lock(self, kind: str, key: str) -> Iterator[bool]:
        """The lock of one key if nobody holds it (yields True), else yields False at once."""
        with self._locked(kind, key, wait=False) as held:
            yield held

    @contextlib.contextmanager
    def _locked(self, kind: str, key: str, *, wait: bool) -> Iterator[bool]:
        kind_dir = self.root / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        lock_path = kind_dir / f"{key}.lock"
        while True:
            handle = open(lock_path, "a+")  # noqa: SIM115 - held past this block, closed below
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                yield False
                return
            # `remove` unlinks lock files while holding them: a lock taken on an unlinked
            # file guards nothing, so take it again on the file now at that path.
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def begin(self, kind: str, key: str, inputs: dict[str, Any]) -> PendingEntry:
        """Open (or reopen, to resume) the partial directory of an entry. Hold `lock` around it."""
        partial = self.root / kind / f"{key}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        inputs_file = partial / "inputs.json"
        if inputs_file.exists():
            stored = json.loads(inputs_file.read_text())
            if canonical_json(stored) != canonical_json(inputs):
                # Same key but different inputs means a hash collision or a tampered folder: start over.
                shutil.rmtree(partial)
                partial.mkdir(parents=True)
        if not inputs_file.exists():
            write_json_atomic(inputs_file, inputs)
        started = inputs_file.stat().st_mtime
        return PendingEntry(kind, key, partial, inputs, started)

    def commit(self, pending: PendingEntry, *, summary: dict[str, Any], stats: dict[str, Any]) -> CacheEntry:
        """Write `record.json` and make the entry visible atomically."""
        final = self.entry_path(pending.kind, pending.key)
        if not (pending.path / "inputs.json").is_file():
            # Someone removed the partial folder under us: what is left (if anything) is not the entry.
            raise CscopeError(f"the partial cache entry {pending.kind}/{pending.key} was removed while it was "
                              "being built; nothing was committed", hint="run the same command again")
        (pending.path / "inputs.json").unlink()
        record = {
            "kind": pending.kind,
            "key": pending.key,
            "format_version": conceptscope_cli.FORMAT_VERSION,
            "summary": summary,
            "inputs": pending.inputs,
            "stats": stats,
            "versions": software_versions(),
            "started": _iso(pending.started),
            "finished": _iso(time.time()),
            "size_bytes": directory_size(pending.path),
        }
        write_json_atomic(pending.path / RECORD_NAME, record)
        _fsync_dir(pending.path)
        if final.exists():  # a stale incomplete folder (no record) left by an old version
            shutil.rmtree(final)
        os.rename(pending.path, final)
        _fsync_dir(final.parent)
        return CacheEntry(pending.kind, pending.key, final)

    # ---------------------------------------------------------------- removal
    def remove(self, entry: CacheEntry) -> int | None:
        """Delete a complete entry; None (and nothing deleted) when a process holds its lock."""
        with self.try_lock(entry.kind, entry.key) as held:
            if not held:
                return None
            size = directory_size(entry.path)
            shutil.rmtree(entry.path)
            (self.root / entry.kind / f"{entry.key}.lock").unlink(missing_ok=True)
        return size

    def remove_partial(self, folder: Path) -> int | None:
        """Delete an incomplete entry; None (and nothing deleted) while a live process builds it.

        The builder holds the entry's lock for as long as it writes into the partial folder,
        so a lock we can take means the folder belongs to an interrupted run."""
        kind, key = folder.parent.name, folder.name.removesuffix(".partial")
        with self.try_lock(kind, key) as held:
            if not held:
                return None
            size = directory_size(folder) if folder.exists() else 0
            shutil.rmtree(folder, ignore_errors=True)
            (self.root / kind / f"{key}.lock").unlink(missing_ok=True)
        return size

    def find(self, prefix: str) -> list[CacheEntry]:
        """Entries whose key (or kind/key) starts with `prefix`."""
        return [e for e in self.entries() if e.key.startswith(prefix) or f"{e.kind}/{e.key}".startswith(prefix)]


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_cache_root(project_root: Path, configured: str | None) -> Path:
    """CSCOPE_CACHE wins over the manifest, which wins over <project>/.cscope/cache."""
    env = os.environ.get("CSCOPE_CACHE")
    if env:
        root, origin = Path(env).expanduser().resolve(), "the CSCOPE_CACHE environment variable"
    elif configured:
        path = Path(configured).expanduser()
        root, origin = (path if path.is_absolute() else project_root / path).resolve(), "[project] cache_dir"
    else:
        root, origin = (project_root / ".cscope" / "cache").resolve(), "the default cache folder"
    if root.exists() and not root.is_dir():
        raise CscopeError(f"the cache {root} (from {origin}) is not a directory",
                          hint="point CSCOPE_CACHE / [project] cache_dir at a folder (it is created when missing)")
    return root


