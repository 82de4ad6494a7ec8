"""The C heap's mmap threshold, fixed for the life of a `cscope` process when the user asks
(`CSCOPE_MMAP_THRESHOLD=BYTES`; glibc only).

Why it exists: glibc starts with a 128 KiB mmap threshold and raises it (up to 32 MiB) each time
a block above it is freed, so the forwards' multi-MB temporaries come from the heap and leave
holes in it when freed. Until 0d89c44 the extract and dict writers kept blocks alive from one
batch to the next (HDF5's chunk cache, the previous batch's tensors); they landed in those holes,
the next batch's temporaries no longer fitted, and the heap grew ~8 MB per batch: peak RSS within
each 1,024-image shard of `extract` climbed from 957 MB (first shards) to 1,096 MB (last) at
8,000 synthetic images (the trim after each shard, `devices.release_free_memory`, only returns
what is free at the shard's end). A fixed threshold hid that by giving each large buffer its own
mapping (128 KiB: 947-948 MB every shard). Since the writers keep nothing across batches
(extract/store.py, dictionary/sparse.py) and batch loops trim a heap that drifts anyway
(`devices.HeapWatch`), the default heap's shard peaks stay bounded as well (README "Scaling
out"), so this is only a way to trade speed for a somewhat lower peak. No torch import here, so
the CLI sets it before anything else runs.

It is not the default because it costs speed: buffers above the threshold get fresh pages from
the kernel on every allocation, and the forwards allocate many of a few MB (README, "Scaling
out": `dict` from images ran ~35 % slower with 128 KiB; 4 MiB kept extract's shard peaks within
~15 MB and cost ~25 %; 16 MiB and up crept like glibc's adaptive threshold did then: all
measured before 0d89c44).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value
ENV_VAR = "CSCOPE_MMAP_THRESHOLD"
_UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024 ** 2, "mib": 1024 ** 2}


def threshold_from_env(environ: Mapping[str, str] = os.environ) -> int | None:
    """The threshold `CSCOPE_MMAP_THRESHOLD` asks for, in bytes (e.g. 4194304, 4MiB, 128k);
    None when unset or empty. ValueError, naming the variable, for anything else."""
    raw = environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    number = raw.rstrip("KkMmIiBb")
    unit = raw[len(number):].lower()
    if not number.isdigit() or unit not in _UNITS or int(number) <= 0:
        raise ValueError(f"{ENV_VAR}={raw!r}: expected a positive number of bytes, e.g. 4194304, 4MiB or 128KiB")
    return int(number) * _UNITS[unit]


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """mallopt(M_MMAP_THRESHOLD, threshold): blocks of at least `threshold` bytes get their own
    mapping, returned to the OS when freed, for the whole process. False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # by name: find_library would start a subprocess
    except OSError:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so")
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)
