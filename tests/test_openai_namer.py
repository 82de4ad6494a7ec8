"""The openai namer against a local chat-completions server (127.0.0.1 only, no network).

The server recognises each latent by the PNG bytes inside the request's data URL, so it can
script per-latent failures (429, 5xx, 400, dropped connections, slow answers) and count how
often each latent was requested.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

pytest.importorskip("openai")

from conceptscope_cli.config.sections import DEFAULT_PROMPT, OpenAINamerConfig  # noqa: E402
from conceptscope_cli.dictionary.openai_namer import (  # noqa: E402
    clean_answer,
    failed,
    load_answers,
    name_latents_openai,
    read_dotenv,
    resolve_api_key,
)
from conceptscope_cli.errors import CscopeError  # noqa: E402

KEY = "sk-test-4f1c2e9d-never-stored"
MAX_REQUESTS = 200  # a runaway retry loop fails the test instead of spinning


# --------------------------------------------------------------------------- fake server

# A scripted step: ("ok", text) | ("status", code, headers) | ("drop",) | ("slow", seconds) | ("hold",)
Step = tuple


class FakeChat:
    """A chat-completions server whose answers are scripted per latent."""

    def __init__(self, tiles: dict[int, Path]) -> None:
        self.by_sha = {hashlib.sha256(p.read_bytes()).hexdigest(): k for k, p in tiles.items()}
        self.scripts: dict[int, list[Step]] = {}
        self.default: Callable[[int], Step] = lambda k: ("ok", f"Concept {k}.")
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()  # ends every ("hold",) step
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.requests:
            out[r["latent"]] = out.get(r["latent"], 0) + 1
        return out

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        if h.path != "/v1/chat/completions":
            return self._send(h, 404, {"error": {"message": "no such route"}})
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        png = base64.b64decode(url.split(",", 1)[1])
        latent = self.by_sha.get(hashlib.sha256(png).hexdigest(), -1)
        with self.lock:
            self.requests.append({"latent": latent, "body": body, "authorization": h.headers.get("Authorization"), "png": png})
            if len(self.requests) > MAX_REQUESTS:
                return self._send(h, 400, {"error": {"message": "too many requests in this test"}})
            script = self.scripts.get(latent, [])
            step = script.pop(0) if script else self.default(latent)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._play(h, body, step)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _play(self, h: BaseHTTPRequestHandler, body: dict[str, Any], step: Step) -> None:
        kind = step[0]
        if kind == "drop":  # close without a response: a connection error for the client
            h.close_connection = True
            return
        if kind == "echo":  # a server (or proxy) quoting the request headers in its error
            echoed = f"bad request; headers: Authorization: {h.headers.get('Authorization')}"
            return self._send(h, step[1], {"error": {"message": echoed, "type": "test", "code": None}})
        if kind == "answer-echo":  # an answer that repeats the bearer token
            step = ("ok", f"Token {h.headers.get('Authorization')}")
        if kind == "status":
            return self._send(h, step[1], {"error": {"message": f"scripted {step[1]}", "type": "test", "code": None}},
                              step[2] if len(step) > 2 else {})
        if kind == "slow":
            self.release.wait(step[1])
            step = ("ok", step[2])
        elif kind == "hold":
            self.release.wait(15)
            step = ("ok", step[1])
        completion = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": step[1]}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        }
        self._send(h, 200, completion)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client was killed meanwhile
            pass


def make_tiles(folder: Path, n: int) -> dict[int, Path]:
    """n distinct small PNG tiles (5 crops of 8 px in a row), keyed by latent id 10, 11, ..."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tiles = {}
    for i in range(n):
        path = folder / f"latent_{10 + i:05d}.png"
        Image.fromarray(rng.integers(0, 255, size=(8, 40, 3), dtype=np.uint8)).save(path)
        tiles[10 + i] = path
    return tiles


@pytest.fixture
def tiles(tmp_path: Path) -> dict[int, Path]:
    return make_tiles(tmp_path / "reference", 6)


@pytest.fixture
def server(tiles: dict[int, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeChat]:
    for name in ("NO_PROXY", "no_proxy"):  # a proxy configured on the machine must not see these requests
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    fake = FakeChat(tiles)
    fake.thread.start()
    yield fake
    fake.release.set()
    fake.server.shutdown()
    fake.server.server_close()


def config_for(server: FakeChat, **changes: Any) -> OpenAINamerConfig:
    base = OpenAINamerConfig(model="test-vlm", base_url=server.base_url, max_retries=3, timeout_s=5.0,
                             backoff_base_s=0.01, backoff_max_s=0.5, concurrency=4)
    return replace(base, **changes)


# --------------------------------------------------------------------------- 1. the request


def test_request_carries_tile_prompt_model_and_max_tokens(tmp_path: Path, tiles: dict[int, Path], server: FakeChat) -> None:
    server.scripts[10] = [("ok", '"Red Bricks."\n')]
    answers = tmp_path / "answers.jsonl"
    seen: list[int] = []
    results = name_latents_openai(tiles, config_for(server, max_tokens=12), KEY, answers, on_progress=seen.append)

    assert sum(seen) == len(tiles)
    assert results[10].name == "red bricks" and results[10].raw == '"Red Bricks."\n'
    assert all(r.name == f"concept {k}" for k, r in results.items() if k != 10)
    assert all(r.source == "openai" and r.model == "test-vlm" and r.error is None for r in results.values())
    assert failed(results) == []
    assert server.counts() == dict.fromkeys(tiles, 1)

    for request in server.requests:
        body = request["body"]
        assert body["model"] == "test-vlm"
        assert body["max_tokens"] == 12
        (message,) = body["messages"]
        assert message["role"] == "user"
        text, image = message["content"]
        assert text == {"type": "text", "text": DEFAULT_PROMPT}
        assert image["type"] == "image_url"
        url = image["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == tiles[request["latent"]].read_bytes()
        assert request["authorization"] == f"Bearer {KEY}"

    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert sorted(r["latent"] for r in lines) == sorted(tiles)
    assert KEY not in answers.read_text()


def test_requests_stay_within_concurrency(tmp_path: Path, tiles: dict[int, Path], server: FakeChat) -> None:
    server.default = lambda k: ("slow", 0.15, f"thing {k}")
    results = name_latents_openai(tiles, config_for(server, concurrency=2), KEY, tmp_path / "a.jsonl")
    assert failed(results) == []
    assert server.max_in_flight == 2


def test_clean_answer() -> None:
    assert clean_answer("**Concept:** Striped Fur.") == "striped fur"
    assert clean_answer("The concept is: wooden texture") == "wooden texture"
    assert clean_answer("T-shirt collar!\nBecause the crops show...") == "t-shirt collar"
    assert clean_answer("one two three four five six", max_words=3) == "one two three"
    assert clean_answer("  ...  ") is None
    assert clean_answer(None) is None


# --------------------------------------------------------------------------- 2. retries


def test_retries_transient_errors_and_not_client_errors(tmp_path: Path, tiles: dict[int, Path], server: FakeChat) -> None:
    server.scripts = {
        10: [("status", 429, {"Retry-After": "0"}), ("ok", "rate limited once")],
        11: [("status", 500), ("status", 500), ("ok", "server error twice")],
        12: [("status", 503)] * 10,  # always failing
        13: [("status", 400)],
        14: [("drop",), ("status", 429, {"Retry-After": "100"}), ("ok", "dropped then limited")],  # capped wait
        15: [("slow", 2.0, "too slow"), ("ok", "timed out once")],
    }
    answers = tmp_path / "answers.jsonl"
    t0 = time.monotonic()
    results = name_latents_openai(tiles, config_for(server, max_retries=2, timeout_s=0.5), KEY, answers)
    assert time.monotonic() - t0 < 8

    assert results[10].name == "rate limited once"
    assert results[11].name == "server error twice"
    assert results[14].name == "dropped then limited"
    assert results[15].name == "timed out once"
    assert results[12].name is None and "503" in results[12].error
    assert results[13].name is None and "400" in results[13].error
    assert [r.latent for r in failed(results)] == [12, 13]
    assert server.counts() == {10: 2, 11: 3, 12: 3, 13: 1, 14: 3, 15: 2}

    # Failures are stored with their error; a rerun asks only for them again.
    stored = load_answers(answers)
    assert stored[12]["name"] is None and "503" in stored[12]["error"]
    server.scripts = {}
    server.requests.clear()
    again = name_latents_openai(tiles, config_for(server), KEY, answers)
    assert server.counts() == {12: 1, 13: 1}
    assert failed(again) == []
    assert again[10].resumed and again[10].name == "rate limited once"


def test_bad_key_stops_the_run(tmp_path: Path, tiles: dict[int, Path], server: FakeChat) -> None:
    server.default = lambda k: ("status", 401)
    results = name_latents_openai(tiles, config_for(server, concurrency=1), KEY, tmp_path / "a.jsonl")
    assert len(server.requests) == 1  # the other latents are not sent with a key known to be bad
    assert len(failed(results)) == len(tiles)
    assert all("401" in r.error for r in results.values())


def test_changed_tile_or_model_is_asked_again(tmp_path: Path, tiles: dict[int, Path], server: FakeChat) -> None:
    answers = tmp_path / "answers.jsonl"
    name_latents_openai(tiles, config_for(server), KEY, answers)
    make_tiles(tmp_path / "other", 7)[16].replace(tiles[10])  # new content at the same path
    server.by_sha = {hashlib.sha256(p.read_bytes()).hexdigest(): k for k, p in tiles.items()}
    server.requests.clear()
    name_latents_openai(tiles, config_for(server), KEY, answers)
    assert server.counts() == {10: 1}
    server.requests.clear()
    name_latents_openai(tiles, config_for(server, model="other-vlm"), KEY, answers)
    assert server.counts() == dict.fromkeys(tiles, 1)


# --------------------------------------------------------------------------- 3. resume after SIGKILL


@pytest.mark.slow  # kill test
def test_resume_after_kill_does_not_pay_twice(tmp_path: Path, tiles: dict[int, Path], server: FakeChat) -> None:
    fast, slow = [10, 11, 12], [13, 14, 15]
    server.default = lambda k: ("ok", f"fast {k}") if k in fast else ("hold", f"slow {k}")
    answers = tmp_path / "answers.jsonl"
    config = config_for(server, concurrency=6)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from conceptscope_cli.config.sections import OpenAINamerConfig
        from conceptscope_cli.dictionary.openai_namer import name_latents_openai
        tiles = {{k: Path(p) for k, p in {json.dumps({k: str(p) for k, p in tiles.items()})}.items()}}
        config = OpenAINamerConfig(model={config.model!r}, base_url={config.base_url!r}, concurrency=6,
                                   timeout_s=30.0, backoff_base_s=0.01)
        name_latents_openai({{int(k): p for k, p in tiles.items()}}, config, {KEY!r}, Path({str(answers)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            # Killed once the fast answers are stored and the slow requests are in flight.
            if answers.is_file() and len(load_answers(answers)) >= len(fast) and len(server.counts()) == len(tiles):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert sorted(load_answers(answers)) == fast
        assert sorted(server.counts()) == fast + slow  # the slow ones were in flight
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()

    server.release.set()  # the rerun gets its answers at once
    with open(answers, "a") as handle:  # as if the kill had cut a line in half
        handle.write('{"latent": 13, "name": "half')
    results = name_latents_openai(tiles, config, KEY, answers)

    assert failed(results) == []
    assert {k: r.name for k, r in results.items()} == {**{k: f"fast {k}" for k in fast}, **{k: f"slow {k}" for k in slow}}
    assert all(results[k].resumed for k in fast) and not any(results[k].resumed for k in slow)
    assert server.counts() == {**dict.fromkeys(fast, 1), **dict.fromkeys(slow, 2)}
    assert sorted(load_answers(answers)) == fast + slow
    assert KEY not in answers.read_text()


# --------------------------------------------------------------------------- 4. the key


def test_missing_key_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(CscopeError) as info:
        resolve_api_key(OpenAINamerConfig(), tmp_path)
    assert "OPENAI_API_KEY" in info.value.message
    assert info.value.hint and "OPENAI_API_KEY" in info.value.hint


def test_key_from_env_then_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("MY_VLM_KEY", raising=False)
    (tmp_path / ".env").write_text(textwrap.dedent("""
        # secrets
        OTHER=1
        export OPENAI_API_KEY = "sk-from-dotenv"  # quoted, exported
        MY_VLM_KEY='single # not a comment'
        BARE=value # trailing comment
        not a line
    """))
    assert resolve_api_key(OpenAINamerConfig(), tmp_path) == "sk-from-dotenv"
    assert resolve_api_key(OpenAINamerConfig(api_key_env="MY_VLM_KEY"), tmp_path) == "single # not a comment"
    assert read_dotenv(tmp_path / ".env")["BARE"] == "value"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert resolve_api_key(OpenAINamerConfig(), tmp_path) == "sk-from-env"  # the environment wins
    monkeypatch.setenv("OPENAI_API_KEY", "")  # set but empty counts as missing
    assert resolve_api_key(OpenAINamerConfig(), tmp_path) == "sk-from-dotenv"
    with pytest.raises(CscopeError, match="NOPE_KEY"):
        resolve_api_key(OpenAINamerConfig(api_key_env="NOPE_KEY"), tmp_path)


def test_config_fields_are_manifest_friendly() -> None:
    from dataclasses import fields
    from typing import Optional, get_type_hints

    hints = get_type_hints(OpenAINamerConfig)
    for f in fields(OpenAINamerConfig):
        assert f.metadata.get("help"), f.name
        assert hints[f.name] in (str, int, float, bool, Optional[str]), f.name


def test_secrets_echoed_by_the_server_are_never_stored(tmp_path: Path, tiles: dict[int, Path], server: FakeChat) -> None:
    """Issue 20: an error that quotes the Authorization header must not put the key on disk."""
    server.scripts = {10: [("echo", 400)], 11: [("echo", 500)] * 5, 12: [("answer-echo",)]}
    answers = tmp_path / "answers.jsonl"
    results = name_latents_openai(tiles, config_for(server, max_retries=1), KEY, answers)
    assert all(r["authorization"] == f"Bearer {KEY}" for r in server.requests)  # the key was really sent
    stored = answers.read_text()
    assert KEY not in stored and "[redacted]" in stored
    assert "400" in results[10].error and "Authorization: [redacted]" in results[10].error
    assert all(KEY not in (r.error or "") + (r.raw or "") + (r.name or "") for r in results.values())


def test_redact_secrets_covers_headers_and_keys() -> None:
    from conceptscope_cli.dictionary.openai_namer import redact_secrets

    text = "x Authorization: Bearer abc.def-123 y 'api-key': 'k9k9k9' z sk-proj-ABCDEFGH12 w my-literal-key"
    out = redact_secrets(text, ("my-literal-key",))
    assert out == "x Authorization: [redacted] y 'api-key': '[redacted]' z [redacted] w [redacted]"
    assert redact_secrets("Concept 3.", ("k",)) == "Concept 3."  # short strings are not treated as secrets
