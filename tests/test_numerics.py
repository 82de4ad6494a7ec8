"""Portable numerics (conceptscope_cli/numerics.py): tests/conftest.py sets CSCOPE_NUMERICS=portable
before numpy and torch load, so this process and every `cscope` subprocess compute with the code
paths the README's example figures were made with. These tests fail when it is not in effect."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from conceptscope_cli import numerics

X86 = platform.machine() in ("x86_64", "AMD64")
_REPORT = """
import ctypes, glob, json, os, sys
{apply}
import numpy, torch
a = torch.randn(64, 64)
a @ a                                                # MKL
torch.nn.functional.conv2d(torch.randn(1, 3, 16, 16), torch.randn(8, 3, 8, 8), stride=8)  # oneDNN
from conceptscope_cli import numerics
libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "libscipy_openblas*"))
core = None
for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
    f = getattr(ctypes.CDLL(libs[0]), name, None) if libs else None
    if f is not None:
        f.restype = ctypes.c_char_p
        core = f().decode()
        break
print(json.dumps({{**numerics.in_effect(), "openblas_core": core}}))
"""


def _report(env: dict[str, str], apply: bool = True) -> tuple[dict, str]:
    """What a fresh interpreter computes with (numerics.apply first, as `cscope` does), and what
    MKL and oneDNN say they run (their verbose logs)."""
    script = _REPORT.format(apply="from conceptscope_cli import numerics; numerics.apply()" if apply else "")
    proc = subprocess.run([sys.executable, "-c", script], env={**env, "MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


@pytest.mark.skipif(not X86, reason="the portable settings are x86-64's (MKL, AVX2)")
def test_this_test_process_computes_with_portable_numerics() -> None:
    import torch

    assert os.environ[numerics.ENV_VAR] == "portable"
    assert all(os.environ[k] == v for k, v in numerics.PORTABLE_ENV.items())
    torch.randn(8, 8) @ torch.randn(8, 8)
    state = numerics.in_effect()
    assert state["mode"] == "portable" and state["cpu_capability"] == "AVX2", state
    assert state["mkl_cbwr"] == 65539, state  # COMPATIBLE (3) + STRICT (65536)


@pytest.mark.skipif(not X86, reason="the portable settings are x86-64's (MKL, AVX2)")
def test_a_subprocess_of_the_tests_runs_the_portable_code_paths() -> None:
    """What every `cscope` subprocess of the tests inherits: the report of the libraries themselves."""
    state, log = _report(dict(os.environ), apply=False)
    assert state["mode"] == "portable" and state["cpu_capability"] == "AVX2", state
    assert state["mkl_cbwr"] == 65539 and "CNR:COMPATIBLE" in log, log[-2000:]
    assert "isa:Intel AVX2" in log, log[-2000:]  # oneDNN's ISA (the line names Intel on any vendor)
    assert state["openblas_core"] in (None, "Haswell"), state
    assert state["threads"] == int(os.environ["OMP_NUM_THREADS"]), state


@pytest.mark.skipif(not X86, reason="the portable settings are x86-64's (MKL, AVX2)")
def test_apply_sets_portable_in_a_fresh_process_and_native_changes_nothing() -> None:
    clean = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV and k != numerics.ENV_VAR}
    clean.pop("OMP_NUM_THREADS", None)
    state, log = _report({**clean, numerics.ENV_VAR: "portable"})
    assert state["mode"] == "portable" and state["mkl_cbwr"] == 65539 and state["threads"] == 1, state
    native, log = _report(clean)
    assert native["mode"] == "native" and native["mkl_cbwr"] != 65539 and "CNR:OFF" in log, native


def test_portable_set_after_numpy_loaded_is_refused() -> None:
    clean = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV}
    proc = subprocess.run([sys.executable, "-c", "import numpy\nfrom conceptscope_cli import numerics\nnumerics.apply()"],
                          env={**clean, numerics.ENV_VAR: "portable"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CSCOPE_NUMERICS=portable was set after numpy had been imported" in proc.stderr


def test_an_unknown_mode_is_a_clear_error_of_cscope() -> None:
    proc = subprocess.run([sys.executable, "-m", "conceptscope_cli", "cache", "ls"],
                          env={**os.environ, numerics.ENV_VAR: "fast"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "CSCOPE_NUMERICS='fast' is not a numerics mode" in proc.stdout + proc.stderr
    environ = {numerics.ENV_VAR: "Portable"}
    assert numerics.apply(environ) == "portable" and environ["MKL_CBWR"] == "COMPATIBLE,STRICT"
    assert numerics.apply({}) == "native"
