"""Loaders, samplers and devices: one way to batch a split, for training and evaluation alike.

Each epoch's order comes from a generator seeded by (seed, stage, epoch), and can start part-way
through (a mid-epoch checkpoint resumes at its step). Under torch.distributed each rank loads its
share of every global batch (training) or a contiguous share of the split (evaluation, rank 0
gathers and scores).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from corex.errors import CorexError
from corex.schema import Recipe, Stage
from corex.seeding import seed_worker, stage_seed

# Tolerance of the first-batch intensity check: resampling may overshoot [0, 1] a little.
INTENSITY_SLACK = 0.05


class EpochOrder(torch.utils.data.Sampler[int]):
    """One epoch's shuffled order, fixed by ``seed``, starting ``start`` samples in: a run resumed in
    the middle of an epoch sees exactly the samples the interrupted one had still to see.

    Under torch.distributed each global batch of ``batch`` samples is cut into ``world`` equal
    slices and rank ``rank`` takes its slice: together the ranks see the batches a single process
    would (the ragged end that would not fill a global batch is dropped)."""

    def __init__(self, size: int, seed: int, start: int = 0, *, rank: int = 0, world: int = 1, batch: int = 1):
        self.size, self.seed, self.start = size, seed, start
        self.rank, self.world, self.batch = rank, world, batch

    def _indices(self) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed))[self.start:].tolist()
        if self.world == 1:
            return order
        share = self.batch // self.world
        return [i for b in range(len(order) // self.batch) for i in order[b * self.batch + self.rank * share:][:share]]

    def set_epoch(self, seed: int, start: int = 0) -> None:
        """The next epoch's order (a loader with persistent workers keeps its sampler)."""
        self.seed, self.start = seed, start

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        remaining = max(0, self.size - self.start)
        return remaining if self.world == 1 else remaining // self.batch * (self.batch // self.world)


class RankShard(torch.utils.data.Sampler[int]):
    """This rank's contiguous share of an evaluation split: in rank order the shares are the whole
    split, each sample once (rank 0 gathers the predictions and scores them)."""

    def __init__(self, size: int, rank: int, world: int):
        share = -(-size // world)
        self.indices = range(min(size, rank * share), min(size, (rank + 1) * share))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int, device: torch.device, start_batch: int = 0,
                rank: int = 0, world: int = 1) -> DataLoader:
    """Batches in an order fixed by ``seed``; training loaders drop the ragged last batch.
    ``start_batch`` skips that many batches of a shuffled epoch without loading them. Under
    torch.distributed (``world`` > 1) ``batch_size`` is the global batch and this rank loads its
    share of each."""
    if shuffle:
        sampler = EpochOrder(len(dataset), seed, start_batch * batch_size, rank=rank, world=world, batch=batch_size)
    else:
        sampler = RankShard(len(dataset), rank, world) if world > 1 else None
    per_rank = batch_size // world if shuffle else batch_size
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        drop_last=shuffle and world == 1 and len(dataset) >= batch_size,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # the workers' seeds
        worker_init_fn=seed_worker,
        persistent_workers=shuffle and num_workers > 0,  # a stage's loader lives for all its epochs
        pin_memory=device.type == "cuda",
    )


def steps_per_epoch(images: int, batch: int, cap: int | None = None) -> int:
    """Optimisation steps an epoch of ``images`` takes at global batch ``batch`` (the ragged end is
    dropped; a split smaller than one batch is one step), at most ``cap``."""
    steps = images // batch if images >= batch else 1
    return steps if cap is None else min(steps, cap)


@attrs.frozen
class StagePlan:
    """How long a training stage runs: its epochs, the optimisation steps of a full epoch, and in all."""

    epochs: int
    steps_per_epoch: int
    total_steps: int

    def steps_in(self, epoch: int) -> int:
        """Optimisation steps of ``epoch`` (from 1): a full epoch, or what is left of a step budget."""
        return max(0, min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch))


def stage_plan(stage: Stage, per_epoch: int) -> StagePlan:
    """``stage.epochs`` full epochs of ``per_epoch`` steps, or, with a ``steps`` budget, exactly that many steps."""
    if stage.steps is None:
        return StagePlan(stage.epochs, per_epoch, per_epoch * stage.epochs)
    return StagePlan(-(-stage.steps // per_epoch), per_epoch, stage.steps)


def stage_loader(recipe: Recipe, stage: Stage, source: Any, split: str, device: torch.device, *, shuffle: bool,
                 label_fraction: float = 1.0, epoch: int = 0, start_batch: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    """The loader of ``split`` for ``stage``: its data, batch size, workers and seed. Training
    (``shuffle``) needs the global batch to divide by the ``world`` processes; with ``world`` > 1 an
    evaluation loader gives this rank its share of the split."""
    dataset = source.split(split, label_fraction=label_fraction)
    if len(dataset) == 0:
        raise CorexError(f"stages.{stage.name}: the '{split}' split of data '{recipe.stage_data(stage).name}' is empty")
    batch = recipe.stage_batch_size(stage)
    if shuffle and batch % world:
        raise CorexError(f"stages.{stage.name}.batch_size: the global batch of {batch} must divide by the {world} processes")
    return make_loader(dataset, batch, shuffle=shuffle, seed=stage_seed(recipe.seed, stage.name, epoch),
                       num_workers=recipe.stage_data(stage).num_workers, device=device, start_batch=start_batch, rank=rank, world=world)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's own message lists twenty device types and ends in a traceback
        raise CorexError(f"device: expected auto, cpu, cuda, cuda:N (a GPU index) or mps, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CorexError(f"device: '{name}' was asked for, but this machine has no CUDA device (use device: auto or cpu)")
    return device


def to_device(batch: Mapping[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value.to(device, non_blocking=True)
            if key == "image" and channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def check_intensities(batch: Mapping[str, Any], where: str) -> None:
    """Refuse a first batch far outside [0, 1]: wrong normalisation silently ruins a model."""
    image = batch.get("image")
    if not isinstance(image, Tensor) or image.dim() != 4:
        raise CorexError(f"{where}: a batch must hold 'image' as a (B, C, H, W) tensor, got {type(image).__name__} {getattr(image, 'shape', '')}")
    if not torch.isfinite(image).all():
        raise CorexError(f"{where}: the first batch holds NaN or infinite intensities")
    low, high = image.min().item(), image.max().item()
    if low < -INTENSITY_SLACK or high > 1 + INTENSITY_SLACK:
        raise CorexError(
            f"{where}: the first batch has intensities in [{low:.3g}, {high:.3g}], but corex expects [0, 1] "
            "(0 = air, 1 = dense; see corex/interfaces.py). The dataset's normalisation is wrong."
        )


def autocast_dtype(stage: Stage, device: torch.device) -> torch.dtype | None:
    """Mixed precision where the device supports it: bf16 on recent GPUs, else fp16; off on CPU."""
    if stage.amp == "off":
        return None
    if stage.amp == "bf16":
        return torch.bfloat16
    if stage.amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # CPU autocast is slower than float32 on most CPUs


__all__ = ["EpochOrder", "INTENSITY_SLACK", "RankShard", "StagePlan", "autocast_dtype", "stage_plan", "check_intensities", "make_loader", "resolve_device",
           "stage_loader", "steps_per_epoch", "to_device"]
