"""Supervised training throughput of corex's encoders (run by hand; not a test).

    python benchmarks/bench_train.py [--encoders resnet18 resnet50] [--size 224] [--batch 32]
                                     [--amp off bf16 fp16] [--device auto] [--rounds 5]

Builds what ``corex run`` builds for a classification stage (the registered encoder at its standard
width, one input channel, the classification head, AdamW) and times full training steps (forward,
loss, backward, optimizer step) on random images, as the engine runs them: ``channels_last``,
autocast in the given ``amp`` dtype on CUDA (fp16 with a gradient scaler), float32 on the CPU.
Prints the median images/s over ``rounds`` timed blocks of ``steps`` steps (after warm-up), with the
device's name (the GPU's, or the processor's from /proc/cpuinfo).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from corex import Component, assemble_model
from corex.plugins import Registry

NUM_CLASSES = 4


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    return platform.processor() or "unknown CPU"


def images_per_second(encoder: str, size: int, batch: int, amp: str, device: torch.device, steps: int, rounds: int) -> float:
    torch.manual_seed(0)
    heads = {"classification": (Component("classification"), "stages.train.heads.classification")}
    model = assemble_model(Component(encoder, {"in_channels": 1}), heads, NUM_CLASSES, Registry()).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    head = model.heads["classification"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    use_amp = dtype is not None and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    images = torch.rand(batch, 1, size, size, device=device).to(memory_format=torch.channels_last)
    batch_dict = {"image": images, "label": torch.randint(0, NUM_CLASSES, (batch,), device=device)}

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=use_amp):
            logits = model(batch_dict["image"], ["classification"])["classification"]
        loss = head.loss(logits.float(), batch_dict)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        step()
    synchronise()
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronise()
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--amp", nargs="+", default=["off", "bf16", "fp16"], choices=["off", "bf16", "fp16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block (default 20 on CUDA, 2 on the CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    amps = args.amp if device.type == "cuda" else ["off"]
    print(f"device: {device_name(device)}; torch {torch.__version__}; {args.size}x{args.size}, 1 channel, batch {args.batch}, "
          f"channels_last; median of {args.rounds} blocks of {steps} steps", flush=True)
    print("| encoder | amp | images/s |\n|---|---|---|", flush=True)
    for encoder in args.encoders:
        for amp in amps:
            rate = images_per_second(encoder, args.size, args.batch, amp, device, steps, args.rounds)
            print(f"| {encoder} | {amp} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
