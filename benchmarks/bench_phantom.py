"""Speed of the synthetic phantom (run by hand; not a test).

    python benchmarks/bench_phantom.py [--size 256] [--images 200] [--studies 200] [--montage PATH]

Prints images per second for ``render_study`` alone and for ``write_siim_phantom`` (rendering plus
DICOM and CSV writing), both by wall clock and by this process's CPU time: on a shared machine the
CPU-time figure is the one that does not depend on the neighbours. With ``--montage`` it also saves
one example per class (same patient, difficulty 0.3) with its boxes, to look at.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from corex_cxr.phantom import CLASS_COLUMNS, render_study, write_siim_phantom


def seconds(work) -> tuple[float, float]:
    """Wall-clock and CPU seconds that ``work()`` takes."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def render_many(count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        render_study(rng, i % len(CLASS_COLUMNS), size, 0.5)


def save_montage(path: Path, size: int, seed: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    figure, axes = plt.subplots(1, len(CLASS_COLUMNS), figsize=(4 * len(CLASS_COLUMNS), 4.4))
    for label, (axis, name) in enumerate(zip(axes, CLASS_COLUMNS)):
        image, boxes = render_study(np.random.default_rng(seed), label, size, difficulty=0.3)
        axis.imshow(image, cmap="gray", vmin=0, vmax=1)
        for x, y, width, height in boxes:
            axis.add_patch(Rectangle((x, y), width, height, fill=False, edgecolor="red", linewidth=1))
        axis.set_title(name)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    print(f"montage: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=200, help="images rendered for render_study")
    parser.add_argument("--studies", type=int, default=200, help="studies written by write_siim_phantom")
    parser.add_argument("--montage", type=Path, help="save one example per class here (PNG)")
    args = parser.parse_args()

    render_study(np.random.default_rng(0), 1, args.size)  # warm-up
    wall, cpu = seconds(lambda: render_many(args.images, args.size))
    n = args.images
    print(f"render_study        {args.size}px: {n / wall:7.1f} images/s wall, {n / cpu:7.1f} images/s CPU")

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "phantom"
        wall, cpu = seconds(
            lambda: write_siim_phantom(out, studies=args.studies, size=args.size, progress=False)
        )
        n = len(list(out.glob("train/*/*/*.dcm")))
        print(
            f"write_siim_phantom  {args.size}px: {n / wall:7.1f} images/s wall, {n / cpu:7.1f} images/s CPU"
            f" ({args.studies} studies, {n} images)"
        )

    if args.montage:
        save_montage(args.montage, args.size)


if __name__ == "__main__":
    main()
