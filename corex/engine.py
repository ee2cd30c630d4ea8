"""The stage runner: one model, the recipe's stages in order, checkpoints and resume.

The engine knows no architecture: it asks the registry for the components a recipe names, wires
them (encoder -> heads or objective), and runs the loop. Every stage sees the same model, so a
``train`` stage after a ``pretrain`` stage fine-tunes the pre-trained encoder.

Reproducibility: the seed fixes initialisation; each epoch's shuffling comes from a generator
seeded by (seed, stage, epoch) and the global RNG (augmentation, dropout) is saved with every
checkpoint, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from corex import checkpoints, contract, distributed, rundir
from corex.interfaces import Calibrated, EpochEndHook, HasIntervals, NeedsModel, Preparable, SavesArtefacts
from corex.binding import accepted_injections
from corex.context import RunContext
from corex.errors import CorexError, RecipeError, RunFailure
from corex.plugins import Registry, describe_plugins, get_plugin_manager
from corex.progress import Progress, format_duration, format_value
from corex.recipe import Component, Recipe, Stage
from corex.seeding import (
    _seed_worker,
    rng_state,
    seed_everything,
    set_rng_state,
    stage_seed,
    tune_allocator,
)

DEFAULT_CACHE = Path(os.environ.get("COREX_CACHE", "~/.cache/corex")).expanduser()
# Tolerance of the first-batch intensity check: resampling may overshoot [0, 1] a little.
INTENSITY_SLACK = 0.05
# Training losses are read back from the device (a synchronisation) once per this many steps.
SYNC_EVERY = 10


class CorexModel(nn.Module):
    """The shared encoder and every head the recipe defines."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, image: Tensor, heads: list[str] | None = None) -> dict[str, Tensor]:
        features = self.encoder(image)
        names = list(self.heads) if heads is None else heads
        return {name: self.heads[name](features) for name in names}


# -- building components ---------------------------------------------------------------------------


@contextlib.contextmanager
def _reported_as(path: str) -> Iterator[None]:
    """A plugin's ValueError or TypeError while building becomes a recipe problem at ``path``."""
    try:
        yield
    except CorexError:
        raise
    except (ValueError, TypeError) as exc:
        raise RecipeError([f"{path}: {exc}"]) from exc


def build_component(registry: Registry, kind: str, component: Component, path: str, **available: Any) -> Any:
    """Build a recipe component from its registered factory and hold it to its protocol
    (:mod:`corex.contract`): every missing member is one problem at ``path``."""
    registered = registry.get(kind, component.name)
    factory = registered.factory
    with _reported_as(path):
        built = factory(**accepted_injections(factory, available), **component.options)
    problems = contract.built_problems(kind, built, component_label(kind, component.name, registered.plugin), path)
    if problems:
        raise RecipeError(problems)
    return built


def component_label(kind: str, name: str, plugin: str) -> str:
    return f"{kind[:-1]} '{name}' (plugin '{plugin}')"


def objective_arguments(recipe: Recipe, stage: Stage, encoder: Any, dataset_size: int) -> dict[str, Any]:
    """What the core supplies to an objective's factory (corex.recipe.INJECTED names them)."""
    return {"encoder": encoder, "channels": tuple(encoder.channels), "strides": tuple(encoder.strides),
            "batch_size": recipe.stage_batch_size(stage), "dataset_size": dataset_size}


class _StandInEncoder(nn.Module):
    """A plain conv pyramid that stands in for an encoder that failed to build, so that the heads'
    and objectives' own problems are still found and reported with the encoder's."""

    arch, in_channels, channels, strides = "stand-in", 1, (8, 16, 32, 64), (4, 8, 16, 32)

    def __init__(self):
        super().__init__()
        widths = (self.in_channels, *self.channels)
        self.levels = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=4 if i == 0 else 2, padding=1) for i in range(4))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


def build_data(recipe: Recipe, registry: Registry | None = None, stage: Stage | None = None):
    """The recipe's :class:`~corex.interfaces.DataSource`, or the one of ``stage`` when it names its own."""
    registry = registry or Registry()
    data = recipe.data if stage is None else recipe.stage_data(stage)
    path = "data" if stage is None or stage.data is None else f"stages.{stage.name}.data"
    cache_dir = (data.cache_dir or DEFAULT_CACHE).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        key = f"{path}.cache_dir" if data.cache_dir else "the default cache (set data.cache_dir or COREX_CACHE)"
        raise CorexError(f"{key}: cannot create '{cache_dir}': {exc.strerror or exc}") from exc
    return build_component(
        registry, "datasets", Component(data.name, data.options), path,
        image_size=data.image_size, seed=recipe.seed, cache_dir=cache_dir,
    )


def build_stage_data(recipe: Recipe, source: Any, registry: Registry) -> dict[str, Any]:
    """The data source of every stage that names its own, by stage name. A stage that trains or
    evaluates heads must see the model's classes."""
    sources, problems = {}, []
    for stage in recipe.stages.values():
        if stage.data is None:
            continue
        try:
            sources[stage.name] = build_data(recipe, registry, stage)
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        if stage.kind != "pretrain" and list(sources[stage.name].class_names) != list(source.class_names):
            problems.append(f"stages.{stage.name}.data: its classes {list(sources[stage.name].class_names)} are not the model's "
                            f"{list(source.class_names)} (from data)")
    if problems:
        raise RecipeError(problems, source=recipe.source)
    return sources


def build_model(recipe: Recipe, num_classes: int, registry: Registry | None = None) -> CorexModel:
    """The encoder and every head defined by the recipe's train stages."""
    registry = registry or Registry()
    encoder = build_component(registry, "encoders", recipe.model.encoder, "model.encoder")
    return CorexModel(encoder, build_heads(recipe, encoder, num_classes, registry))


def build_heads(recipe: Recipe, encoder: Any, num_classes: int, registry: Registry) -> dict[str, nn.Module]:
    heads: dict[str, nn.Module] = {}
    problems: list[str] = []
    for stage in recipe.stages.values():
        for name, head in stage.heads.items():
            if name in heads:
                continue
            try:
                heads[name] = build_component(
                    registry, "heads", head.component, f"stages.{stage.name}.heads.{name}",
                    channels=tuple(encoder.channels), strides=tuple(encoder.strides), num_classes=num_classes,
                )
            except RecipeError as exc:
                problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems, source=recipe.source)
    return heads


def build_evaluators(stage: Stage, class_names: list[str], registry: Registry, split: str | None = None) -> list[tuple[str, Any]]:
    """A stage's evaluators as ``(recipe path, evaluator)``; ``split`` is what they will see
    (a train stage's evaluators see the validation split)."""
    split = split or (stage.split if stage.kind == "evaluate" else "val")
    return [
        (f"stages.{stage.name}.evaluators[{i}]",
         build_component(registry, "evaluators", spec, f"stages.{stage.name}.evaluators[{i}]", class_names=list(class_names), split=split))
        for i, spec in enumerate(stage.evaluators)
    ]


def build_augment(stage: Stage, registry: Registry) -> Callable[[dict], dict]:
    if stage.augment is None:
        return lambda batch: batch
    return build_component(registry, "augmentations", stage.augment, f"stages.{stage.name}.augment")


def check_components(recipe: Recipe, source: Any, registry: Registry, stage_sources: Mapping[str, Any] | None = None) -> CorexModel:
    """Build the model and, once, every stage's augmentation, evaluators and objective, so that the
    plugins' own checks (a Kornia op that does not exist, a queue size that does not divide the
    batch) and the contract's (a member missing, a pyramid that is not what it declares) are all
    reported together before any training starts. Returns the model."""
    from corex.recipe import INJECTED, iter_components

    problems: list[str] = []
    for kind, path, component in iter_components(recipe):
        with contextlib.suppress(KeyError):  # unknown names were reported when the recipe loaded
            registered = registry.get(kind, component.name)
            label = component_label(kind, component.name, registered.plugin)
            problems.extend(contract.factory_problems(registered.factory, INJECTED[kind], label, path))
    class_names = list(source.class_names)
    encoder, encoder_problems = None, []
    try:
        encoder = build_component(registry, "encoders", recipe.model.encoder, "model.encoder")
        registered = registry.get("encoders", recipe.model.encoder.name)
        encoder_problems = contract.pyramid_problems(encoder, component_label("encoders", recipe.model.encoder.name, registered.plugin), "model.encoder")
    except RecipeError as exc:
        encoder_problems = exc.problems
    problems.extend(encoder_problems)
    usable = encoder if encoder is not None and not encoder_problems else _StandInEncoder()
    heads: dict[str, nn.Module] = {}
    try:
        heads = build_heads(recipe, usable, len(class_names), registry)
    except RecipeError as exc:
        problems.extend(exc.problems)
    stage_sources = stage_sources or {}
    for stage in recipe.stages.values():
        builders = [lambda: build_augment(stage, registry), lambda: build_evaluators(stage, class_names, registry)]
        if stage.objective is not None:
            def build_objective(stage: Stage = stage) -> None:
                train_size = len(stage_sources.get(stage.name, source).split("train"))
                path = f"stages.{stage.name}.objective"
                objective = build_component(registry, "objectives", stage.objective, path, **objective_arguments(recipe, stage, usable, train_size))
                label = component_label("objectives", stage.objective.name, registry.get("objectives", stage.objective.name).plugin)
                if found := contract.objective_problems(objective, usable, label, path):
                    raise RecipeError(found)
            builders.append(build_objective)
        for build in builders:
            try:
                build()
            except RecipeError as exc:
                problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems, source=recipe.source)
    return CorexModel(encoder, heads)


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
        worker_init_fn=_seed_worker,
        persistent_workers=shuffle and num_workers > 0,  # a stage's loader lives for all its epochs
        pin_memory=device.type == "cuda",
    )


# -- small utilities ------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
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


def make_optimizer(params: list[nn.Parameter], spec, registry: Registry | None = None, path: str = "optimizer") -> torch.optim.Optimizer:
    """The recipe's optimizer from its registered factory. No weight decay on biases and
    normalisation weights (1-D tensors): it only fights their scale."""
    registry = registry or Registry()
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return build_component(registry, "optimizers", Component(spec.name, spec.options), path, param_groups=groups, lr=spec.lr,
                           weight_decay=spec.weight_decay, momentum=spec.momentum, betas=tuple(spec.betas))


def make_schedule(optimizer: torch.optim.Optimizer, spec, steps_per_epoch: int, epochs: int, registry: Registry | None = None,
                  path: str = "schedule"):
    """The recipe's learning-rate schedule from its registered factory, stepped every optimisation step."""
    registry = registry or Registry()
    return build_component(registry, "schedules", Component(spec.name, spec.options), path, optimizer=optimizer,
                           steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=spec.warmup_epochs, min_lr_ratio=spec.min_lr_ratio)


def log(message: str) -> None:
    """A line on stderr; under torch.distributed only rank 0 speaks, and says so."""
    world = distributed.world_size()
    if world > 1:
        if not distributed.is_main():
            return
        message = f"[rank 0/{world}] {message}"
    print(message, file=sys.stderr, flush=True)


# -- encoder files -------------------------------------------------------------------------------


def encoder_state(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's own entries of a :class:`CorexModel` state dict, with clean keys."""
    return {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}


def load_encoder_file(path: Path, encoder: nn.Module, where: str) -> None:
    """Load an exported encoder (with its ``.json`` metadata) or a corex checkpoint into ``encoder``."""
    payload = checkpoints.load_file(path, where)
    meta_path = path.with_suffix(".json")
    if not isinstance(payload, Mapping):
        raise CorexError(f"{where}: '{path}' holds a {type(payload).__name__}, not an encoder state dict or a corex checkpoint")
    if "model" in payload and isinstance(payload["model"], Mapping):
        arch = payload.get("arch")
        state = encoder_state(payload["model"])
    else:
        state = dict(payload)
        arch = rundir.read_json(meta_path).get("arch") if meta_path.exists() else None
    if not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CorexError(f"{where}: '{path}' holds no encoder weights (expected a mapping of parameter name to tensor)")
    if arch is not None and arch != getattr(encoder, "arch", None):
        raise CorexError(f"{where}: '{path}' holds a {arch} encoder, but this recipe's encoder is {encoder.arch}")
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CorexError(
            f"{where}: '{path}' does not fit this recipe's {encoder.arch} encoder "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
            "was it made with other options such as width or in_channels?"
        )


# -- the runner ----------------------------------------------------------------------------------


# Flag names in messages: the command line's, or the Python API's keyword arguments.
CLI_FLAGS = {"out": "--out", "resume": "--resume", "overwrite": "--overwrite"}
API_FLAGS = {"out": "out", "resume": "resume=True", "overwrite": "overwrite=True"}


def _fault_point(point: str, stage: str, epoch: int | None = None) -> None:
    """Kill this process at a named point when ``COREX_FAULT_AT`` asks for it (fault tests only).

    ``COREX_FAULT_AT=after_checkpoint:train:2`` dies with SIGKILL right after stage ``train``
    wrote epoch 2's ``last.pt``, before its metrics row, as a power cut would.
    """
    wanted = os.environ.get("COREX_FAULT_AT")
    if wanted and wanted == f"{point}:{stage}" + (f":{epoch}" if epoch is not None else ""):
        import signal

        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, for naming the keys in which two recipes differ."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def recipe_differences(before: Recipe, after: Recipe) -> list[tuple[str, Any, Any]]:
    """``(key, before, after)`` for every resolved value that differs."""
    old, new = flatten(before.resolved(DEFAULT_CACHE)), flatten(after.resolved(DEFAULT_CACHE))
    missing = object()
    return [(key, old.get(key, missing), new.get(key, missing)) for key in sorted(set(old) | set(new))
            if old.get(key, missing) != new.get(key, missing)]


def resolved_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.resolved(DEFAULT_CACHE), sort_keys=False)


class Runner:
    """Runs a recipe's stages into a run directory. ``corex run`` and :func:`corex.run` use it.

    ``resume`` continues the run in ``out`` (a finished stage is not redone; a stage whose
    ``epochs`` grew is extended); ``overwrite`` deletes what ``out`` holds and starts afresh.
    """

    def __init__(self, recipe: Recipe, out: Path, *, resume: bool = False, overwrite: bool = False, progress: bool | None = None,
                 registry: Registry | None = None, flags: Mapping[str, str] = API_FLAGS):
        if resume and overwrite:
            raise CorexError(f"{flags['resume']} and {flags['overwrite']} contradict each other: choose one")
        self.recipe = recipe
        self.out = Path(out)
        self.resume = resume
        self.overwrite = overwrite
        self.flags = dict(flags)
        self.progress_off = progress is False
        self.registry = registry or Registry()
        self.pm = self.registry.pm
        self.launched = distributed.launched()
        self.device = distributed.setup(recipe.device) or resolve_device(recipe.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        self.metrics = rundir.MetricsLog(self.out / "metrics.jsonl")
        self.results: dict[str, Any] = {"recipe": recipe.name, "stages": {}}
        self.context = RunContext(recipe, self.out, self.device, self.registry)
        self.lock = rundir.RunLock(self.out)
        self.status = "new"  # new | resumed | complete | extended
        self._plan: dict[str, int] = {}
        self._steps_done = 0
        self._train_seconds = 0.0

    # The run -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        tune_allocator()
        try:
            # Rank 0 alone opens (and locks) the run directory; the others learn what is done from it.
            distributed.main_first(lambda: self._open_directory() if self.main else None)
            self.results = distributed.broadcast(self.results)
            return self._run()
        finally:
            self.lock.release()
            if self.launched:
                distributed.teardown()

    def _run(self) -> dict[str, Any]:
        seed_everything(self.recipe.seed, self.recipe.deterministic)
        # Rank 0 first: a source may write files (the phantom, the cache) that the others then reuse.
        self.source = distributed.main_first(lambda: build_data(self.recipe, self.registry))
        self.class_names = list(self.source.class_names)
        self.stage_sources = distributed.main_first(lambda: build_stage_data(self.recipe, self.source, self.registry))
        # Rank 0 first here too: an objective's check reads its split's size, which may decode a cache.
        self.model = distributed.main_first(lambda: check_components(self.recipe, self.source, self.registry, self.stage_sources))
        if self.recipe.model.sync_batchnorm:
            if self.device.type != "cuda":
                raise CorexError(f"model.sync_batchnorm: torch's SyncBatchNorm runs only on CUDA devices, and this run is on "
                                 f"{self.device.type}; drop it (batch norm then sees each process's share of the batch)")
            if self.world > 1:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if self.recipe.model.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.rank:  # the same initial model everywhere, but each rank its own augmentation draws
            seed_everything(self.recipe.seed + 7919 * self.rank, self.recipe.deterministic)
        distributed.main_first(self._write_data_report)
        self._announce_stages()
        if self.main:
            self.pm.hook.corex_run_start(run=self.context)
        done = self.results["stages"]
        for stage in self.recipe.stages.values():
            if stage.name in done:  # finished before an interruption: take its final model
                if stage.kind == "evaluate":
                    continue  # evaluation changes neither the model nor the RNG
                where = f"stages.{stage.name} (finished earlier)"
                payload = self._load_model(self.out / "checkpoints" / stage.name / "model.pt", where)
                if "rng" not in payload:
                    raise CorexError(f"{where}: '{self.out / 'checkpoints' / stage.name / 'model.pt'}' is not a corex stage model (no RNG state)")
                self._set_rng(payload)  # as if the stage had just run
                continue
            started = time.perf_counter()
            if stage.kind == "evaluate":
                self._start_encoder(stage)
                result = distributed.broadcast(self.evaluate_stage(stage))  # every rank predicts its share; rank 0 scores
            else:
                result = self.train_stage(stage)
            result["time_s"] = round(time.perf_counter() - started, 3)
            done[stage.name] = result
            if self.main:
                _fault_point("before_results", stage.name)
                rundir.write_json(self.out / "results.json", self.results)
                self.pm.hook.corex_stage_end(run=self.context, stage=stage.name, results=result)
            distributed.barrier()
        if self.main:
            rundir.plot_curves(self.metrics.rows(), self.out / "curves.png")
            self.pm.hook.corex_run_end(run=self.context, results=self.results)
        return self.results

    def _rng_states(self) -> dict[str, Any]:
        """This rank's RNG state and, under torch.distributed, every rank's (gathered on all ranks)."""
        state = rng_state()
        return {"rng": state, "rng_ranks": distributed.gather(state), "world_size": self.world}

    def _set_rng(self, payload: Mapping[str, Any]) -> None:
        ranks = payload.get("rng_ranks")
        if ranks and len(ranks) == self.world:
            set_rng_state(ranks[self.rank])
            return
        set_rng_state(payload["rng"])
        if self.rank:  # written by another number of processes: each rank still draws its own
            seed_everything(self.recipe.seed + 7919 * self.rank + int(payload.get("epoch", 0)), self.recipe.deterministic)

    # The run directory ---------------------------------------------------------------------------

    def _open_directory(self) -> None:
        """Create or reopen ``out``, lock it, and decide what is left to do."""
        out, flags = self.out, self.flags
        where = flags["out"]
        try:
            if out.exists() and not out.is_dir():
                raise CorexError(f"{where}: '{out}' is a file, not a folder")
            out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except OSError as exc:
            raise CorexError(f"{where}: cannot use '{out}' as a run directory: {exc.strerror or exc}") from exc
        try:
            self._decide(out)
        except BaseException:
            self.lock.release()
            raise

    def _decide(self, out: Path) -> None:
        flags = self.flags
        saved = out / "recipe.yaml"
        existing = [p for p in out.iterdir() if p.name != rundir.RunLock.NAME]
        if self.overwrite and existing:
            for path in existing:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            log(f"corex: {flags['overwrite']}: deleted the earlier run in '{out}'")
            existing = []
        if not self.resume:
            if existing:
                raise CorexError(
                    f"{flags['out']}: '{out}' already holds files; pass {flags['resume']} to continue that run, "
                    f"{flags['overwrite']} to delete it and start afresh, or choose another folder"
                )
            log(f"corex: new run of '{self.recipe.name}' in {out}")
            self._write_run_files()
            return
        if not saved.exists():
            raise CorexError(f"{flags['resume']}: '{out}' holds no run to resume (no recipe.yaml); drop {flags['resume']} to start one")
        stale = rundir.remove_temporaries(out)
        if stale:
            log(f"corex: removed {len(stale)} temporary file(s) left by an interrupted write")
        from corex.recipe import load_recipe

        try:
            previous = load_recipe(saved, registry=self.registry)
        except RecipeError as exc:
            raise CorexError(f"{flags['resume']}: the run's own recipe {saved} no longer loads:\n{exc}") from None
        if (out / "results.json").exists():
            try:
                self.results = rundir.read_json(out / "results.json")
            except (ValueError, OSError) as exc:
                raise CorexError(f"{flags['resume']}: '{out / 'results.json'}' is damaged ({exc}); start afresh with {flags['overwrite']}") from None
        differences = recipe_differences(previous, self.recipe)
        if differences:
            self._extend(differences, saved)
        self._write_provenance(resumed=True)
        self._announce_resume()

    def _extend(self, differences: list[tuple[str, Any, Any]], saved: Path) -> None:
        """Accept a changed recipe only when training stages grew longer; refuse anything else."""
        grown = {}
        for key, before, after in differences:
            parts = key.split(".")
            if (len(parts) == 3 and parts[0] == "stages" and parts[2] == "epochs" and isinstance(before, int)
                    and isinstance(after, int) and after > before and self.recipe.stages[parts[1]].kind != "evaluate"):
                grown[parts[1]] = (before, after)
            else:
                grown = None
                break
        if grown is None:
            def shown(value: Any) -> str:
                return "(absent)" if not isinstance(value, (str, int, float, bool, list, type(None))) else json.dumps(value, default=str)

            lines = "\n".join(f"  {key}: {shown(before)} in the run, {shown(after)} now" for key, before, after in differences)
            raise CorexError(
                f"{self.flags['resume']}: the recipe differs from the one the run in '{self.out}' started with:\n{lines}\n"
                f"Resume with the same recipe and --set values, start afresh with {self.flags['overwrite']}, or use another "
                f"{self.flags['out']}. (Only a longer stages.NAME.epochs can extend a run.)"
            )
        # The grown stage and every later one are redone from the grown stage's last checkpoint.
        names = list(self.recipe.stages)
        first = min(names.index(name) for name in grown)
        for name in names[first:]:
            self.results["stages"].pop(name, None)
            if name not in grown:
                shutil.rmtree(self.out / "checkpoints" / name, ignore_errors=True)
        rundir.atomic_write_text(saved, resolved_yaml(self.recipe))
        rundir.write_json(self.out / "results.json", self.results)
        for name, (before, after) in grown.items():
            log(f"corex: extending stage '{name}' from {before} to {after} epochs (the learning-rate schedule is re-planned "
                f"for {after} epochs from epoch {before + 1} on); later stages are redone")
        self.status = "extended"

    def _write_run_files(self) -> None:
        out = self.out
        rundir.atomic_write_text(out / "recipe.yaml", resolved_yaml(self.recipe))
        rundir.write_json(out / "plugins.json", describe_plugins(self.pm))
        recipe_path = self.recipe.source or "RECIPE"
        rundir.atomic_write_text(out / "README.md", rundir.RUN_README.format(name=self.recipe.name, recipe=recipe_path, out=out))
        self._write_provenance(resumed=False)

    def _write_provenance(self, resumed: bool) -> None:
        path = self.out / "provenance.json"
        record = rundir.provenance(str(self.device), self.recipe.source)
        history = rundir.read_json(path) if resumed and path.exists() else {}
        if resumed:
            history.setdefault("resumed", []).append(record)
        else:
            history = {"started": record}
        rundir.write_json(path, history)

    def _announce_resume(self) -> None:
        done = self.results.get("stages", {})
        remaining = [name for name in self.recipe.stages if name not in done]
        if not remaining:
            self.status = "complete"
            log(f"corex: the run in '{self.out}' is already complete (stages {', '.join(done)}); nothing to do. "
                f"Use {self.flags['overwrite']} to start afresh, or --set stages.NAME.epochs=N with {self.flags['resume']} to extend it")
            return
        stage = remaining[0]
        if self.status != "extended":
            self.status = "resumed"
        where = self._checkpoint_position(self.out / "checkpoints" / stage / "last.pt")
        if where is None:
            log(f"corex: resuming '{self.out}' at the start of stage '{stage}'" + (f" (finished: {', '.join(done)})" if done else ""))
            return
        epoch, step = where
        total = self.recipe.stages[stage].epochs
        at = f"in epoch {epoch + 1} of {total} after step {step}" if step else f"after epoch {epoch} of {total}"
        log(f"corex: resuming '{self.out}' at stage '{stage}' {at}")

    @staticmethod
    def _checkpoint_position(path: Path) -> tuple[int, int] | None:
        """(epochs done, step within the next) of a ``last.pt``, read lazily; None if unreadable (the
        restore then says why)."""
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            within = state.get("within") or {}
            return int(state["epoch"]), int(within.get("step", 0))
        except Exception:  # a damaged file: the restore names the problem
            return None

    def _announce_stages(self) -> None:
        """What the run will do: device, batch, stages with their epochs and steps."""
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        log(f"corex: device {self.device}{threads}, seed {self.recipe.seed}; stages:")
        for stage in self.recipe.stages.values():
            if stage.kind == "evaluate":
                names = ", ".join(e.name for e in stage.evaluators)
                log(f"  {stage.name:12s} evaluate  on {stage.split}: {names}")
                continue
            fraction = 1.0 if stage.kind == "pretrain" else self.recipe.stage_data(stage).label_fraction
            steps = self._steps_per_epoch(stage, fraction)
            self._plan[stage.name] = steps * stage.epochs
            what = stage.objective.name if stage.objective is not None else " + ".join(stage.heads)
            extra = f", {fraction:.0%} of the labels" if fraction < 1 else ""
            if stage.data is not None:
                extra += f", on data '{stage.data.name}'"
            log(f"  {stage.name:12s} {stage.kind:9s} {what}: {stage.epochs} epochs x {steps} steps, "
                f"global batch {self.recipe.stage_batch_size(stage)}{extra}")

    def _steps_per_epoch(self, stage: Stage, label_fraction: float) -> int:
        images = len(self._source(stage).split("train", label_fraction=label_fraction))
        batch = self.recipe.stage_batch_size(stage)
        steps = images // batch if images >= batch else 1
        return steps if stage.max_steps_per_epoch is None else min(steps, stage.max_steps_per_epoch)

    def _run_eta(self) -> str:
        """The whole run's remaining training time, from the step rate seen so far."""
        if self._steps_done == 0 or self._train_seconds <= 0:
            return "run eta ?"
        remaining = max(0, sum(self._plan.values()) - self._steps_done)
        return f"run eta {format_duration(remaining * self._train_seconds / self._steps_done)}"

    def _source(self, stage: Stage) -> Any:
        return self.stage_sources.get(stage.name, self.source)

    def _write_data_report(self) -> None:
        # Decode (or find cached) every image now: a file that only fails when decoded is
        # reported before training, and listed in skipped.json under on_bad_sample: skip.
        description = self._describe(self.source, "data")
        if not self.main:  # rank 0 wrote the report; the others only find their caches
            for name, source in self.stage_sources.items():
                self._describe(source, f"stages.{name}.data")
            return
        description["class_names"] = list(self.source.class_names)
        if self.stage_sources:
            description["stages"] = {name: self._describe(source, f"stages.{name}.data") for name, source in self.stage_sources.items()}
        rundir.write_json(self.out / "data.json", description)
        skipped = [*self.source.skipped(), *(item for source in self.stage_sources.values() for item in source.skipped())]
        if skipped:
            rundir.write_json(self.out / "skipped.json", skipped)
            log(f"data: skipped {len(skipped)} bad samples (on_bad_sample: skip); the list is in {self.out / 'skipped.json'}")

    def _describe(self, source: Any, where: str) -> dict[str, Any]:
        if isinstance(source, Preparable):
            source.prepare()
        description = dict(source.describe())
        if getattr(source, "normalization", None) is not None:
            description["normalization"] = source.normalization
        label = "data" if where == "data" else f"data of {where.split('.')[1]}"
        for split, info in description.items():
            if isinstance(info, Mapping) and "classes" in info:
                counts = ", ".join(f"{k} {v}" for k, v in info["classes"].items())
                log(f"{label}: {split:5s} {info.get('studies', '?')} studies, {info.get('images', '?')} images ({counts})")
        return description

    def _load_model(self, path: Path, where: str) -> dict[str, Any]:
        payload = checkpoints.load_checkpoint(path, where, map_location=self.device)
        checkpoints.load_state(self.model, payload["model"], path, where)
        return payload

    # Stages --------------------------------------------------------------------------------

    def _loader(self, split: str, stage: Stage, *, shuffle: bool, label_fraction: float = 1.0, epoch: int = 0, start_batch: int = 0) -> DataLoader:
        dataset = self._source(stage).split(split, label_fraction=label_fraction)
        if len(dataset) == 0:
            raise CorexError(f"stages.{stage.name}: the '{split}' split of data '{self.recipe.stage_data(stage).name}' is empty")
        batch = self.recipe.stage_batch_size(stage)
        if shuffle and batch % self.world:
            raise CorexError(f"stages.{stage.name}.batch_size: the global batch of {batch} must divide by the {self.world} processes")
        return make_loader(
            dataset, batch, shuffle=shuffle,
            seed=stage_seed(self.recipe.seed, stage.name, epoch), num_workers=self.recipe.stage_data(stage).num_workers, device=self.device,
            start_batch=start_batch, rank=self.rank, world=self.world,
        )

    def _val_fraction(self, stage: Stage) -> float:
        data = self.recipe.stage_data(stage)
        return data.label_fraction if data.reduce_val else 1.0

    def _start_encoder(self, stage: Stage) -> None:
        source = stage.encoder_from
        if source is None:
            return
        where = f"stages.{stage.name}.encoder_from"
        if source in self.recipe.stages:
            path = self.out / "checkpoints" / source / "model.pt"
        else:
            path = Path(source).expanduser()
        load_encoder_file(path, self.model.encoder, where)
        log(f"[{stage.name}] encoder initialised from {source}")

    def train_stage(self, stage: Stage) -> dict[str, Any]:
        """A ``train`` (heads) or ``pretrain`` (objective) stage, resumable at epoch boundaries."""
        recipe, model, device = self.recipe, self.model, self.device
        ckpt_dir = self.out / "checkpoints" / stage.name
        pretrain = stage.kind == "pretrain"
        heads = list(stage.heads)
        augment = build_augment(stage, self.registry)
        label_fraction = 1.0 if pretrain else recipe.stage_data(stage).label_fraction
        train_loader = self._loader("train", stage, shuffle=True, label_fraction=label_fraction)
        # Transfer first: an objective may copy the encoder when built (MoCo's key encoder).
        self._start_encoder(stage)
        objective = None
        if pretrain:
            objective = build_component(
                self.registry, "objectives", stage.objective, f"stages.{stage.name}.objective",
                **objective_arguments(recipe, stage, model.encoder, len(train_loader.dataset)),
            ).to(device)
        evaluators = [] if pretrain else build_evaluators(stage, self.class_names, self.registry)
        model.encoder.requires_grad_(not stage.freeze)
        modules: list[nn.Module] = [model.encoder] + [model.heads[h] for h in heads] + ([objective] if objective is not None else [])
        params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())
        if not params:
            raise CorexError(f"stages.{stage.name}: nothing to train (the encoder is frozen and there are no heads)")
        where = f"stages.{stage.name}" if stage.optimizer is not None else None
        optimizer = make_optimizer(params, recipe.stage_optimizer(stage), self.registry, f"{where}.optimizer" if where else "optimizer")
        steps = len(train_loader) if stage.max_steps_per_epoch is None else min(len(train_loader), stage.max_steps_per_epoch)
        schedule = make_schedule(optimizer, recipe.stage_schedule(stage), steps, stage.epochs, self.registry,
                                 f"stages.{stage.name}.schedule" if stage.schedule is not None else "schedule")
        dtype = autocast_dtype(stage, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        val_loader = None if pretrain else self._loader("val", stage, shuffle=False, label_fraction=self._val_fraction(stage))
        ema = None
        if stage.ema is not None:  # torch's own averaging; batch-norm statistics are averaged too
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(stage.ema), use_buffers=True)
        loop = _Loop(stage, heads, augment, objective, optimizer, schedule, scaler, dtype, params, steps, evaluators, val_loader, ema=ema,
                     train_loader=train_loader)
        if self.world > 1:  # gradients averaged over the ranks; rank 0's weights and buffers to start
            from torch.nn.parallel import DistributedDataParallel

            target = objective if objective is not None else model
            # Heads of other stages take no part in this one's forward pass: DDP must be told.
            idle = objective is None and any(p.requires_grad for name, head in model.heads.items() if name not in heads for p in head.parameters())
            loop.forward = DistributedDataParallel(target, device_ids=[device.index] if device.type == "cuda" else None,
                                                   find_unused_parameters=idle)

        best = {"epoch": None, "value": None, "metrics": {}}
        start_epoch, resume_at = 1, None
        if self.resume and (ckpt_dir / "last.pt").exists():
            best, last_epoch, resume_at = self._restore(loop, ckpt_dir / "last.pt")
            start_epoch, loop.best = last_epoch + 1, best
            self._steps_done += min(last_epoch, stage.epochs) * steps + (resume_at["step"] if resume_at else 0)
        elif self.resume:
            self.metrics.truncate(self.results["stages"], stage.name, 0)

        fixed_batch = None
        for epoch in range(start_epoch, stage.epochs + 1):
            row, fixed_batch = self._train_epoch(loop, epoch, label_fraction, fixed_batch, resume_at if epoch == start_epoch else None)
            if val_loader is not None:  # every rank predicts its share, rank 0 scores and decides; the others learn the outcome
                best = loop.best = distributed.broadcast(self._validate(loop, epoch, row, best, ckpt_dir))
            if objective is not None and isinstance(objective, EpochEndHook) and fixed_batch is not None and self.main:
                (self.out / stage.name).mkdir(parents=True, exist_ok=True)
                objective.eval()
                with torch.no_grad():
                    objective.on_epoch_end(epoch=epoch, batch=fixed_batch, out_dir=self.out / stage.name)
            self._checkpoint(loop, epoch, row, best, ckpt_dir / "last.pt")
            log(_epoch_line(stage, epoch, row, stage.select.metric) + f"  {self._run_eta()}")
            if self.main:
                self.pm.hook.corex_epoch_end(run=self.context, stage=stage.name, epoch=epoch, metrics=row)

        distributed.barrier()  # best.pt is written
        if best["epoch"] is not None:
            self._load_model(ckpt_dir / "best.pt", f"stages.{stage.name}")
        elif ema is not None:
            model.load_state_dict(ema.module.state_dict())
        model.encoder.requires_grad_(True)
        states = self._rng_states()
        if self.main:
            rundir.save_torch(ckpt_dir / "model.pt", {
                "model": model.state_dict(), "arch": model.encoder.arch, "in_channels": model.encoder.in_channels,
                "stage": stage.name, **states,
            })
            _fault_point("after_model", stage.name)
        distributed.barrier()
        last_row = next((r for r in reversed(self.metrics.rows()) if r.get("stage") == stage.name), {})
        # From the metrics row, so that a resume after the last epoch still reports the real speed.
        result: dict[str, Any] = {"kind": stage.kind, "epochs": stage.epochs, "images_per_s": round(float(last_row.get("images_per_s", 0.0)), 2)}
        if pretrain:
            result["metrics"] = {k[len("train/"):]: v for k, v in last_row.items() if k.startswith("train/")}
        else:
            result["metrics"] = best["metrics"]
            result["best_epoch"] = best["epoch"]
            result["selected_on"] = stage.select.metric
        return result

    def _restore(self, loop: _Loop, path: Path) -> tuple[dict[str, Any], int]:
        """Everything ``last.pt`` holds, back in place; its metrics row too if the log lost it."""
        stage = loop.stage
        where = f"{self.flags['resume']} (stage '{stage.name}')"
        required = ["model", "optimizer", "schedule", "scaler", "epoch", "best", "rng"] + (["objective"] if loop.objective is not None else []) \
            + (["ema"] if loop.ema is not None else [])
        state = checkpoints.load_checkpoint(path, where, required=required, map_location=self.device)
        checkpoints.load_state(self.model, state["model"], path, where)
        try:
            if loop.objective is not None:
                loop.objective.load_state_dict(state["objective"])
            loop.optimizer.load_state_dict(state["optimizer"])
            loop.schedule.load_state_dict(state["schedule"])
            loop.scaler.load_state_dict(state["scaler"])
            self._set_rng(state)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise CorexError(f"{where}: '{path}' does not fit this stage's objective or optimizer ({str(exc).splitlines()[0][:200]})") from None
        try:
            if loop.ema is not None:
                loop.ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise CorexError(f"{where}: '{path}' does not fit this stage's EMA ({str(exc).splitlines()[0][:200]})") from None
        epoch = int(state["epoch"])
        if int(state.get("world_size", 1)) != self.world:
            log(f"warning: [{stage.name}] '{path}' was written by {state.get('world_size', 1)} process(es) and is resumed by {self.world}: "
                "the global batches hold the same samples in the same order, but the random draws (augmentation, dropout) are "
                "not those of the interrupted run")
        if self.main:
            self.metrics.truncate(self.results["stages"], stage.name, epoch)
            row = state.get("row")
            if row and row.get("epoch") == epoch and not self.metrics.has(stage.name, epoch):  # killed between the checkpoint and the log
                self.metrics.append(row)
        distributed.barrier()
        position = state.get("within")  # a checkpoint_every checkpoint inside epoch + 1
        if position:
            log(f"[{stage.name}] resumed in epoch {epoch + 1} after step {position['step']}")
        else:
            log(f"[{stage.name}] resumed after epoch {epoch}")
        return state["best"], epoch, position

    def _train_epoch(self, loop: _Loop, epoch: int, label_fraction: float, fixed_batch: dict | None,
                     resume_at: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict | None]:
        """One epoch; ``resume_at`` (from a mid-epoch checkpoint) holds the step to start after and the
        running sums so far, so the epoch's row equals an uninterrupted one."""
        stage, model, device, recipe = loop.stage, self.model, self.device, self.recipe
        first = int(resume_at["step"]) if resume_at else 0
        train_loader = loop.train_loader
        train_loader.sampler.set_epoch(stage_seed(recipe.seed, stage.name, epoch), first * recipe.stage_batch_size(stage))
        model.train()
        if stage.freeze:
            model.encoder.eval()  # a linear probe keeps the encoder's batch-norm statistics
        if loop.objective is not None:
            loop.objective.train()
        sums: dict[str, Tensor] = {k: torch.tensor(v, device=device) for k, v in (resume_at or {}).get("sums", {}).items()}
        seen = int((resume_at or {}).get("seen", 0))
        started = time.perf_counter() - float((resume_at or {}).get("elapsed", 0.0))
        bar = Progress(loop.steps, f"[{stage.name}] epoch {epoch}/{stage.epochs}", note=self._run_eta,
                       mode="off" if self.progress_off or not self.main else None)
        bar.done = first
        for step, batch in enumerate(train_loader, start=first):
            if step >= loop.steps:
                break
            if not loop.checked:
                check_intensities(batch, f"stages.{stage.name}: data '{recipe.stage_data(stage).name}', split 'train'")
                loop.checked = True
            batch = to_device(batch, device, recipe.model.channels_last)
            if loop.objective is not None and fixed_batch is None:
                fixed_batch = {k: (v[:8] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
            step_started = time.perf_counter()
            with torch.autocast(device.type, dtype=loop.dtype or torch.float32, enabled=loop.dtype is not None):
                loss, logs = self._step_loss(stage, batch, loop.augment, loop.objective, loop.forward)
            loop.optimizer.zero_grad(set_to_none=True)
            loop.scaler.scale(loss).backward()
            if stage.grad_clip:
                loop.scaler.unscale_(loop.optimizer)
                torch.nn.utils.clip_grad_norm_(loop.params, stage.grad_clip)
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
            loop.schedule.step()
            if loop.ema is not None:
                loop.ema.update_parameters(model)
            n = batch["image"].shape[0]
            seen += n
            # Summed on the device; read back every SYNC_EVERY steps, not every step (a GPU sync).
            for key, value in {"train/loss": loss, **logs}.items():
                value = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
                sums[key] = sums.get(key, 0.0) + value * n
            self._steps_done += 1
            self._train_seconds += time.perf_counter() - step_started
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == loop.steps:
                running = float(sums["train/loss"]) / seen
                if not math.isfinite(running):
                    raise RunFailure(f"stages.{stage.name}: the loss became {running} by epoch {epoch}, step {step + 1}; lower the learning rate or check the data")
                bar.set_values(loss=running, img_s=seen / (time.perf_counter() - started))
            bar.update(1)
            if stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0 and step + 1 < loop.steps:
                within = {"step": step + 1, "seen": seen, "elapsed": time.perf_counter() - started,
                          "sums": {k: float(v) for k, v in sums.items()}}
                self._checkpoint(loop, epoch - 1, None, loop.best, self.out / "checkpoints" / stage.name / "last.pt", within=within)
        bar.close()
        if self.world > 1:  # the epoch's means over every rank's samples
            keys = sorted(sums)
            totals = distributed.all_sum(torch.stack([torch.as_tensor(sums[k], device=device, dtype=torch.float64) for k in keys]
                                                     + [torch.tensor(float(seen), device=device, dtype=torch.float64)]))
            sums, seen = dict(zip(keys, totals[:-1])), int(totals[-1].item())
        elapsed = time.perf_counter() - started
        row: dict[str, Any] = {"stage": stage.name, "epoch": epoch, **{k: float(v) / max(seen, 1) for k, v in sums.items()}}
        row["lr"] = loop.optimizer.param_groups[0]["lr"]
        row["images_per_s"] = seen / elapsed if elapsed > 0 else 0.0
        row["train_time_s"] = elapsed
        row["global_batch"] = recipe.stage_batch_size(stage)
        row["processes"] = self.world
        row["images"] = seen
        return row, fixed_batch

    def _validate(self, loop: _Loop, epoch: int, row: dict[str, Any], best: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
        stage = loop.stage
        evaluated = loop.ema.module if loop.ema is not None else self.model
        val_metrics = self.evaluate(loop.val_loader, loop.heads, loop.evaluators, stage, desc=f"[{stage.name}] validate", model=evaluated)[0]
        if not self.main:
            return best
        row.update({f"val/{k}": v for k, v in val_metrics.items()})
        metric = stage.select.metric
        if metric not in val_metrics:
            raise RecipeError([f"stages.{stage.name}.select.metric: '{metric}' is not a validation metric; "
                               f"available: {', '.join(sorted(val_metrics))}"])
        value = val_metrics[metric]
        better = best["value"] is None or (value > best["value"] if stage.select.maximize else value < best["value"])
        if better and math.isfinite(value):
            best = {"epoch": epoch, "value": value, "metrics": val_metrics}
            rundir.save_torch(ckpt_dir / "best.pt", {"model": evaluated.state_dict(), "epoch": epoch, metric: value, "arch": self.model.encoder.arch})
        return best

    def _checkpoint(self, loop: _Loop, epoch: int, row: dict[str, Any] | None, best: dict[str, Any], path: Path,
                    within: Mapping[str, Any] | None = None) -> None:
        """``last.pt`` holds the epoch's metrics row as well, so the two are written as one step:
        a kill between them is repaired on resume. ``within`` marks a checkpoint inside epoch
        ``epoch + 1`` (``checkpoint_every``): its step and running sums. Every rank's RNG state is
        in it; rank 0 writes it."""
        states = self._rng_states()
        if self.main:
            rundir.save_torch(path, {
                "within": dict(within) if within else None,
                "ema": loop.ema.state_dict() if loop.ema is not None else None,
                "model": self.model.state_dict(),
                "objective": loop.objective.state_dict() if loop.objective is not None else None,
                "optimizer": loop.optimizer.state_dict(),
                "schedule": loop.schedule.state_dict(),
                "scaler": loop.scaler.state_dict(),
                "epoch": epoch,
                "best": best,
                "arch": self.model.encoder.arch,
                "row": row,
                **states,
            })
            if within:
                _fault_point("after_step_checkpoint", loop.stage.name, f"{epoch + 1}:{within['step']}")
            else:
                _fault_point("after_checkpoint", loop.stage.name, epoch)
                self.metrics.append(row)
                _fault_point("after_row", loop.stage.name, epoch)
        distributed.barrier()

    def _step_loss(self, stage: Stage, batch: dict[str, Any], augment: Callable, objective: nn.Module | None,
                   forward: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one training step, and the extra scalars to log.

        A pretrain stage hands the batch and the augmentation to its objective (which may make
        several views); a train stage augments once and sums the heads' weighted losses. Either
        way augmentation runs without gradients.
        """
        if objective is not None:
            out = (forward or objective)(batch, _without_grad(augment))
            return out["loss"], {f"train/{k}": v for k, v in out.items() if k != "loss"}
        with torch.no_grad():
            batch = augment(batch)
        outputs = (forward or self.model)(batch["image"], list(stage.heads))
        losses = {h: self.model.heads[h].loss(outputs[h], batch) for h in stage.heads}
        loss = sum(stage.heads[h].weight * losses[h] for h in stage.heads)
        return loss, ({f"train/loss/{h}": v for h, v in losses.items()} if len(losses) > 1 else {})

    def _head_weights(self, stage: Stage) -> dict[str, float]:
        # Each head's weight from the latest train stage so far that defines it, as it was trained.
        weights: dict[str, float] = {}
        for earlier in self.recipe.stages.values():
            weights.update({h: head.weight for h, head in earlier.heads.items()})
            if earlier.name == stage.name:
                break
        return weights

    def evaluate(self, loader: DataLoader, heads: list[str], evaluators: list[tuple[str, Any]], stage: Stage, artefacts: Path | None = None,
                 desc: str | None = None, model: CorexModel | None = None):
        return evaluate_loader(
            model if model is not None else self.model, loader, heads, evaluators, self.device, weights=self._head_weights(stage), amp=autocast_dtype(stage, self.device),
            channels_last=self.recipe.model.channels_last, artefacts=artefacts, where=f"stages.{stage.name}",
            desc=None if self.progress_off or not self.main else desc,
        )

    def evaluate_stage(self, stage: Stage) -> dict[str, Any]:
        evaluators = build_evaluators(stage, self.class_names, self.registry)
        metrics, intervals = evaluate_split(
            self.model, self._source(stage), self.recipe, stage, evaluators, self.device, weights=self._head_weights(stage),
            artefacts=self.out / stage.name, desc=None if self.progress_off or not self.main else f"[{stage.name}] evaluate {stage.split}",
        )
        line = "  ".join(f"{k} {format_metric(k, v)}" for k, v in metrics.items() if "/" not in k)
        log(f"[{stage.name}] {stage.split}: {line}")
        result: dict[str, Any] = {"kind": "evaluate", "split": stage.split, "metrics": metrics}
        if intervals:
            result["intervals"] = {k: [float(lo), float(hi)] for k, (lo, hi) in intervals.items()}
        return result


@attrs.define
class _Loop:
    """What one training stage's epochs share."""

    stage: Stage
    heads: list[str]
    augment: Callable
    objective: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: Any
    dtype: torch.dtype | None
    params: list[nn.Parameter]
    steps: int
    evaluators: list[tuple[str, Any]]
    val_loader: DataLoader | None
    ema: Any = None  # torch.optim.swa_utils.AveragedModel when the stage asks for it
    forward: nn.Module | None = None  # DistributedDataParallel around the model or objective, when there are several ranks
    train_loader: DataLoader | None = None  # one per stage: its workers persist, its sampler is re-seeded each epoch
    best: dict[str, Any] = attrs.field(factory=lambda: {"epoch": None, "value": None, "metrics": {}})
    checked: bool = False


def _without_grad(augment: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def run(batch: dict) -> dict:
        with torch.no_grad():
            return augment(batch)

    return run


def format_metric(name: str, value: Any) -> str:
    """Counts as integers, everything else with four decimals."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and (name == "n" or name.startswith("n_") or name.endswith("/n"))):
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else format_value(value)


def _outputs(model: CorexModel, loader: DataLoader, heads: list[str], device: torch.device, *, amp: torch.dtype | None,
             channels_last: bool, where: str, desc: str | None) -> Iterator[tuple[dict[str, Any], dict[str, Tensor]]]:
    """``(batch on the device, head outputs)`` for every batch of ``loader``, in eval mode."""
    model.eval()
    bar = Progress(len(loader), desc or "", unit="batch", mode=None if desc else "off")
    with bar:
        for index, batch in enumerate(loader):
            if index == 0:
                check_intensities(batch, where)
            batch = to_device(batch, device, channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                outputs = model(batch["image"], heads)
            yield batch, outputs
            bar.update(1)


def _to_cpu(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in values.items()}


def _feed(evaluators: list[tuple[str, Any]], method: str, batch: dict[str, Any], outputs: Mapping[str, Tensor], model: CorexModel, heads: list[str]) -> None:
    for path, evaluator in evaluators:
        try:
            if method == "update" and isinstance(evaluator, NeedsModel) and evaluator.needs_model:  # e.g. saliency: gradients through the model
                evaluator.update(batch, outputs, model=model)
            else:
                getattr(evaluator, method)(batch, outputs)
        except KeyError as exc:
            raise CorexError(f"{path}: reads the output of head {exc}, but the model's heads are {', '.join(heads) or 'none'}") from exc


def evaluate_split(model: CorexModel, source: Any, recipe: Recipe, stage: Stage, evaluators: list[tuple[str, Any]], device: torch.device, *,
                   split: str | None = None, heads: list[str] | None = None, weights: Mapping[str, float] | None = None,
                   artefacts: Path | None = None, desc: str | None = None, channels_last: bool | None = None):
    """What an evaluate stage does (``corex run`` and ``corex evaluate`` alike): when an evaluator
    calibrates (temperature scaling), first stream the validation split through it, never the split
    it is scored on; then evaluate ``split`` (default: the stage's) with the stage's batch size and
    precision. Returns ``(metrics, intervals)``."""
    split = split or stage.split
    heads = list(model.heads) if heads is None else heads
    amp = autocast_dtype(stage, device)
    channels_last = recipe.model.channels_last if channels_last is None else channels_last
    where = f"stages.{stage.name}"

    def loader(name: str, label_fraction: float = 1.0, shard: bool = False) -> DataLoader:
        dataset = source.split(name, label_fraction=label_fraction)
        if len(dataset) == 0:
            raise CorexError(f"{where}: the '{name}' split of data '{recipe.stage_data(stage).name}' is empty")
        return make_loader(dataset, recipe.stage_batch_size(stage), shuffle=False, seed=stage_seed(recipe.seed, stage.name, 0),
                           num_workers=recipe.stage_data(stage).num_workers, device=device,
                           rank=distributed.rank() if shard else 0, world=distributed.world_size() if shard else 1)

    calibrated = [(path, e) for path, e in evaluators if isinstance(e, Calibrated)]
    if calibrated and split != "val" and distributed.is_main():  # the scores are gathered on rank 0: so is calibration
        data = recipe.stage_data(stage)
        fraction = data.label_fraction if data.reduce_val else 1.0
        feed_calibration(model, loader("val", fraction), heads, calibrated, device, amp=amp, channels_last=channels_last, where=where)
    return evaluate_loader(model, loader(split, shard=True), heads, evaluators, device, weights=weights, amp=amp, channels_last=channels_last,
                           artefacts=artefacts, where=where, desc=desc)


@torch.no_grad()
def feed_calibration(model: CorexModel, loader: DataLoader, heads: list[str], evaluators: list[tuple[str, Any]], device: torch.device, *,
                     amp: torch.dtype | None = None, channels_last: bool = True, where: str = "calibration") -> None:
    """Stream ``loader`` (the validation split) through every evaluator's ``calibration_update``."""
    for batch, outputs in _outputs(model, loader, heads, device, amp=amp, channels_last=channels_last, where=where, desc=None):
        _feed(evaluators, "calibration_update", batch, {k: v.detach().float() for k, v in outputs.items()}, model, heads)


@torch.no_grad()
def evaluate_loader(
    model: CorexModel,
    loader: DataLoader,
    heads: list[str],
    evaluators: list[tuple[str, Any]],
    device: torch.device,
    *,
    weights: Mapping[str, float] | None = None,
    amp: torch.dtype | None = None,
    channels_last: bool = True,
    artefacts: Path | None = None,
    where: str = "evaluate",
    desc: str | None = None,
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Head losses plus every evaluator's metrics and intervals over ``loader``.

    ``evaluators`` are ``(recipe path, evaluator)`` pairs; the path names the evaluator in errors.
    The loss is weighted like the training loss, so the curves are comparable. ``desc`` names the
    progress shown while it runs (none without it).
    """
    for _, evaluator in evaluators:
        evaluator.reset()
    loss_sums = {h: 0.0 for h in heads}
    total = 0
    # Under torch.distributed each rank predicts its share (RankShard) and rank 0 scores them all.
    sharded = isinstance(getattr(loader, "sampler", None), RankShard)
    records = []
    for batch, outputs in _outputs(model, loader, heads, device, amp=amp, channels_last=channels_last, where=where, desc=desc):
        n = batch["image"].shape[0]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for h in heads:
                loss_sums[h] += model.heads[h].loss(outputs[h], batch).item() * n
        total += n
        outputs = {k: v.detach().float() for k, v in outputs.items()}
        if sharded:
            records.append((_to_cpu(batch), _to_cpu(outputs)))  # images too: evaluators may draw them or look inside the model
        else:
            _feed(evaluators, "update", batch, outputs, model, heads)
    if sharded:
        shares = distributed.gather_to_main((records, loss_sums, total))
        if shares is None:
            return {}, {}
        loss_sums = {h: sum(share[1][h] for share in shares) for h in heads}
        total = sum(share[2] for share in shares)
        for share in shares:  # rank order is the split's order
            for batch, outputs in share[0]:
                batch = to_device(batch, device, channels_last)
                _feed(evaluators, "update", batch, {k: v.to(device) for k, v in outputs.items()}, model, heads)
    metrics: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    if heads:
        per_head = {h: s / max(total, 1) for h, s in loss_sums.items()}
        metrics["loss"] = sum((weights or {}).get(h, 1.0) * v for h, v in per_head.items())
        if len(heads) > 1:
            metrics.update({f"loss/{h}": v for h, v in per_head.items()})
    for path, evaluator in evaluators:
        for key, value in evaluator.compute().items():
            if key in metrics:
                raise CorexError(f"{path}: metric '{key}' is also produced by another evaluator of this stage; give it another name")
            metrics[key] = value if isinstance(value, int) and not isinstance(value, bool) else float(value)
        if isinstance(evaluator, HasIntervals):
            intervals.update(evaluator.intervals())
        if artefacts is not None and isinstance(evaluator, SavesArtefacts):
            artefacts.mkdir(parents=True, exist_ok=True)
            evaluator.save(artefacts)
    return metrics, intervals


def evaluate_model(
    model: CorexModel,
    loader: DataLoader,
    heads: list[str],
    class_names: list[str],
    evaluators: list[str | dict[str, Any]] | None = None,
    *,
    out: str | Path | None = None,
    device: str = "auto",
    registry: Registry | None = None,
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """The Python API's evaluation: registered evaluators by name (default: one per head)."""
    from corex.binding import Problems, bind_options
    from corex.recipe import INJECTED

    registry = registry or Registry()
    specs = evaluators if evaluators is not None else list(heads)
    components, problems = [], Problems()
    for i, spec in enumerate(specs):  # bound and type-checked exactly as a recipe's are
        component = Component(spec) if isinstance(spec, str) else Component(spec["name"], {k: v for k, v in spec.items() if k != "name"})
        try:
            factory = registry.get("evaluators", component.name).factory
        except KeyError as exc:
            problems.add(f"evaluators[{i}]", exc.args[0])
            continue
        component.options = bind_options(factory, component.options, f"evaluators[{i}]", problems, injected=INJECTED["evaluators"])
        components.append((i, component))
    if problems:
        raise RecipeError(problems)
    built = [(f"evaluators[{i}]", build_component(registry, "evaluators", component, f"evaluators[{i}]", class_names=list(class_names), split="test"))
             for i, component in components]
    target = resolve_device(device)
    model.to(target)
    return evaluate_loader(model, loader, heads, built, target, artefacts=Path(out) if out else None)


def _epoch_line(stage: Stage, epoch: int, row: Mapping[str, Any], select: str) -> str:
    parts = [f"[{stage.name}] epoch {epoch}/{stage.epochs}", f"loss {row.get('train/loss', float('nan')):.4f}"]
    if "val/loss" in row:
        parts.append(f"val loss {row['val/loss']:.4f}")
    if select != "loss" and f"val/{select}" in row:
        parts.append(f"val {select} {row[f'val/{select}']:.4f}")
    parts.append(f"{row['images_per_s']:.1f} img/s")
    return "  ".join(parts)


def default_out(recipe: Recipe) -> Path:
    """Where a run goes without ``--out``: the recipe's ``output``, else ``runs/<name>``."""
    return Path(recipe.output) if recipe.output is not None else Path("runs") / recipe.name


def run(recipe: Recipe, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False, progress: bool | None = None,
        registry: Registry | None = None, flags: Mapping[str, str] = API_FLAGS) -> dict[str, Any]:
    """Run ``recipe`` into ``out`` (default: the recipe's ``output``, else ``runs/<name>``)."""
    out = Path(out) if out is not None else default_out(recipe)
    runner = Runner(recipe, out, resume=resume, overwrite=overwrite, progress=progress, registry=registry or Registry(get_plugin_manager()), flags=flags)
    return runner.run()
