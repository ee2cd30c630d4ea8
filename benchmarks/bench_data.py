"""How fast corex_cxr turns radiographs into batches, beside how fast a model eats them.

Run by hand (a few minutes on 2 CPU cores)::

    python benchmarks/bench_data.py                 # 2048 px sources, 256 px working size
    python benchmarks/bench_data.py --source-size 1024 --studies 100

Prints four figures, all on this machine:

1. DICOM decode rate: ``read_dicom`` + ``resize_pad`` of ``--source-size`` square 12-bit
   radiographs, uncompressed and JPEG 2000 lossless, one process;
2. cache build rate: ``build_cache`` of those files with one worker per CPU;
3. cached loader throughput: a SIIM source over the synthetic phantom, ``DataLoader`` with batch
   16 and 0 or 2 worker processes, images/s;
4. the training step: ResNet-18 (corex_encoders, one input channel, channels_last) plus a linear
   classifier, batch 16 at the working size, forward + backward + SGD step, images/s.

The cached loader should deliver at least 5x the training step's images/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from torch import nn
from torch.utils.data import DataLoader

from corex_cxr import SiimSource
from corex_cxr.cache import build_cache
from corex_cxr.dicom import read_dicom, resize_pad, write_dicom
from corex_cxr.phantom import render_study, write_siim_phantom
from corex_encoders import resnet18


def write_sources(folder: Path, count: int, size: int) -> dict[str, list[Path]]:
    """``count`` phantom radiographs upsampled to ``size`` px with detector noise, 12-bit, each
    written uncompressed and as JPEG 2000 lossless."""
    folder.mkdir(parents=True)
    files: dict[str, list[Path]] = {"uncompressed": [], "jpeg2000": []}
    for index in range(count):
        rng = np.random.default_rng(index)
        small, _ = render_study(rng, label=index % 4, size=256)
        large = np.asarray(Image.fromarray(small.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))
        noisy = np.clip(large + rng.normal(0, 0.01, large.shape), 0, 1)
        stored = np.rint(noisy * 4095).astype(np.uint16)
        for kind, syntax in (("uncompressed", ExplicitVRLittleEndian), ("jpeg2000", JPEG2000Lossless)):
            path = folder / f"{kind}-{index}.dcm"
            files[kind].append(write_dicom(path, stored, bits_stored=12, transfer_syntax=syntax))
    return files


def decode_rate(paths: list[Path], size: int) -> float:
    start = time.perf_counter()
    for path in paths:
        image, _ = read_dicom(path)
        resize_pad(image, size)
    return len(paths) / (time.perf_counter() - start)


def loader_rate(dataset, workers: int, batches: int) -> float:
    loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    next(iter(loader))  # start the workers and open the memory map before timing
    seen, start = 0, time.perf_counter()
    while seen < batches * 16:
        for batch in loader:
            seen += len(batch["image"])
            if seen >= batches * 16:
                break
    return seen / (time.perf_counter() - start)


def training_rate(size: int, steps: int) -> float:
    encoder = resnet18(in_channels=1)
    model = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(encoder.channels[-1], 4)})
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(16, 1, size, size).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (16,))

    def step() -> None:
        features = model["encoder"](images)[-1].mean(dim=(2, 3))
        loss = nn.functional.cross_entropy(model["head"](features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * 16 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source-size", type=int, default=2048, help="side of the DICOMs to decode")
    parser.add_argument("--decode-images", type=int, default=6, help="DICOMs per transfer syntax")
    parser.add_argument("--image-size", type=int, default=256, help="working resolution")
    parser.add_argument("--studies", type=int, default=200, help="phantom studies for the loader")
    parser.add_argument("--batches", type=int, default=60, help="batches timed per loader setting")
    parser.add_argument("--steps", type=int, default=4, help="training steps timed")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        files = write_sources(scratch / "sources", args.decode_images, args.source_size)
        for kind, paths in files.items():
            rate = decode_rate(paths, args.image_size)
            print(f"decode {args.source_size}px {kind:>12} -> {args.image_size}px: {rate:8.2f} images/s (1 process)")

        everything = {path.stem: path for paths in files.values() for path in paths}
        start = time.perf_counter()
        build = build_cache(scratch / "cache", everything, args.image_size, progress=False)
        rate = build.decoded / (time.perf_counter() - start)
        sizes = f"{args.source_size}px mixed -> {args.image_size}px"
        print(f"cache build, {sizes}: {rate:8.2f} images/s ({os.cpu_count()} workers)")

        root = write_siim_phantom(scratch / "phantom", studies=args.studies, size=2 * args.image_size, progress=False)
        data = SiimSource(
            root=root, image_size=args.image_size, cache_dir=scratch / "cache", val_fraction=0.0, test_fraction=0.0
        )
        start = time.perf_counter()
        build = data.prepare()
        rate = build.decoded / (time.perf_counter() - start)
        print(f"cache build, phantom {2 * args.image_size}px -> {args.image_size}px: {rate:8.2f} images/s")

        train = data.split("train")
        loader = {workers: loader_rate(train, workers, args.batches) for workers in (0, 2)}
        for workers, rate in loader.items():
            print(f"cached loader {args.image_size}px, batch 16, {workers} workers: {rate:10.1f} images/s")

        step = training_rate(args.image_size, args.steps)
        print(f"training step ResNet-18 {args.image_size}px, batch 16:    {step:10.1f} images/s")
        print(f"loader / training step: {min(loader.values()) / step:.0f}x (needs >= 5x)")


if __name__ == "__main__":
    main()
