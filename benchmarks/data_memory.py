"""Peak memory of the video DataModule over folders of N and 4N video files: eager vs lazy decoding.

Small clips are generated with PyAV (`datamodules.media_io.write_video` of moving-shapes frames, as
in the tests): N distinct files, the 4N folder holding 4 copies of each (so only N are encoded).
Each (decode, folder) case builds the DataModule, runs setup and iterates one epoch of the train
loader; `growth_mb` is its peak RSS minus the RSS just before setup. Peak RSS is the kernel's
high-water mark (VmHWM), reset before each case through /proc/self/clear_refs (Linux), so the cases
run in this process one after another; where that is unavailable, or with DataLoader workers
(--num-workers > 0, or --isolate), each case runs in a fresh Python process and the peak is
`resource.getrusage` ru_maxrss (of that process and, separately, of its largest worker). Eager
decoding grows by about the decoded data (num_files x item_bytes, up to twice that while the
items are concatenated); lazy decoding should not grow with the number of files.

    python benchmarks/data_memory.py              # prints one JSON object
    python benchmarks/data_memory.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
from pathlib import Path
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1024 * 1024


def _maxrss_bytes(who: int) -> int:
    kb = resource.getrusage(who).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # bytes on macOS, KiB on Linux


def _status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_memory() -> None:
    gc.collect()
    try:  # give freed heap back to the OS (glibc), so one case's garbage is not the next one's baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def write_clips(root: Path, n: int, copies: int, frames: int, size: int) -> Path:
    """root/clip_{i}_{c}.mp4 for i < n, c < copies: n distinct clips, each written once, then copied."""
    from datamodules.media_io import write_video
    from datamodules.synthetic_shapes import render_moving_shapes

    root.mkdir(parents=True, exist_ok=True)
    videos, _ = render_moving_shapes(n, frames, size, seed=0)
    for i in range(n):
        first = write_video(root / f"clip_{i:05d}_0.mp4", videos[i], fps=8)
        for c in range(1, copies):
            shutil.copyfile(first, root / f"clip_{i:05d}_{c}.mp4")
    return root


def measure(source: str, decode: str, num_frames: int, image_size: int, batch_size: int, num_workers: int) -> dict:
    """Setup + one train epoch; RSS just before setup and the peak after setup and after the epoch."""
    import torch

    from datamodules.media import VideoDataModule

    torch.set_num_threads(1)
    dm = VideoDataModule(source=source, decode=decode, num_frames=num_frames, image_size=image_size,
                         batch_size=batch_size, val_fraction=0.0, num_workers=num_workers)
    _release_memory()
    if reset_peak_rss():
        method = "VmHWM reset via /proc/self/clear_refs"

        def peak_now() -> int:
            return _status_bytes("VmHWM")

        before = _status_bytes("VmRSS")
    else:
        method = "ru_maxrss of a fresh process"

        def peak_now() -> int:
            return _maxrss_bytes(resource.RUSAGE_SELF)

        before = peak_now()
    t0 = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    after_setup = peak_now()
    items = 0
    checksum = 0.0
    t0 = time.perf_counter()
    for batch in dm.train_dataloader():
        items += len(batch)
        checksum += float(batch.pixels.double().sum())
    epoch_s = time.perf_counter() - t0
    peak = peak_now()
    workers_peak = _maxrss_bytes(resource.RUSAGE_CHILDREN) if num_workers else 0
    num_files = len(set(dm.item_sources["train"]))
    del dm, batch
    _release_memory()
    return {
        "decode": decode,
        "peak_method": method,
        "files": num_files,
        "items": items,
        "rss_before_setup_mb": before / MB,
        "peak_after_setup_mb": after_setup / MB,
        "peak_rss_mb": peak / MB,
        "setup_growth_mb": (after_setup - before) / MB,
        "growth_mb": (peak - before) / MB,
        "worker_peak_rss_mb": workers_peak / MB,
        "setup_s": setup_s,
        "epoch_s": epoch_s,
        "checksum": checksum,
    }


def _run_case(source: Path, decode: str, args: argparse.Namespace, isolate: bool) -> dict:
    if not isolate:
        return measure(str(source), decode, args.num_frames, args.size, args.batch_size, args.num_workers)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(source), "--decode", decode,
           "--num-frames", str(args.num_frames), "--size", str(args.size), "--batch-size", str(args.batch_size),
           "--num-workers", str(args.num_workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {decode} over {source} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="distinct clips; the large folder holds 4n files")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="frame height = width, written and served")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--dir", default=None, help="where to write the clips (default: a temporary folder)")
    p.add_argument("--isolate", action="store_true", help="measure every case in a fresh process (ru_maxrss)")
    p.add_argument("--quick", action="store_true", help="smoke run: n=4, 8 frames")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--decode", default="lazy", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure:
        out = measure(args.measure, args.decode, args.num_frames, args.size, args.batch_size, args.num_workers)
        print(json.dumps(out))
        return out

    if args.quick:
        args.n, args.num_frames = 4, 8
    tmp = None
    base = Path(args.dir) if args.dir else Path(tmp := tempfile.mkdtemp(prefix="data_memory_"))
    try:
        t0 = time.perf_counter()
        folders = {args.n: write_clips(base / f"n{args.n}", args.n, 1, args.num_frames, args.size),
                   4 * args.n: write_clips(base / f"n{4 * args.n}", args.n, 4, args.num_frames, args.size)}
        write_s = time.perf_counter() - t0
        isolate = args.isolate or args.num_workers > 0 or not reset_peak_rss()
        results = [_run_case(folder, decode, args, isolate)
                   for decode in ("lazy", "eager") for folder in folders.values()]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    item_bytes = args.num_frames * 3 * args.size * args.size  # uint8 clip as the eager DataModule stores it
    by = {(r["decode"], r["files"]): r for r in results}
    small, large = args.n, 4 * args.n
    growth = {d: by[(d, large)]["growth_mb"] - by[(d, small)]["growth_mb"] for d in ("eager", "lazy")}
    out = {
        "benchmark": "data_memory",
        "python": platform.python_version(),
        "settings": {"n": small, "num_frames": args.num_frames, "size": args.size, "batch_size": args.batch_size,
                     "num_workers": args.num_workers, "isolated_processes": isolate},
        "item_bytes": item_bytes,
        "decoded_mb_small": small * item_bytes / MB,
        "decoded_mb_large": large * item_bytes / MB,
        "write_s": write_s,
        "results": results,
        # extra peak memory of the 4N folder over the N folder: eager ~ (3N x item_bytes) or more, lazy ~ 0
        "growth_n_to_4n_mb": growth,
        "same_checksum_eager_lazy": all(by[("eager", k)]["checksum"] == by[("lazy", k)]["checksum"]
                                        for k in (small, large)),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
