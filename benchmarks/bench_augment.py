"""Throughput of the corex_kornia pipelines (run by hand; not a test).

    python benchmarks/bench_augment.py [--batch 32] [--size 256] [--repeats 7]

Times every named pipeline on a (batch, 1, size, size) image batch with its mask, on the CPU and,
where torch sees one, on CUDA; prints the median over ``repeats`` timed runs (after two warm-up
runs) as images per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from corex_kornia import cxr_light, kornia_pipeline, moco_cxr, mocov2
from corex_kornia.augmentation import NoAugmentation

PIPELINES = {
    "none": NoAugmentation,
    "cxr_light": cxr_light,
    "moco_cxr": moco_cxr,
    "mocov2": mocov2,
    "kornia (affine + flip)": lambda: kornia_pipeline(
        ops=[{"RandomAffine": {"degrees": 10, "p": 1.0}}, "RandomHorizontalFlip"]
    ),
}


def batch_on(device: torch.device, batch_size: int, size: int) -> dict:
    image = torch.rand(batch_size, 1, size, size, device=device)
    mask = (image > 0.7).float()
    return {"image": image, "mask": mask, "label": torch.zeros(batch_size, dtype=torch.long)}


def median_seconds(augment, batch: dict, device: torch.device, repeats: int) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        augment(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.no_grad():
        once(), once()  # warm-up: kernel selection, per-size pipeline construction
        return statistics.median(once() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"batch {args.batch}x1x{args.size}x{args.size} with mask, median of {args.repeats}")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n{name}")
        batch = batch_on(device, args.batch, args.size)
        for label, factory in PIPELINES.items():
            seconds = median_seconds(factory(), batch, device, args.repeats)
            rate = args.batch / seconds
            print(f"  {label:<24} {seconds * 1000:9.1f} ms/batch  {rate:10.0f} images/s")


if __name__ == "__main__":
    main()
