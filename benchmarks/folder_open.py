"""Opening an image-folder split: the folder listing against `datasets`' imagefolder loader.

    python benchmarks/folder_open.py --sizes 2000 32000 [--skip-datasets-above 32000]

Each size is a fresh folder of N tiny PNG files (train/ with 100 class folders, test/ with 10 %
more files; nothing is decoded). Each open runs in its own process, so the RSS it reports is that
open's: `rss+` is the peak RSS (ru_maxrss) minus the RSS after imports (torch, open_clip and h5py
included: every stage has them, and a cache record names their versions). Measured in the same run:
datasets' loader (`load_dataset("imagefolder", data_dir=...)`, a fresh HF cache), the listing's
first open (two walks, rows written into the cache) and a re-open from the cache (what every later
process pays). The ratio is datasets' time over the listing's first open.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc000"
    "0003010100c9fe92ef0000000049454e44ae426082")

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
folder, mode, cache_root = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
import datasets
# imported by every stage anyway, and by the cache's record (software_versions): not the open's cost
import h5py, open_clip, torch  # noqa: F401
from conceptscope_cli.cache.store import CacheStore
from conceptscope_cli.data import folder_listing
datasets.disable_progress_bars()
page = os.sysconf("SC_PAGE_SIZE")
rss0 = int(open("/proc/self/statm").read().split()[1]) * page
start = time.perf_counter()
if mode == "datasets":
    rows = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
else:
    rows = folder_listing.open_rows(folder, "train", "bench", CacheStore(Path(cache_root)), listed=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "rss_plus": peak - rss0, "rows": len(rows)}))
"""


def make_folder(root: Path, n: int) -> None:
    for split, count in (("train", n), ("test", max(1, n // 10))):
        for i in range(count):
            folder = root / split / f"c{i % 100:03d}"
            if i < 100:
                folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:07d}.png").write_bytes(PNG)


def run(folder: Path, mode: str, cache: Path, hf_cache: Path) -> dict[str, float]:
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode, str(cache)], env=env, check=True,
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 32000])
    parser.add_argument("--skip-datasets-above", type=int, default=32000,
                        help="sizes above this run only the listing (datasets' loader takes minutes)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="cscope-folder-bench-") as tmp:
            work = Path(tmp)
            make_folder(work / "images", n)
            folder = (work / "images").resolve()
            first = run(folder, "listing", work / "cache", work / "hf")
            again = run(folder, "listing", work / "cache", work / "hf")
            line = (f"N={n}: listing first open {first['seconds']:.2f} s, rss+ {first['rss_plus'] / 2**20:.1f} MB; "
                    f"re-open {again['seconds']:.2f} s, rss+ {again['rss_plus'] / 2**20:.1f} MB")
            listing_bytes = (next((work / "cache" / "listing").glob("*/rows.arrow"))).stat().st_size
            line += f"; listing {listing_bytes / n:.0f} B per file"
            if n <= args.skip_datasets_above:
                old = run(folder, "datasets", work / "cache", work / "hf")
                assert old["rows"] == first["rows"], (old, first)
                line += (f"; datasets {old['seconds']:.2f} s, rss+ {old['rss_plus'] / 2**20:.1f} MB "
                         f"(time {old['seconds'] / first['seconds']:.1f}x the listing's first open)")
            print(line, f"(load average {os.getloadavg()[0]:.1f})", flush=True)
            time.sleep(0.1)


if __name__ == "__main__":
    main()
