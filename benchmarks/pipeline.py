"""The whole pipeline at growing sizes: time, peak RSS and bytes written per stage, and the
images/s of `dict` from images against a bare loop, all measured in one run.

    python benchmarks/pipeline.py                         # 500, 1000, 2000 images
    python benchmarks/pipeline.py --sizes 2000 8000 32000 # the issue's sizes (slow on 2 cores)
    python benchmarks/pipeline.py --ratio-only            # 4,096 images in parts of 2,048, 2 rounds
    python benchmarks/pipeline.py --sizes 2000 8000 16000 --no-ratio  # the stages only (the README table)

Synthetic 64 px images (3 classes) through the embedded tiny CLIP (`example:tiny-clip`,
4 blocks, d = 128, 8×8 patches + CLS) with the default `[extract] tokens_per_image` (16) and
`[dict] source = "auto"` (no full-token cache, so the dictionary streams the images). Each
stage runs as its own `cscope` process: its peak RSS is that process's (`wait4`), its bytes
are the growth of the cache + outputs folders. The train budget is fixed (`--tokens`), so
train time is flat by design; extract, dict and categorize grow with the images. The launcher
imports neither torch nor the package (a forked child's peak RSS starts at its parent's on
Linux), and runs the ratio part in a child of its own, after the stages. Each stage also prints
its peak RSS so far at the end of each shard / part / class (`PEAK_LOGGER`; a sequence that keeps
rising is a creep within the stage, one that levels off is bounded).

Ratio: `compute_latent_parts_from_images` (decode in workers, block L, SAE encoder, CSR
parts written, one DataLoader per part as `cscope dict` runs it) against a bare loop of one
DataLoader, backbone to block L and SAE encoder mean on the same images and batch size,
nothing written. Each side is timed as a whole call (DataLoader start included), after an
untimed warm-up of one batch each; rounds alternate the two, best of `--rounds`; wall and CPU
seconds (this process and its DataLoader workers) are printed, with the load average. One
intra-op thread unless OMP_NUM_THREADS says otherwise (beside `--workers` decoding workers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("extract", "train", "dict", "categorize")
MANIFEST = """
[project]
name = "bench"
seed = 0
device = "cpu"
num_workers = {workers}

[backbone]
model = "example:tiny-clip"
layer = -1

[datasets.synthetic]
source = "imagefolder"
path = "../images"
splits = ["train"]
class_names = ["red", "green", "blue"]

[extract]
batch_size = 64
shard_size = 1024

[sae]
architecture = "topk"
k = 16
expansion = 4
batch_size = 1024
total_tokens = {tokens}
warmup_steps = 20
checkpoint_every = 0
geometric_median_samples = 2048
shuffle_buffer = 32768

[dict]
noisy_threshold = 100.0
strong_value = 0.0
min_strong_images = 2
namer = "none"

[categorize]
num_samples = 8
candidates = 5
"""


# Each stage runs through this wrapper: at every shard / part / class end (the stages' call to
# `release_free_memory`, before it trims) it logs the process's peak RSS so far (VmHWM), so a creep
# within a stage shows as a rising sequence. Nothing is reset: the stage's wait4 peak is unchanged.
PEAK_LOGGER = """
import runpy, sys
from conceptscope_cli import devices
from conceptscope_cli.categorize import stage
from conceptscope_cli.dictionary import latents
from conceptscope_cli.extract import activations

def logged():
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    print(f"[bench-peak] {peak:.0f}", file=sys.stderr, flush=True)
    return devices.release_free_memory()

for module in (activations, latents, stage):
    module.release_free_memory = logged
sys.argv = ["cscope", *sys.argv[1:]]
runpy.run_module("conceptscope_cli", run_name="__main__")
"""


def folder_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for f in folders if f.exists() for p in f.rglob("*") if p.is_file())


def threads() -> str:
    return os.environ.get("OMP_NUM_THREADS", "2")


def run_stage(stage: str, project: Path) -> tuple[float, float, float, list[int]]:
    """(wall seconds, CPU seconds, peak RSS in MB, peak RSS so far at each shard/part/class end)
    of `cscope STAGE` as a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": threads(), "NO_COLOR": "1"}
    start = time.perf_counter()
    # stdout to a file, not a pipe: a stage that prints more than a pipe buffer would block on it.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-c", PEAK_LOGGER, stage], cwd=project, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"cscope {stage} failed:\n{output}")
    peaks = [int(line.split()[1]) for line in output.splitlines() if line.startswith("[bench-peak] ")]
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, peaks


def active_per_image(project: Path) -> float:
    """Mean stored entries per image of the dictionary's `latents.h5` (in a child: the launcher
    stays free of h5py/numpy, so that the stages' peak RSS is theirs)."""
    code = ("import glob, h5py, sys; f = h5py.File(glob.glob(sys.argv[1] + '/.cscope/cache/latents/*/latents.h5')[0]);"
            " print(int(f['indptr'][-1]) / max(int(f.attrs['n_images']), 1), f['indices'].dtype)")
    out = subprocess.run([sys.executable, "-c", code, str(project)], check=True, capture_output=True, text=True)
    value, dtype = out.stdout.split()
    print(f"{'':>7} latents.h5: {float(value):.1f} active latents per image, ids stored as {dtype}")
    return float(value)


def write_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> None:
    """n random RGB PNGs in 3 classes (channel `label` saturated), an imagefolder with metadata."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as meta:
        for i in range(n):
            pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            pixels[..., i % 3] = 255
            Image.fromarray(pixels).save(folder / f"{i:06d}.png")
            meta.write(json.dumps({"file_name": f"{i:06d}.png", "label": i % 3}) + "\n")


def pipeline(sizes: list[int], tokens: int, workers: int) -> None:
    import resource

    print(f"launcher peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (floor of every stage)")
    print(f"OMP_NUM_THREADS={threads()}, {workers} decoding worker(s), nice {os.nice(0)}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start (time is wall time; CPU time beside it)")
    rows = []
    active = {}
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"cscope-bench-pipeline-{n}-"))
        write_images(work / "images" / "train", n)
        project = work / "proj"
        project.mkdir()
        (project / "cscope.toml").write_text(MANIFEST.format(workers=workers, tokens=tokens))
        written = [project / ".cscope", project / "outputs"]
        for stage in STAGES:
            before = folder_bytes(*written)
            seconds, cpu, rss, peaks = run_stage(stage, project)
            rows.append((n, stage, seconds, rss, folder_bytes(*written) - before, cpu))
            print(f"{n:>7} {stage:<11} {seconds:>8.1f} s {cpu:>8.1f} s CPU {rss:>8.0f} MB {rows[-1][4] / n:>10.0f} B/image"
                  f"   (load {os.getloadavg()[0]:.1f})", flush=True)
            if peaks:
                print(f"{'':>7} {stage} peak RSS so far at each shard/part/class end (MB): " + " ".join(map(str, peaks)),
                      flush=True)
            if stage == "dict":
                active[n] = active_per_image(project)
        shutil.rmtree(work)
    print()
    print("stage        " + "".join(f"{'N=' + str(n):>28}" for n in sizes) + "   growth (last/first, images x"
          f"{sizes[-1] / sizes[0]:.0f})")
    for stage in STAGES:
        cells = [r for r in rows if r[1] == stage]
        line = "".join(f"{r[2]:>7.1f}s {r[3]:>6.0f}MB {r[4] / 1e6:>8.2f}MB  " for r in cells)
        growth = (f"time x{cells[-1][2] / cells[0][2]:.2f}, RSS x{cells[-1][3] / cells[0][3]:.2f}, "
                  f"bytes x{cells[-1][4] / max(cells[0][4], 1):.2f}")
        print(f"{stage:<12} {line} {growth}")
    print()
    marginal = {}
    if len(sizes) > 1:  # fixed costs (model memo, stats.h5, tiles) cancel: what one more image costs
        first, last = ([r for r in rows if r[0] == n] for n in (sizes[0], sizes[-1]))
        marginal = {b[1]: (b[4] - a[4]) / (sizes[-1] - sizes[0]) for a, b in zip(first, last)}
        print(f"marginal bytes per image (N={sizes[0]} -> {sizes[-1]}): " + ", ".join(
            f"{stage} {value:.0f}" for stage, value in marginal.items()))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    markdown(sizes, rows, marginal, active)


def markdown(sizes: list[int], rows: list[tuple], marginal: dict[str, float], active: dict[int, float]) -> None:
    """The README's measured table, as printed here (wall time, CPU time of the stage and its
    reaped children, peak RSS, bytes written per cell): on a shared machine wall time is noisy,
    CPU time much less so."""
    growth = f"growth for {sizes[-1] / sizes[0]:.0f}x images"
    print()
    print("| stage | " + " | ".join(f"N = {n:,}" for n in sizes) + f" | {growth} | marginal bytes per image |")
    print("|---" * (len(sizes) + 3) + "|")
    for stage in STAGES:
        cells = [r for r in rows if r[1] == stage]
        text = [f"{r[2]:.0f} s ({r[5]:.0f} s CPU), {r[3]:.0f} MB, {r[4] / 1e6:.1f} MB" for r in cells]
        change = (f"time x{cells[-1][2] / cells[0][2]:.2f} (CPU x{cells[-1][5] / max(cells[0][5], 1e-9):.2f}), "
                  f"RSS x{cells[-1][3] / cells[0][3]:.2f}, "
                  f"bytes x{cells[-1][4] / max(cells[0][4], 1):.2f}")
        extra = f"{marginal.get(stage, 0):,.0f}"
        if stage == "dict" and active:
            extra += f" ({active[sizes[-1]]:.0f} active latents per image)"
        print(f"| `{stage}` | " + " | ".join(text) + f" | {change} | {extra} |")


def ratio(n_images: int, rounds: int, workers: int, shard_size: int = 2048, mmap_threshold: int = 0) -> None:
    import resource

    if mmap_threshold:  # the C heap as `cscope` sets it under CSCOPE_MMAP_THRESHOLD (both sides run here)
        from conceptscope_cli.heap import fix_mmap_threshold

        fix_mmap_threshold(mmap_threshold)
    import torch

    from conceptscope_cli.backbone.loader import load_backbone
    from conceptscope_cli.config.sections import BackboneConfig, DatasetConfig
    from conceptscope_cli.data.datasets import decoded_loader, open_split
    from conceptscope_cli.dictionary.latents import compute_latent_parts_from_images
    from conceptscope_cli.example.tiny_clip import resolve_example_model
    from conceptscope_cli.extract.images import ImageTokens
    from conceptscope_cli.sae.model import SparseAutoencoder

    # One intra-op thread beside the decoding worker by default: with 2 threads and a worker on
    # 2 cores the forwards oversubscribe them and, on a shared machine, the timing of either
    # side swung by 30% (measured: 35-61 s for what one thread does in 13 s); OMP_NUM_THREADS sets it.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(tempfile.mkdtemp(prefix="cscope-bench-ratio-"))
    write_images(work / "images" / "train", n_images)
    split = open_split("synthetic", DatasetConfig(source="imagefolder", path=str(work / "images"), splits=["train"],
                                                   class_names=["red", "green", "blue"]), "train", work)
    device = torch.device("cpu")
    backbone = load_backbone(resolve_example_model("example:tiny-clip", work / "cache"), device)
    backbone_cfg = BackboneConfig(model="example:tiny-clip", layer=-1)
    tokens = ImageTokens(backbone, backbone_cfg)
    sae = SparseAutoencoder(backbone.d_model, 4 * backbone.d_model, "topk", 16).eval()
    batch = 64

    @torch.no_grad()
    def bare_on(n: int) -> None:
        loader = decoded_loader(split, 0, n, backbone.preprocess, batch_size=batch, num_workers=workers)
        for b in loader:
            if b.images is not None:
                acts = tokens.capture(b.images)  # (b, T, d), block L, no rounding, nothing kept
                sae.encode(acts.reshape(-1, acts.shape[-1])).reshape(acts.shape[0], acts.shape[1], -1).mean(1)

    def ours_on(n: int, parts_of: int) -> None:
        out = work / "entry"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        compute_latent_parts_from_images(split, tokens, sae, out, n_rows=n, shard_size=parts_of,
                                         batch_size=batch, num_workers=workers)

    def cpu_seconds() -> float:  # this process and its reaped children (the DataLoader workers)
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    bare_on(batch)  # untimed warm-up of both: one-off costs (kernels, HDF5) fall on neither round
    ours_on(batch, shard_size)
    best = {"bare": (float("inf"), float("inf")), "ours": (float("inf"), float("inf"))}
    load = [os.getloadavg()[0]]
    for _ in range(rounds):  # alternated, best of each, so a burst of load elsewhere hits both alike
        for name, fn in (("bare", lambda: bare_on(n_images)), ("ours", lambda: ours_on(n_images, shard_size))):
            start, start_cpu = time.perf_counter(), cpu_seconds()
            fn()
            wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        load.append(os.getloadavg()[0])
    (bare_wall, bare_cpu), (ours_wall, ours_cpu) = best["bare"], best["ours"]
    print(f"[dict from images, {n_images} images, batch {batch}, parts of {shard_size}, {workers} workers, "
          f"{f'mmap threshold fixed at {mmap_threshold} B, ' if mmap_threshold else ''}"
          f"{torch.get_num_threads()} threads, tiny CLIP d={backbone.d_model}, m={sae.d_sae}; best of {rounds} "
          f"alternated rounds; load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs]")
    print("  timed: the whole call each side (DataLoader start, decoding, forwards; ours also the CSR parts)")
    print(f"  bare loop (block L + SAE encoder): {n_images / bare_wall:8.1f} images/s  {bare_cpu:6.2f} CPU s")
    print(f"  dict from images (+ CSR parts)   : {n_images / ours_wall:8.1f} images/s  {ours_cpu:6.2f} CPU s")
    print(f"  ratio ours / bare                : {bare_wall / ours_wall:8.2f} wall, {bare_cpu / ours_cpu:.2f} CPU"
          "  (target >= 0.9)")
    shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--tokens", type=int, default=200_000, help="SAE training budget (fixed across sizes)")
    parser.add_argument("--workers", type=int, default=1, help="image-decoding workers")
    parser.add_argument("--images", type=int, default=4096,
                        help="images for the ratio (enough that start-up costs do not dominate the timing)")
    parser.add_argument("--shard-size", type=int, default=2048,
                        help="rows per part for the ratio's `dict` side (the [extract] shard_size default)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ratio-only", action="store_true")
    parser.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="run the ratio with the C heap's mmap threshold fixed at BYTES, as `cscope` does "
                             "under CSCOPE_MMAP_THRESHOLD (conceptscope_cli/heap.py), for both sides; 0: glibc's own")
    parser.add_argument("--no-ratio", action="store_true", help="the stages at each size only, not the ratio")
    args = parser.parse_args()
    if args.ratio_only:
        ratio(args.images, args.rounds, args.workers, args.shard_size, args.mmap_threshold)
        return
    pipeline(args.sizes, args.tokens, args.workers)
    if args.no_ratio:
        return
    subprocess.run([sys.executable, __file__, "--ratio-only", f"--images={args.images}", f"--rounds={args.rounds}",
                    f"--workers={args.workers}", f"--shard-size={args.shard_size}"], check=True)


if __name__ == "__main__":
    main()
