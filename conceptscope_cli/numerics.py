"""Portable numerics: `CSCOPE_NUMERICS=portable` gives the same bits on any x86-64 CPU with AVX2 and FMA.

torch's own kernels, MKL (torch's matmuls), oneDNN (the patch convolution, GELU), OpenBLAS (numpy's
and scipy's matmuls) and numpy's loops each pick a code path by the CPU they run on: its vector width
and, for MKL, its vendor. Another path sums in another order and rounds the last bit differently; the
SAE's training and the threshold decisions after it turn that bit into other figures (measured on the
example: README, "Portable numerics"). Each library reads its variable once, when it initialises, so
`apply` sets them before cscope imports numpy or torch. The default ("native") changes nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from conceptscope_cli.errors import CscopeError

ENV_VAR = "CSCOPE_NUMERICS"
MODES = ("native", "portable")
# The common code path of every x86-64-v3 CPU (Haswell and later, Zen and later, AVX-512 or not).
PORTABLE_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",      # torch's kernels (and its random numbers): AVX2 even on AVX-512 CPUs
    "ONEDNN_MAX_CPU_ISA": "AVX2",       # oneDNN's JIT code: the ViT's patch convolution and GELU
    # MKL's one branch that is the same on AMD and Intel (its AVX2 branch is Intel-only: on other
    # CPUs MKL falls back to its automatic choice); STRICT: the same bits whatever the alignment.
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "OPENBLAS_CORETYPE": "Haswell",     # numpy's and scipy's BLAS kernels (the AVX2 ones)
    # numpy's AVX-512 loops (float64 sin/cos/exp ...); numpy 2.4 names, then the older ones
    "NPY_DISABLE_CPU_FEATURES": "X86_V4,AVX512_ICL,AVX512_SPR,AVX512F,AVX512CD,AVX512_SKX,AVX512_CLX,"
                                "AVX512_CNL,AVX512_KNL,AVX512_KNM",
}
# Read when each library loads: too late once these are imported.
_LIBRARIES = ("numpy", "torch", "scipy")


def mode_of(environ: MutableMapping[str, str] = os.environ) -> str:
    """The numerics mode `environ` asks for ("native" when CSCOPE_NUMERICS is unset or empty)."""
    mode = environ.get(ENV_VAR, "").strip().lower() or "native"
    if mode not in MODES:
        raise CscopeError(f"{ENV_VAR}={environ[ENV_VAR]!r} is not a numerics mode",
                          hint="use native (the default: each CPU's fastest code paths) or portable")
    return mode


def apply(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set the variables of the requested mode in `environ` (the process's by default) and return
    the mode. Portable also fixes the thread count at 1 unless OMP_NUM_THREADS is set (a parallel sum
    depends on it). Refused when numpy or torch was imported before with other values: they would
    keep the paths they chose."""
    mode = mode_of(environ)
    if mode != "portable":
        return mode
    differ = sorted(k for k, v in PORTABLE_ENV.items() if environ.get(k) != v)
    loaded = [name for name in _LIBRARIES if name in sys.modules]
    if differ and loaded and environ is os.environ:
        raise CscopeError(f"{ENV_VAR}=portable was set after {', '.join(loaded)} had been imported",
                          hint=f"set {ENV_VAR}=portable in the environment before Python starts "
                               f"(or {', '.join(differ)} before the import)")
    environ.update(PORTABLE_ENV)
    environ.setdefault("OMP_NUM_THREADS", "1")
    return mode


def in_effect() -> dict[str, Any]:
    """What this process computes with, for the outputs' meta: the mode, torch's CPU capability, its
    thread count and, when portable, the variables set."""
    import torch

    mode = mode_of()
    out: dict[str, Any] = {"mode": mode, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "threads": torch.get_num_threads(), "mkl_cbwr": mkl_cbwr()}
    if mode == "portable":
        out["env"] = {k: os.environ.get(k) for k in PORTABLE_ENV}
    return out


def mkl_cbwr() -> int | None:
    """MKL's reproducibility setting in effect (as mkl_cbwr_get(MKL_CBWR_ALL) returns it: 1 = off,
    2 = its automatic branch, 3 = COMPATIBLE, +65536 with STRICT), None without torch's MKL. It reads
    torch's copy of MKL (linked into libtorch_cpu; `mkl_serv_cbwr_get` is the symbol it exports)."""
    import ctypes

    import torch

    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return int(get(-1))


__all__ = ["ENV_VAR", "MODES", "PORTABLE_ENV", "apply", "in_effect", "mkl_cbwr", "mode_of"]
