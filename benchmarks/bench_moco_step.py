"""MoCo's pre-training step against a supervised step of the same encoder (run by hand; not a test).

    python benchmarks/bench_moco_step.py [--recipe recipes/moco_cxr.yaml] [--steps 8] [--rounds 9]

Builds, in one process, what ``corex run`` builds for the recipe: its encoder, the pretrain stage's
augmentation and MoCo objective, and a supervised classification step (the same encoder, trained
with the recipe's classification head, the same augmentation and batch), each with its own Adam.
A step is what the engine's training loop does: loss, zero_grad, backward, optimizer step, and the
logged scalars summed on the device.

Both steps see the same batches (random images with a mask and labels, as the phantom's loader
gives them; cost does not depend on the pixel values). After warm-up they are timed alternately,
``steps`` steps at a time, for ``rounds`` rounds (the order flipped every round), because the
machine may be shared: the figures are medians over rounds, and the ratio is the median of each
round's paired ratio; the ratio of the fastest rounds and the process CPU-time ratio are printed
too, as checks on a loaded machine. The load average is printed before and after.

The arithmetic ratio counts FLOPs with torch.utils.flop_counter.FlopCounterMode over one whole
step of each (forward, backward and optimizer step): it counts matrix products and convolutions
(forward and backward), not batch norm, element-wise ops, the augmentation's resampling or the
optimizer's updates. So it is the ratio of the arithmetic that dominates: a query forward and
backward plus a key forward for MoCo, against a forward and backward.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from corex.build import build_augment, build_component, build_model, build_optimizer as make_optimizer
from corex.plugins import Registry
from corex.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4


def make_batches(count: int, batch_size: int, size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        coarse = torch.rand(batch_size, 1, size // 8, size // 8, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        batches.append({
            "image": image,
            "mask": (image > 0.7).float(),
            "has_mask": torch.ones(batch_size, dtype=torch.bool),
            "label": torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
        })
    return batches


def engine_step(loss_and_logs: Callable[[dict], tuple[torch.Tensor, dict]], optimizer: torch.optim.Optimizer) -> Callable[[dict], None]:
    """One step as corex.engine's training loop runs it (fp32 on the CPU: no autocast, no scaler)."""
    sums: dict[str, torch.Tensor] = {}

    def step(batch: dict) -> None:
        loss, logs = loss_and_logs(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = batch["image"].shape[0]
        for key, value in {"train/loss": loss, **logs}.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() * n

    return step


def build_steps(recipe_path: Path, batch_size: int, dataset_size: int) -> dict[str, Callable[[dict], None]]:
    registry = Registry()
    recipe = load_recipe(recipe_path, [f"data.batch_size={batch_size}"], registry=registry)
    pretrain = next(s for s in recipe.stages.values() if s.kind == "pretrain")
    head_stage = next(s for s in recipe.stages.values() if "classification" in s.heads)
    optimizer_spec = recipe.stage_optimizer(pretrain)

    torch.manual_seed(recipe.seed)
    moco_model = build_model(recipe, NUM_CLASSES, registry)
    supervised_model = copy.deepcopy(moco_model)  # same initial weights

    encoder = moco_model.encoder
    objective = build_component(
        registry, "objectives", pretrain.objective, f"stages.{pretrain.name}.objective",
        encoder=encoder, channels=tuple(encoder.channels), strides=tuple(encoder.strides),
        batch_size=batch_size, dataset_size=dataset_size,
    ).train()
    moco_augment = build_augment(pretrain, registry)
    moco_params = [p for p in objective.parameters() if p.requires_grad]

    def moco_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        out = objective(batch, moco_augment)
        return out["loss"], {f"train/{k}": v for k, v in out.items() if k != "loss"}

    supervised_model.train()
    supervised_augment = build_augment(pretrain, registry)
    head = supervised_model.heads["classification"]
    supervised_params = list(supervised_model.encoder.parameters()) + list(head.parameters())

    def supervised_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            batch = supervised_augment(batch)
        logits = supervised_model(batch["image"], ["classification"])["classification"]
        return head_stage.heads["classification"].weight * head.loss(logits, batch), {}

    return {
        "supervised": engine_step(supervised_loss, make_optimizer(supervised_params, optimizer_spec)),
        "moco": engine_step(moco_loss, make_optimizer(moco_params, optimizer_spec)),
    }


def count_flops(step: Callable[[dict], None], batch: dict) -> int:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def timed(step: Callable[[dict], None], batches: list[dict]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for one step on each batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        step(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "moco_cxr.yaml")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dataset-size", type=int, default=450, help="only for MoCo's queue check")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, as the engine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    steps = build_steps(args.recipe, args.batch, args.dataset_size)
    batches = make_batches(args.steps, args.batch, args.size)

    torch.manual_seed(1)
    flops = {name: count_flops(step, batches[0]) for name, step in steps.items()}
    for step in steps.values():
        for batch in batches[: args.warmup]:
            step(batch)

    rates: dict[str, list[float]] = {name: [] for name in steps}
    cpu_ms: dict[str, list[float]] = {name: [] for name in steps}
    ratios, cpu_ratios = [], []
    names = list(steps)
    for round_ in range(args.rounds):
        wall, cpu = {}, {}
        for name in names if round_ % 2 == 0 else reversed(names):
            wall[name], cpu[name] = timed(steps[name], batches)
            rates[name].append(len(batches) * args.batch / wall[name])
            cpu_ms[name].append(1000 * cpu[name] / len(batches))
        ratios.append(wall["moco"] / wall["supervised"])
        cpu_ratios.append(cpu["moco"] / cpu["supervised"])
    load_after = os.getloadavg()

    arithmetic = flops["moco"] / flops["supervised"]
    measured = statistics.median(ratios)
    print(f"recipe {args.recipe.name}: batch {args.batch}x1x{args.size}x{args.size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"timing: {args.rounds} rounds x {args.steps} steps of each, interleaved; medians over rounds")
    print(f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}")
    print()
    print(f"{'step':<12}{'images/s':>10}{'range':>18}{'CPU ms/step':>13}{'GFLOP/step':>12}")
    for name in names:
        r = rates[name]
        print(f"{name:<12}{statistics.median(r):>10.1f}{f'{min(r):.1f}-{max(r):.1f}':>18}"
              f"{statistics.median(cpu_ms[name]):>13.1f}{flops[name] / 1e9:>12.3f}")
    print()
    print(f"measured time ratio moco/supervised   {measured:.3f}  (per-round {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"ratio of the fastest rounds           {max(rates['supervised']) / max(rates['moco']):.3f}  (least disturbed by other processes)")
    print(f"CPU-time ratio (all threads)          {statistics.median(cpu_ratios):.3f}  (robust to other processes' load with --threads 1)")
    print(f"arithmetic ratio (conv+matmul FLOPs)  {arithmetic:.3f}")
    print(f"measured / arithmetic                 {measured / arithmetic:.3f}")


if __name__ == "__main__":
    main()
