"""Latent naming with a vision-language model behind an OpenAI-compatible endpoint.

ConceptScope names each valid latent by showing GPT-4o the latent's reference tile (its top
images masked by its activation map, in one row) and asking for the concept shared by the
visible regions. This module does the same against any chat-completions endpoint (OpenAI,
Azure-compatible proxies, vLLM, Ollama, ...):

- one request per latent, `concurrency` at a time;
- retries with exponential backoff and jitter on 429, 408, 5xx, connection errors and
  timeouts (a `Retry-After` header wins, capped); other 4xx fail at once, and 401/403/404
  (a bad key or model, the same for every latent) stop the run early;
- every answer is appended to a JSONL file as it arrives (flushed and fsynced by the main
  thread only), so an interrupted run resumes without paying twice. A stored answer is reused
  only while the tile bytes, the model and the prompt are unchanged;
- a latent whose request finally fails keeps `name=None` and the error: no made-up names.

The API key is read from the environment or the project's `.env` and is never written or
logged.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from conceptscope_cli.config.sections import OpenAINamerConfig
from conceptscope_cli.errors import CscopeError

SOURCE = "openai"
# 401/403/404 mean a bad key, no access or an unknown model: every other request would fail
# the same way, so the run stops instead of sending them.
_FATAL_STATUS = frozenset({401, 403, 404})
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class NameResult:
    """The outcome of naming one latent: a name, or None and the error."""

    latent: int
    name: str | None
    source: str = SOURCE
    model: str = ""
    error: str | None = None
    raw: str | None = None
    resumed: bool = False  # taken from the answers file of an earlier run


def failed(results: dict[int, NameResult]) -> list[NameResult]:
    """The latents left unnamed, by latent id."""
    return [results[k] for k in sorted(results) if results[k].name is None]


# --------------------------------------------------------------------------- API key


def resolve_api_key(config: OpenAINamerConfig, project_root: Path) -> str:
    """The API key from `$<api_key_env>`, else from `<project_root>/.env`; CscopeError if neither.

    Called before any work starts so that a missing key fails in a second, not after the
    SAE and the tiles.
    """
    env = config.api_key_env
    value = os.environ.get(env, "").strip()
    if value:
        return value
    dotenv = Path(project_root) / ".env"
    if dotenv.is_file():
        value = read_dotenv(dotenv).get(env, "").strip()
        if value:
            return value
    raise CscopeError(
        f"the openai namer needs an API key: {env} is not set and {dotenv} has no {env}= line",
        hint=f"export {env}=... or add `{env}=...` to {dotenv}; or use --namer clip (offline)",
    )


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a `.env` file: `#` comments, optional `export`, optional quotes."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
            continue
        value = value.strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.find(quote, 1)
            value = value[1:end] if end > 0 else value[1:]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()  # `KEY=v # comment`
        values[key] = value
    return values


# --------------------------------------------------------------------------- answers


def clean_answer(text: str | None, max_words: int = 4) -> str | None:
    """A model answer as a short lower-case name, or None when nothing usable is left.

    Keeps the first non-empty line, drops a `Concept:`-style prefix, markdown, quotes and
    punctuation (hyphens and apostrophes inside words stay: "t-shirt", "dog's").
    """
    if not text:
        return None
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(?:\W*(?:concept|answer|label)\W*:|(?:the\s+)?(?:shared\s+)?concept\s+is\b:?)\s*", "", line,
                  flags=re.IGNORECASE)
    line = line.lower().replace("_", " ")
    line = re.sub(r"[^\w'\-]+", " ", line)
    # Hyphens/apostrophes only survive between letters or digits.
    line = re.sub(r"(?<![^\W_])['\-]|['\-](?![^\W_])", " ", line)
    words = line.split()[:max(1, max_words)]
    return " ".join(words) or None


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def load_answers(answers_file: Path) -> dict[int, dict[str, Any]]:
    """The last stored record per latent; a line cut short by a kill is skipped."""
    records: dict[int, dict[str, Any]] = {}
    if not answers_file.is_file():
        return records
    with open(answers_file, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
                latent = int(record["latent"])
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(record, dict):
                records[latent] = record
    return records


class _AnswerLog:
    """Appends one JSON line per answer, durable before the next one is written.

    Only the thread that collects results writes, but a lock keeps it safe either way.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._handle = open(path, "a+b")  # noqa: SIM115 - closed in close()
        # A kill mid-write can leave a last line without its newline: start on a fresh line.
        if self._handle.tell() > 0:
            self._handle.seek(-1, os.SEEK_END)
            if self._handle.read(1) != b"\n":
                self._handle.write(b"\n")

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._handle.write(data)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


# --------------------------------------------------------------------------- requests


@dataclass
class _Outcome:
    latent: int
    name: str | None
    raw: str | None
    error: str | None
    attempts: int
    requested: bool = True  # False: skipped because the run was stopped


class _Pacer:
    """Shared 'not before' time: after a 429 every worker waits, not only the one that got it."""

    def __init__(self, stop: threading.Event) -> None:
        self._lock = threading.Lock()
        self._not_before = 0.0
        self._stop = stop

    def delay(self, seconds: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, time.monotonic() + seconds)

    def wait_turn(self) -> bool:
        """Sleep until requests may go out; False when the run was stopped meanwhile."""
        while not self._stop.is_set():
            with self._lock:
                remaining = self._not_before - time.monotonic()
            if remaining <= 0:
                return True
            self._stop.wait(remaining)
        return False


def _retry_after(exc: Exception) -> float | None:
    """Seconds asked for by `retry-after-ms` / `Retry-After` (seconds or an HTTP date)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


REDACTED = "[redacted]"
# Header values that carry credentials, wherever a server or proxy echoes them back.
_SECRET_PATTERNS = (
    re.compile(r"(?i)((?:authorization|proxy-authorization|x-api-key|api-key|openai-api-key)['\"]?\s*[:=]\s*['\"]?)"
               r"(?:(?:bearer|basic|token)\s+)?[^\s'\",;}]+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"()\bsk-[A-Za-z0-9_-]{8,}"),
)


def redact_secrets(text: str | None, secrets: tuple[str, ...] = ()) -> str | None:
    """`text` with the given secrets and any credential header value replaced by [redacted].

    Every error or answer text that is stored or printed passes through here: servers
    sometimes quote the request (Authorization header included) in their error message."""
    if text is None:
        return None
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def _error_text(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    text = f"HTTP {status}: {message}" if status is not None else f"{type(exc).__name__}: {message}"
    return text[:_MAX_ERROR_CHARS]


def _classify(exc: Exception) -> str:
    """'retry', 'fatal' (stop the run) or 'fail' (this latent only)."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return "retry"
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429 and getattr(exc, "code", None) == "insufficient_quota":
            return "fatal"  # out of credit: waiting does not help
        if status in (408, 429) or status >= 500:
            return "retry"
        if status in _FATAL_STATUS:
            return "fatal"
    return "fail"


def _user_message(prompt: str, png: bytes) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return [{
        "role": "user",
        "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": url}},
        ],
    }]


def _ask(client: Any, config: OpenAINamerConfig, latent: int, png: bytes, stop: threading.Event,
         pacer: _Pacer, fatal: list[str]) -> _Outcome:
    """One latent: request, retry on transient errors, clean the answer."""
    messages = _user_message(config.prompt, png)
    attempt = 0
    while True:
        if not pacer.wait_turn():
            return _Outcome(latent, None, None, f"not requested: {fatal[0] if fatal else 'run stopped'}", attempt, False)
        attempt += 1
        try:
            response = client.chat.completions.create(model=config.model, messages=messages, max_tokens=config.max_tokens)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this latent's error
            kind = _classify(exc)
            error = _error_text(exc)
            if kind == "fatal":
                fatal.append(error)
                stop.set()
            if kind != "retry" or attempt > config.max_retries:
                return _Outcome(latent, None, None, error, attempt)
            asked = _retry_after(exc)
            if asked is not None:
                wait_s = min(asked, config.backoff_max_s)
            else:  # exponential backoff with jitter, so workers do not retry in lockstep
                wait_s = min(config.backoff_base_s * 2 ** (attempt - 1), config.backoff_max_s) * random.uniform(0.5, 1.0)
            if getattr(exc, "status_code", None) == 429:
                pacer.delay(wait_s)
            if stop.wait(wait_s):
                return _Outcome(latent, None, None, error, attempt)
            continue
        choice = response.choices[0] if response.choices else None
        message = choice.message if choice is not None else None
        raw = message.content if message is not None else None
        name = clean_answer(raw, config.max_words)
        if name is not None:
            return _Outcome(latent, name, raw, None, attempt)
        refusal = getattr(message, "refusal", None)
        reason = f"refused: {refusal}" if refusal else f"empty answer (finish_reason={getattr(choice, 'finish_reason', None)})"
        return _Outcome(latent, None, raw, reason[:_MAX_ERROR_CHARS], attempt)


def _make_client(config: OpenAINamerConfig, api_key: str) -> Any:
    try:
        import openai
    except ImportError:
        raise CscopeError(
            "the openai namer needs the openai package",
            hint="pip install 'conceptscope-cli[openai]' (or pip install openai); or use --namer clip",
        ) from None
    # Retries are ours (backoff shared across workers, Retry-After capped, answers logged).
    return openai.OpenAI(api_key=api_key, base_url=config.base_url, max_retries=0, timeout=config.timeout_s)


def name_latents_openai(
    tiles: dict[int, Path],
    config: OpenAINamerConfig,
    api_key: str,
    answers_file: Path,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> dict[int, NameResult]:
    """Name every latent of `tiles` (latent → reference tile PNG) by the configured model.

    Latents answered successfully in `answers_file` for the same tile bytes, model and prompt
    are not requested again. Every new answer (success or final failure) is appended there
    as it arrives. `on_progress(n)` is called from the calling thread with the number of
    latents just finished (resumed ones included). Returns a result for every latent of
    `tiles`; failed ones have `name=None` and `error` set.
    """
    progress = on_progress or (lambda _n: None)
    prompt_sha = _sha256(config.prompt)
    stored = load_answers(answers_file)
    results: dict[int, NameResult] = {}
    todo: dict[int, tuple[bytes, str]] = {}
    for latent in sorted(tiles):
        png = Path(tiles[latent]).read_bytes()
        tile_sha = _sha256(png)
        record = stored.get(int(latent))
        if (record and record.get("name") and record.get("tile_sha256") == tile_sha
                and record.get("model") == config.model and record.get("prompt_sha256") == prompt_sha):
            results[int(latent)] = NameResult(int(latent), record["name"], SOURCE, config.model, None,
                                              record.get("raw"), resumed=True)
        else:
            todo[int(latent)] = (png, tile_sha)
    if results:
        progress(len(results))
    if not todo:
        return results

    client = _make_client(config, api_key)
    stop = threading.Event()
    pacer = _Pacer(stop)
    fatal: list[str] = []
    log = _AnswerLog(answers_file)
    executor = ThreadPoolExecutor(max_workers=max(1, config.concurrency), thread_name_prefix="cscope-openai")
    clean_exit = False
    try:
        pending: set[Future[_Outcome]] = {
            executor.submit(_ask, client, config, latent, png, stop, pacer, fatal) for latent, (png, _) in todo.items()
        }
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                outcome = future.result()
                outcome.error = redact_secrets(outcome.error, (api_key,))
                outcome.raw = redact_secrets(outcome.raw, (api_key,))
                outcome.name = redact_secrets(outcome.name, (api_key,))
                if outcome.requested:  # only real answers are worth keeping for a resume
                    log.append({
                        "latent": outcome.latent,
                        "name": outcome.name,
                        "raw": outcome.raw,
                        "error": outcome.error,
                        "model": config.model,
                        "attempts": outcome.attempts,
                        "tile_sha256": todo[outcome.latent][1],
                        "prompt_sha256": prompt_sha,
                        "time": round(time.time(), 3),
                    })
                results[outcome.latent] = NameResult(outcome.latent, outcome.name, SOURCE, config.model,
                                                     outcome.error, outcome.raw)
                progress(1)
        clean_exit = True
    finally:
        if not clean_exit:  # Ctrl-C or a bug: wake sleeping workers, drop queued requests
            stop.set()
        executor.shutdown(wait=clean_exit, cancel_futures=True)
        log.close()
        client.close()
    return {k: results[k] for k in sorted(results)}
