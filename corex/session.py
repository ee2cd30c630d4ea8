"""What the stages of one run share: the recipe, the model, the data, the run directory's logs.

The engine opens a :class:`Session` once the run directory is decided and the components are
built; :mod:`corex.training` and :mod:`corex.evaluation` run each stage against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch.utils.data import DataLoader

from corex import checkpoints, distributed, rundir
from corex.context import RunContext
from corex.loaders import stage_loader
from corex.model import CorexModel, load_encoder_file
from corex.plugins import Registry
from corex.progress import format_duration, log
from corex.schema import Recipe, Stage
from corex.seeding import rng_state, seed_everything, set_rng_state


@attrs.define
class Eta:
    """The whole run's remaining training time, from the step rate seen so far."""

    planned: dict[str, int] = attrs.field(factory=dict)  # stage -> optimisation steps
    steps_done: int = 0
    seconds: float = 0.0

    def __call__(self) -> str:
        if self.steps_done == 0 or self.seconds <= 0:
            return "run eta ?"
        remaining = max(0, sum(self.planned.values()) - self.steps_done)
        return f"run eta {format_duration(remaining * self.seconds / self.steps_done)}"


@attrs.define
class Session:
    recipe: Recipe
    out: Path
    device: torch.device
    registry: Registry
    model: CorexModel
    source: Any
    stage_sources: dict[str, Any]
    results: dict[str, Any]
    resume: bool
    flags: Mapping[str, str]
    quiet: bool
    metrics: rundir.MetricsLog = attrs.field(init=False)
    context: RunContext = attrs.field(init=False)  # what observers are handed, one object for the whole run
    eta: Eta = attrs.field(factory=Eta)
    rank: int = attrs.field(factory=distributed.rank)
    world: int = attrs.field(factory=distributed.world_size)

    def __attrs_post_init__(self) -> None:
        self.metrics = rundir.MetricsLog(self.out / "metrics.jsonl")
        self.context = RunContext(self.recipe, self.out, self.device, self.registry)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    @property
    def hook(self) -> Any:
        return self.registry.pm.hook

    def source_of(self, stage: Stage) -> Any:
        return self.stage_sources.get(stage.name, self.source)

    def loader(self, stage: Stage, split: str, *, shuffle: bool, label_fraction: float = 1.0, epoch: int = 0, start_batch: int = 0) -> DataLoader:
        return stage_loader(self.recipe, stage, self.source_of(stage), split, self.device, shuffle=shuffle, label_fraction=label_fraction,
                            epoch=epoch, start_batch=start_batch, rank=self.rank, world=self.world)

    def head_weights(self, stage: Stage) -> dict[str, float]:
        """Each head's weight from the latest train stage so far that defines it, as it was trained."""
        weights: dict[str, float] = {}
        for earlier in self.recipe.stages.values():
            weights.update({h: head.weight for h, head in earlier.heads.items()})
            if earlier.name == stage.name:
                break
        return weights

    def progress_desc(self, text: str) -> str | None:
        """A progress label, or None where no progress is shown (quiet, or not rank 0)."""
        return None if self.quiet or not self.main else text

    # Random state ---------------------------------------------------------------------------------

    def rng_states(self) -> dict[str, Any]:
        """This rank's RNG state and, under torch.distributed, every rank's (gathered on all ranks)."""
        state = rng_state()
        return {"rng": state, "rng_ranks": distributed.gather(state), "world_size": self.world}

    def set_rng(self, payload: Mapping[str, Any]) -> None:
        ranks = payload.get("rng_ranks")
        if ranks and len(ranks) == self.world:
            set_rng_state(ranks[self.rank])
            return
        set_rng_state(payload["rng"])
        if self.rank:  # written by another number of processes: each rank still draws its own
            seed_everything(self.recipe.seed + 7919 * self.rank + int(payload.get("epoch", 0)), self.recipe.deterministic)

    def start_encoder(self, stage: Stage) -> None:
        """Load ``stage.encoder_from`` (an earlier stage's model, or a file) into the encoder."""
        source = stage.encoder_from
        if source is None:
            return
        where = f"stages.{stage.name}.encoder_from"
        path = self.out / "checkpoints" / source / "model.pt" if source in self.recipe.stages else Path(source).expanduser()
        load_encoder_file(path, self.model.encoder, where)
        log(f"[{stage.name}] encoder initialised from {source}")

    def load_model(self, path: Path, where: str) -> dict[str, Any]:
        payload = checkpoints.load_checkpoint(path, where, map_location=self.device)
        checkpoints.load_state(self.model, payload["model"], path, where)
        return payload


__all__ = ["Eta", "Session"]
