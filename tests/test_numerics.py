"""Portable numerics (conceptscope_cli/numerics.py): the example's `cscope` runs (tests/conftest.py,
helpers.PORTABLE) compute with the code paths the README's example figures were made with; the rest
of the suite runs natively. These tests fail when portable is not what those runs get."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from conceptscope_cli import numerics
from helpers import PORTABLE

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
def test_the_example_runs_get_the_portable_code_paths() -> None:
    """What every `cscope` run on the example gets (helpers.PORTABLE, applied by cscope's entry
    point): the report of the libraries themselves."""
    state, log = _report({**os.environ, **PORTABLE})
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
