"""What the run-time contract checks cost on the quickstart (corex/checks.py).

    python benchmarks/bench_checks.py

The checks run once per stage (the first training step) and once per evaluation (the first batch);
the `blame` guards that name a plugin when it raises run on every step. This times both on a batch
of the quickstart's own data and model and sets them against the measured time of one training step
and the quickstart's counts (1 training stage, 10 validations, 1 test evaluation, 350 steps).
Prints the processor, the medians of repeated timings, and the share of a quickstart run.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

import corex
from corex.build import build_augment, build_data
from corex.checks import Culprit, blame, check_augmented, check_batch, check_head_output, check_loss
from corex.loaders import to_device

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    recipe = corex.load_recipe(ROOT / "recipes" / "quickstart.yaml")
    source = build_data(recipe)
    loader = corex.make_loader(source.split("train"), batch_size=recipe.data.batch_size, shuffle=True)
    raw = next(iter(loader))
    stage = recipe.stages["train"]
    augment = build_augment(stage, corex.plugins.Registry())
    model = corex.build_model(recipe, len(source.class_names))
    model.train()
    batch = to_device(raw, torch.device("cpu"), True)
    culprit = Culprit("component", "path", "section")
    with torch.no_grad():
        augmented = augment(batch)
    outputs = model(augmented["image"])
    losses = {h: model.heads[h].loss(outputs[h], augmented) for h in model.heads}

    def first_step_checks() -> None:
        check_batch(raw, culprit, len(source.class_names))
        check_augmented(batch, augmented, culprit)
        for h, head in model.heads.items():
            check_head_output(outputs[h], head.task, augmented["image"], len(source.class_names), culprit)
            check_loss(losses[h], culprit, "loss")

    def guards() -> None:  # what every training step adds: one guard per component it calls
        for _ in range(1 + 1 + len(model.heads) * 2):
            with blame(culprit, "step"):
                pass

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.no_grad():
            b = augment(batch)
        out = model(b["image"])
        loss = sum(model.heads[h].loss(out[h], b) for h in model.heads)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    checks = median_seconds(first_step_checks, 50)
    guard = median_seconds(guards, 2000)
    step_time = median_seconds(step, 15)
    steps, evaluations = 350, 11
    total_checks = checks * (1 + evaluations) + guard * steps
    run_seconds = step_time * steps
    print(f"processor: {processor()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"first-step checks (batch of {raw['image'].shape[0]} at {raw['image'].shape[-1]} px): {checks * 1e3:.2f} ms (median of 50)")
    print(f"guards of one step: {guard * 1e6:.1f} us (median of 2000)")
    print(f"one training step: {step_time * 1e3:.0f} ms (median of 15)")
    print(f"quickstart ({steps} steps, {evaluations} evaluations): checks {total_checks * 1e3:.1f} ms against "
          f"{run_seconds:.0f} s of training steps = {100 * total_checks / run_seconds:.3f}%")


if __name__ == "__main__":
    main()
