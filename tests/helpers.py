"""Run the real `cscope` entry point, in-process or as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

TESTS = Path(__file__).parent


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
    """`python -m conceptscope_cli ARGS` in a subprocess: what a user's shell sees."""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "conceptscope_cli", *args], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def run_main(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliResult:
    """The console-script entry point in-process (faster than a subprocess)."""
    from conceptscope_cli.cli import app as cli_app

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["cscope", *args])
    monkeypatch.setattr(cli_app.state, "project_dir", None)
    monkeypatch.setattr(cli_app.state, "debug", False)
    code = 0
    try:
        cli_app.main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], cwd: Path, *, script: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "conceptscope_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), *target, *args]
    # Loopback for gloo: the ranks are on this machine, whatever its hostname resolves to.
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def h5_contents(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}


def assert_same_h5(a: Path, b: Path) -> None:
    left, right = h5_contents(a), h5_contents(b)
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        np.testing.assert_array_equal(left[name], right[name], err_msg=f"{a.name}:{name}")
