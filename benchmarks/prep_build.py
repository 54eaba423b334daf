"""How fast is `sdtune prep build` next to the plain loop anyone would write?

    python benchmarks/prep_build.py --n 1000 --size 768
    python benchmarks/prep_build.py --n 300 --size 768 --max-side 512   # every image resized and re-encoded

Generates N random-ish JPEGs (smooth colour fields + noise, quality 90) in a temporary folder, then times on the
same files: (a) a plain loop, PIL open -> convert("RGB") -> resize (only if --max-side asks) -> save to another
folder; (b) `build_dataset` with 1 worker; (c) with 2 workers. Build does more than the loop: full decode and
validation, EXIF orientation, pixel and perceptual hashes, duplicate lookups, captions, buckets, metadata and report.
Files are read before each run so every run starts with a warm page cache; each is run --repeat times and the
fastest counts. The build's import time (sdtune.data
pulls in Lightning) is reported separately: it is paid once per command, not per image.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing


def generate(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """N JPEGs: a bicubic-upscaled random 5x5 colour field plus Gaussian noise, so they compress like photos."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        noisy = np.asarray(field, dtype=np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
        path = folder / f"{i // 100:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def plain_loop(src: Path, paths: list[Path], out: Path, max_side: int | None) -> None:
    for path in paths:
        image = Image.open(path).convert("RGB")
        if max_side and max(image.size) > max_side:
            scale = max_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        target = out / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)


def warm(paths: list[Path]) -> None:
    for path in paths:
        path.read_bytes()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, Pillow {Image.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of images (default: 1000)")
    parser.add_argument("--size", type=int, default=768, help="image side in pixels (default: 768)")
    parser.add_argument("--max-side", type=int, default=None, help="resize in both loop and build (default: none)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="build worker counts (default: 1 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, the fastest counts (default: 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    started = time.perf_counter()
    from data_prep.build import build_dataset  # timed: the CLI pays these once per command
    importlib.import_module("sdtune.data.buckets")  # build imports it on first use; it drags in sdtune.data

    import_seconds = time.perf_counter() - started
    tmp = Path(tempfile.mkdtemp(prefix="prep_build_bench_"))
    try:
        src = tmp / "src"
        print(f"generating {args.n} {args.size}px JPEGs in {src} ...", file=sys.stderr)
        paths = generate(src, args.n, args.size)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        warm(paths)

        def best_of(run) -> float:
            """The fastest of --repeat runs: the other sessions on a shared machine only ever add time."""
            times = []
            for attempt in range(args.repeat):
                warm(paths)
                out = tmp / f"out_{attempt}"
                start = time.perf_counter()
                run(out)
                times.append(time.perf_counter() - start)
                shutil.rmtree(out)
            return min(times)

        def build(workers: int):
            def run(out: Path) -> None:
                result = build_dataset(src, out, min_side=8, max_side=args.max_side, workers=workers, progress=False)
                assert result.kept == args.n, (result.kept, result.rejected[:3])

            return run

        plain = best_of(lambda out: plain_loop(src, paths, out, args.max_side))
        rows = [("plain loop (open, convert, save)", plain)]
        rows += [(f"prep build --workers {workers}", best_of(build(workers))) for workers in args.workers]

        resize = f", --max-side {args.max_side}" if args.max_side else ""
        print(f"\n{args.n} JPEGs, {args.size}x{args.size}, quality 90, {megabytes:.0f} MB{resize}; "
              f"best of {args.repeat}; {machine()}")
        print("| run | seconds | images/s | vs plain loop |")
        print("|---|---:|---:|---:|")
        for name, seconds in rows:
            print(f"| {name} | {seconds:.2f} | {args.n / seconds:.0f} | {plain / seconds:.2f}x |")
        print(f"\nimport data_prep.build + sdtune.data (once per command): {import_seconds:.1f} s")
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
