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
import ctypes
import math
import os
import platform
import random
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from corex import rundir
from corex.binding import accepted_injections
from corex.errors import CorexError, RecipeError
from corex.plugins import Registry, describe_plugins, get_plugin_manager
from corex.recipe import Component, Recipe, Stage

DEFAULT_CACHE = Path(os.environ.get("COREX_CACHE", "~/.cache/corex")).expanduser()
# Tolerance of the first-batch intensity check: resampling may overshoot [0, 1] a little.
INTENSITY_SLACK = 0.05
# Training losses are read back from the device (a synchronisation) once per this many steps.
SYNC_EVERY = 10


@attrs.define
class RunContext:
    """What observers see: the resolved recipe, the run directory and the device."""

    recipe: Recipe
    out: Path
    device: torch.device
    registry: Registry


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
    """A plugin's ValueError while building becomes a recipe problem at ``path``."""
    try:
        yield
    except CorexError:
        raise
    except ValueError as exc:
        raise RecipeError([f"{path}: {exc}"]) from exc


def build_component(registry: Registry, kind: str, component: Component, path: str, **available: Any) -> Any:
    factory = registry.get(kind, component.name).factory
    with _reported_as(path):
        return factory(**accepted_injections(factory, available), **component.options)


def build_data(recipe: Recipe, registry: Registry | None = None):
    """The recipe's :class:`~corex.interfaces.DataSource`."""
    registry = registry or Registry()
    data = recipe.data
    cache_dir = (data.cache_dir or DEFAULT_CACHE).expanduser()
    return build_component(
        registry, "datasets", Component(data.name, data.options), "data",
        image_size=data.image_size, seed=recipe.seed, cache_dir=cache_dir,
    )


def build_model(recipe: Recipe, num_classes: int, registry: Registry | None = None) -> CorexModel:
    """The encoder and every head defined by the recipe's train stages."""
    registry = registry or Registry()
    encoder = build_component(registry, "encoders", recipe.model.encoder, "model.encoder")
    for attribute in ("channels", "strides", "arch", "in_channels"):
        if not hasattr(encoder, attribute):
            raise CorexError(f"model.encoder: encoder '{recipe.model.encoder.name}' has no '{attribute}' attribute (see corex/interfaces.py)")
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
    return CorexModel(encoder, heads)


def build_evaluators(stage: Stage, class_names: list[str], registry: Registry) -> list[tuple[str, Any]]:
    return [
        (f"stages.{stage.name}.evaluators[{i}]",
         build_component(registry, "evaluators", spec, f"stages.{stage.name}.evaluators[{i}]", class_names=list(class_names)))
        for i, spec in enumerate(stage.evaluators)
    ]


def build_augment(stage: Stage, registry: Registry) -> Callable[[dict], dict]:
    if stage.augment is None:
        return lambda batch: batch
    return build_component(registry, "augmentations", stage.augment, f"stages.{stage.name}.augment")


def check_components(recipe: Recipe, source: Any, registry: Registry) -> CorexModel:
    """Build the model and, once, every stage's augmentation, evaluators and objective, so that the
    plugins' own checks (a Kornia op that does not exist, a queue size that does not divide the
    batch) are all reported together before any training starts. Returns the model."""
    problems: list[str] = []
    class_names = list(source.class_names)
    model = encoder = None
    try:
        model = build_model(recipe, len(class_names), registry)
        encoder = model.encoder
    except RecipeError as exc:
        problems.extend(exc.problems)
    for stage in recipe.stages.values():
        builders = [lambda: build_augment(stage, registry), lambda: build_evaluators(stage, class_names, registry)]
        if stage.objective is not None and encoder is not None:
            builders.append(lambda: build_component(
                registry, "objectives", stage.objective, f"stages.{stage.name}.objective", encoder=encoder,
                channels=tuple(encoder.channels), strides=tuple(encoder.strides), batch_size=recipe.stage_batch_size(stage),
                dataset_size=len(source.split("train")),
            ))
        for build in builders:
            try:
                build()
            except RecipeError as exc:
                problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems, source=recipe.source)
    return model


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int, device: torch.device) -> DataLoader:
    """Batches in an order fixed by ``seed``; training loaders drop the ragged last batch."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) >= batch_size,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# -- small utilities ------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CorexError(f"device: '{name}' was asked for, but this machine has no CUDA device (use device: auto or cpu)")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def tune_allocator() -> None:
    """Stop glibc returning large activation buffers to the kernel after every step.

    Measured on the 2-core reference machine: ResNet-50 at batch 32 trained 1.9x faster
    (2.2 -> 4.2 images/s) because the page faults of re-mapping those buffers disappear.
    Respects MALLOC_* variables a user has set.
    """
    if platform.system() != "Linux" or any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def stage_seed(seed: int, stage: str, epoch: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(stage.encode()) + epoch) % 2**63


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


def make_optimizer(params: list[nn.Parameter], spec) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation weights (1-D tensors): it only fights the scale.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    if spec.name == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, betas=tuple(spec.betas))
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas))


def make_schedule(optimizer: torch.optim.Optimizer, spec, steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_lr_ratio``, stepped every optimisation step."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(spec.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- encoder files -------------------------------------------------------------------------------


def encoder_state(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's own entries of a :class:`CorexModel` state dict, with clean keys."""
    return {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}


def load_encoder_file(path: Path, encoder: nn.Module, where: str) -> None:
    """Load an exported encoder (with its ``.json`` metadata) or a corex checkpoint into ``encoder``."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorexError(f"{where}: cannot read '{path}' as a torch file: {exc}") from exc
    meta_path = path.with_suffix(".json")
    if isinstance(payload, Mapping) and "model" in payload and isinstance(payload["model"], Mapping):
        arch = payload.get("arch")
        state = encoder_state(payload["model"])
    else:
        state = dict(payload)
        arch = rundir.read_json(meta_path).get("arch") if meta_path.exists() else None
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


class Runner:
    """Runs a recipe's stages into a run directory. ``corex run`` and :func:`corex.run` use it."""

    def __init__(self, recipe: Recipe, out: Path, *, resume: bool = False, progress: bool | None = None, registry: Registry | None = None):
        self.recipe = recipe
        self.out = Path(out)
        self.resume = resume
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.registry = registry or Registry()
        self.pm = self.registry.pm
        self.device = resolve_device(recipe.device)
        self.metrics = rundir.MetricsLog(self.out / "metrics.jsonl")
        self.results: dict[str, Any] = {"recipe": recipe.name, "stages": {}}
        self.context = RunContext(recipe, self.out, self.device, self.registry)

    # The run -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        tune_allocator()
        self._prepare_directory()
        seed_everything(self.recipe.seed, self.recipe.deterministic)
        self.source = build_data(self.recipe, self.registry)
        self.class_names = list(self.source.class_names)
        self.model = check_components(self.recipe, self.source, self.registry)
        self.model.to(self.device)
        if self.recipe.model.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._write_data_report()
        self.pm.hook.corex_run_start(run=self.context)
        done = self.results["stages"]
        for stage in self.recipe.stages.values():
            if stage.name in done:  # finished before an interruption: take its final model
                if stage.kind == "evaluate":
                    continue  # evaluation changes neither the model nor the RNG
                payload = self._load_model(self.out / "checkpoints" / stage.name / "model.pt")
                set_rng_state(payload["rng"])  # as if the stage had just run
                continue
            started = time.perf_counter()
            if stage.kind == "evaluate":
                result = self.evaluate_stage(stage)
            else:
                result = self.train_stage(stage)
            result["time_s"] = round(time.perf_counter() - started, 3)
            done[stage.name] = result
            rundir.write_json(self.out / "results.json", self.results)
            self.pm.hook.corex_stage_end(run=self.context, stage=stage.name, results=result)
        rundir.plot_curves(self.metrics.rows(), self.out / "curves.png")
        self.pm.hook.corex_run_end(run=self.context, results=self.results)
        return self.results

    def _prepare_directory(self) -> None:
        out = self.out
        saved = out / "recipe.yaml"
        if self.resume:
            if not saved.exists():
                raise CorexError(f"--resume: '{out}' holds no run to resume (no recipe.yaml); drop --resume to start one")
            from corex.recipe import load_recipe

            previous = load_recipe(saved, registry=self.registry)
            if previous.digest() != self.recipe.digest():
                raise CorexError(
                    f"--resume: the recipe differs from the one the run in '{out}' started with "
                    f"(compare with {saved}); resume with the same recipe and --set values, or use a new --out"
                )
            if (out / "results.json").exists():
                self.results = rundir.read_json(out / "results.json")
            return
        if out.exists() and any(out.iterdir()):
            raise CorexError(f"--out: '{out}' already holds files; pass --resume to continue that run, or choose another folder")
        out.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_text(saved, self.recipe.to_yaml())
        rundir.write_json(out / "plugins.json", describe_plugins(self.pm))
        recipe_path = self.recipe.source or "RECIPE"
        rundir.atomic_write_text(out / "README.md", rundir.RUN_README.format(name=self.recipe.name, recipe=recipe_path, out=out))

    def _write_data_report(self) -> None:
        # Decode (or find cached) every image now: a file that only fails when decoded is
        # reported before training, and listed in skipped.json under on_bad_sample: skip.
        if hasattr(self.source, "prepare"):
            self.source.prepare()
        description = dict(self.source.describe())
        if getattr(self.source, "normalization", None) is not None:
            description["normalization"] = self.source.normalization
        rundir.write_json(self.out / "data.json", description)
        skipped = self.source.skipped()
        if skipped:
            rundir.write_json(self.out / "skipped.json", skipped)
            log(f"data: skipped {len(skipped)} bad samples (on_bad_sample: skip); the list is in {self.out / 'skipped.json'}")
        for split, info in description.items():
            if isinstance(info, Mapping) and "classes" in info:
                counts = ", ".join(f"{k} {v}" for k, v in info["classes"].items())
                log(f"data: {split:5s} {info.get('studies', '?')} studies, {info.get('images', '?')} images ({counts})")

    def _load_model(self, path: Path) -> dict[str, Any]:
        payload = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(payload["model"])
        return payload

    # Stages --------------------------------------------------------------------------------

    def _loader(self, split: str, stage: Stage, *, shuffle: bool, label_fraction: float = 1.0, epoch: int = 0) -> DataLoader:
        dataset = self.source.split(split, label_fraction=label_fraction)
        if len(dataset) == 0:
            raise CorexError(f"stages.{stage.name}: the '{split}' split is empty")
        return make_loader(
            dataset, self.recipe.stage_batch_size(stage), shuffle=shuffle,
            seed=stage_seed(self.recipe.seed, stage.name, epoch), num_workers=self.recipe.data.num_workers, device=self.device,
        )

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
        batch_size = recipe.stage_batch_size(stage)
        augment = build_augment(stage, self.registry)
        label_fraction = 1.0 if pretrain else recipe.data.label_fraction
        train_loader = self._loader("train", stage, shuffle=True, label_fraction=label_fraction)
        # Transfer first: an objective may copy the encoder when built (MoCo's key encoder).
        self._start_encoder(stage)
        objective = None
        if pretrain:
            objective = build_component(
                self.registry, "objectives", stage.objective, f"stages.{stage.name}.objective",
                encoder=model.encoder, channels=tuple(model.encoder.channels), strides=tuple(model.encoder.strides), batch_size=batch_size,
                dataset_size=len(train_loader.dataset),
            ).to(device)
        evaluators = [] if pretrain else build_evaluators(stage, self.class_names, self.registry)
        model.encoder.requires_grad_(not stage.freeze)
        modules: list[nn.Module] = [model.encoder] + [model.heads[h] for h in heads] + ([objective] if objective is not None else [])
        params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())
        if not params:
            raise CorexError(f"stages.{stage.name}: nothing to train (the encoder is frozen and there are no heads)")
        optimizer = make_optimizer(params, recipe.stage_optimizer(stage))
        steps = len(train_loader) if stage.max_steps_per_epoch is None else min(len(train_loader), stage.max_steps_per_epoch)
        schedule = make_schedule(optimizer, recipe.stage_schedule(stage), steps, stage.epochs)
        dtype = autocast_dtype(stage, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        val_loader = None if pretrain else self._loader("val", stage, shuffle=False)
        fixed_batch = None

        best = {"epoch": None, "value": None, "metrics": {}}
        start_epoch = 1
        if self.resume and (ckpt_dir / "last.pt").exists():
            state = torch.load(ckpt_dir / "last.pt", map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            if objective is not None:
                objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            best = state["best"]
            start_epoch = state["epoch"] + 1
            self.metrics.truncate(self.results["stages"], stage.name, state["epoch"])
            log(f"[{stage.name}] resumed after epoch {state['epoch']}")
        elif self.resume:
            self.metrics.truncate(self.results["stages"], stage.name, 0)

        checked = False
        images_per_s = 0.0
        for epoch in range(start_epoch, stage.epochs + 1):
            train_loader = self._loader("train", stage, shuffle=True, label_fraction=label_fraction, epoch=epoch)
            model.train()
            if stage.freeze:
                model.encoder.eval()  # a linear probe keeps the encoder's batch-norm statistics
            if objective is not None:
                objective.train()
            sums: dict[str, Tensor] = {}
            seen = 0
            started = time.perf_counter()
            bar = _progress(steps, f"{stage.name} {epoch}/{stage.epochs}", self.progress)
            for step, batch in enumerate(train_loader):
                if step >= steps:
                    break
                if not checked:
                    check_intensities(batch, f"stages.{stage.name}: data '{recipe.data.name}', split 'train'")
                    checked = True
                batch = to_device(batch, device, recipe.model.channels_last)
                if pretrain and fixed_batch is None:
                    fixed_batch = {k: (v[:8] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss, logs = self._step_loss(stage, batch, augment, objective)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if stage.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                n = batch["image"].shape[0]
                seen += n
                # Summed on the device; read back every SYNC_EVERY steps, not every step (a GPU sync).
                for key, value in {"train/loss": loss, **logs}.items():
                    value = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
                    sums[key] = sums.get(key, 0.0) + value * n
                bar.update(1)
                if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
                    running = float(sums["train/loss"]) / seen
                    if not math.isfinite(running):
                        raise CorexError(f"stages.{stage.name}: the loss became {running} by epoch {epoch}, step {step + 1}; lower the learning rate or check the data")
                    bar.set_postfix(loss=f"{running:.4f}", img_s=f"{seen / (time.perf_counter() - started):.1f}")
            bar.close()
            elapsed = time.perf_counter() - started
            images_per_s = seen / elapsed if elapsed > 0 else 0.0
            row: dict[str, Any] = {"stage": stage.name, "epoch": epoch, **{k: float(v) / max(seen, 1) for k, v in sums.items()}}
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["images_per_s"] = images_per_s
            row["train_time_s"] = elapsed

            if val_loader is not None:
                val_metrics = self.evaluate(val_loader, heads, evaluators, stage)[0]
                row.update({f"val/{k}": v for k, v in val_metrics.items()})
                metric = stage.select.metric
                if metric not in val_metrics:
                    raise RecipeError([f"stages.{stage.name}.select.metric: '{metric}' is not a validation metric; "
                                       f"available: {', '.join(sorted(val_metrics))}"])
                value = val_metrics[metric]
                better = best["value"] is None or (value > best["value"] if stage.select.maximize else value < best["value"])
                if better and math.isfinite(value):
                    best = {"epoch": epoch, "value": value, "metrics": val_metrics}
                    rundir.save_torch(ckpt_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch, metric: value, "arch": model.encoder.arch})
            if objective is not None and hasattr(objective, "on_epoch_end") and fixed_batch is not None:
                (self.out / stage.name).mkdir(parents=True, exist_ok=True)
                objective.eval()
                with torch.no_grad():
                    objective.on_epoch_end(epoch=epoch, batch=fixed_batch, out_dir=self.out / stage.name)

            rundir.save_torch(ckpt_dir / "last.pt", {
                "model": model.state_dict(),
                "objective": objective.state_dict() if objective is not None else None,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best": best,
                "rng": rng_state(),
                "arch": model.encoder.arch,
            })
            self.metrics.append(row)
            log(_epoch_line(stage, epoch, row, stage.select.metric))
            self.pm.hook.corex_epoch_end(run=self.context, stage=stage.name, epoch=epoch, metrics=row)

        if best["epoch"] is not None:
            self._load_model(ckpt_dir / "best.pt")
        model.encoder.requires_grad_(True)
        rundir.save_torch(ckpt_dir / "model.pt", {
            "model": model.state_dict(), "arch": model.encoder.arch, "in_channels": model.encoder.in_channels,
            "stage": stage.name, "rng": rng_state(),
        })
        last_row = next((r for r in reversed(self.metrics.rows()) if r.get("stage") == stage.name), {})
        result: dict[str, Any] = {"kind": stage.kind, "epochs": stage.epochs, "images_per_s": round(images_per_s, 2)}
        if pretrain:
            result["metrics"] = {k[len("train/"):]: v for k, v in last_row.items() if k.startswith("train/")}
        else:
            result["metrics"] = best["metrics"]
            result["best_epoch"] = best["epoch"]
            result["selected_on"] = stage.select.metric
        return result

    def _step_loss(self, stage: Stage, batch: dict[str, Any], augment: Callable, objective: nn.Module | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one training step, and the extra scalars to log.

        A pretrain stage hands the batch and the augmentation to its objective (which may make
        several views); a train stage augments once and sums the heads' weighted losses.
        """
        if objective is not None:
            out = objective(batch, augment)
            return out["loss"], {f"train/{k}": v for k, v in out.items() if k != "loss"}
        with torch.no_grad():
            batch = augment(batch)
        outputs = self.model(batch["image"], list(stage.heads))
        losses = {h: self.model.heads[h].loss(outputs[h], batch) for h in stage.heads}
        loss = sum(stage.heads[h].weight * losses[h] for h in stage.heads)
        return loss, ({f"train/loss/{h}": v for h, v in losses.items()} if len(losses) > 1 else {})

    def evaluate(self, loader: DataLoader, heads: list[str], evaluators: list[tuple[str, Any]], stage: Stage, artefacts: Path | None = None):
        # Each head's weight from the latest train stage so far that defines it, as it was trained.
        weights: dict[str, float] = {}
        for earlier in self.recipe.stages.values():
            weights.update({h: head.weight for h, head in earlier.heads.items()})
            if earlier.name == stage.name:
                break
        return evaluate_loader(
            self.model, loader, heads, evaluators, self.device, weights=weights, amp=autocast_dtype(stage, self.device),
            channels_last=self.recipe.model.channels_last, artefacts=artefacts, where=f"stages.{stage.name}",
        )

    def evaluate_stage(self, stage: Stage) -> dict[str, Any]:
        self._start_encoder(stage)
        evaluators = build_evaluators(stage, self.class_names, self.registry)
        loader = self._loader(stage.split, stage, shuffle=False)
        heads = list(self.model.heads)
        metrics, intervals = self.evaluate(loader, heads, evaluators, stage, artefacts=self.out / stage.name)
        line = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k)
        log(f"[{stage.name}] {stage.split}: {line}")
        result: dict[str, Any] = {"kind": "evaluate", "split": stage.split, "metrics": metrics}
        if intervals:
            result["intervals"] = {k: [float(lo), float(hi)] for k, (lo, hi) in intervals.items()}
        return result


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
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Head losses plus every evaluator's metrics and intervals over ``loader``.

    ``evaluators`` are ``(recipe path, evaluator)`` pairs; the path names the evaluator in errors.
    The loss is weighted like the training loss, so the curves are comparable.
    """
    model.eval()
    for _, evaluator in evaluators:
        evaluator.reset()
    loss_sums = {h: 0.0 for h in heads}
    total = 0
    for index, batch in enumerate(loader):
        if index == 0:
            check_intensities(batch, where)
        batch = to_device(batch, device, channels_last)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            outputs = model(batch["image"], heads)
            for h in heads:
                loss_sums[h] += model.heads[h].loss(outputs[h], batch).item() * batch["image"].shape[0]
        total += batch["image"].shape[0]
        outputs = {k: v.detach().float() for k, v in outputs.items()}
        for path, evaluator in evaluators:
            try:
                if getattr(evaluator, "needs_model", False):  # e.g. saliency: gradients through the model
                    evaluator.update(batch, outputs, model=model)
                else:
                    evaluator.update(batch, outputs)
            except KeyError as exc:
                raise CorexError(f"{path}: reads the output of head {exc}, but the model's heads are {', '.join(heads) or 'none'}") from exc
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
            metrics[key] = float(value)
        if hasattr(evaluator, "intervals"):
            intervals.update(evaluator.intervals())
        if artefacts is not None and hasattr(evaluator, "save"):
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
    registry = registry or Registry()
    specs = evaluators if evaluators is not None else list(heads)
    built = []
    for i, spec in enumerate(specs):
        component = Component(spec) if isinstance(spec, str) else Component(spec["name"], {k: v for k, v in spec.items() if k != "name"})
        built.append((f"evaluators[{i}]", build_component(registry, "evaluators", component, f"evaluators[{i}]", class_names=list(class_names))))
    target = resolve_device(device)
    model.to(target)
    return evaluate_loader(model, loader, heads, built, target, artefacts=Path(out) if out else None)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not enabled, dynamic_ncols=True)


def _epoch_line(stage: Stage, epoch: int, row: Mapping[str, Any], select: str) -> str:
    parts = [f"[{stage.name}] epoch {epoch}/{stage.epochs}", f"loss {row.get('train/loss', float('nan')):.4f}"]
    if "val/loss" in row:
        parts.append(f"val loss {row['val/loss']:.4f}")
    if select != "loss" and f"val/{select}" in row:
        parts.append(f"val {select} {row[f'val/{select}']:.4f}")
    parts.append(f"{row['images_per_s']:.1f} img/s")
    return "  ".join(parts)


def run(recipe: Recipe, out: str | Path | None = None, *, resume: bool = False, progress: bool | None = None, registry: Registry | None = None) -> dict[str, Any]:
    """Run ``recipe`` into ``out`` (default: the recipe's ``output``, else ``runs/<name>``)."""
    out = Path(out) if out is not None else (recipe.output or Path("runs") / recipe.name)
    return Runner(recipe, out, resume=resume, progress=progress, registry=registry or Registry(get_plugin_manager())).run()
