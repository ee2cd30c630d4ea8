"""Building a recipe's components from their registered factories, held to their contract.

Every kind goes through :func:`build_component`: it hands the factory exactly the arguments its
kind's declaration (:mod:`corex.kinds`) says the core supplies, binds the recipe's options, and
checks the built object against its protocol (:mod:`corex.contract`). A plugin's ``ValueError`` or
``TypeError`` while building becomes a recipe problem at the component's path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from corex import contract
from corex.binding import accepted_injections
from corex.checks import Culprit, remember
from corex.errors import CorexError, RecipeError, did_you_mean
from corex.interfaces import LearnsFromTraining
from corex.kinds import KINDS
from corex.loaders import StagePlan, stage_plan, steps_per_epoch
from corex.model import CorexModel
from corex.plugins import Registry
from corex.schema import Component, Recipe, Stage

DEFAULT_CACHE = Path(os.environ.get("COREX_CACHE", "~/.cache/corex")).expanduser()


@contextlib.contextmanager
def _reported_as(path: str, label: str) -> Iterator[None]:
    """A plugin's ValueError or TypeError while building becomes a recipe problem at ``path``, naming the component."""
    try:
        yield
    except CorexError:
        raise
    except (ValueError, TypeError) as exc:
        raise RecipeError([f"{path}: {label}: {exc}"]) from exc


def build_component(registry: Registry, kind: str, component: Component, path: str, **injected: Any) -> Any:
    """Build ``component`` of ``kind`` from its registered factory and hold it to its protocol.

    ``injected`` must be exactly the arguments the kind declares (corex.kinds); the factory
    receives those its signature names, plus the recipe's options. Every missing member of the
    built object is one problem at ``path``.
    """
    declared = KINDS[kind]
    if set(injected) != set(declared.injected):  # a bug in corex, not a user's mistake
        raise TypeError(f"building a {declared.singular}: corex supplied {sorted(injected)}, but corex.kinds declares {sorted(declared.injected)}")
    registered = registry.get(kind, component.name)
    factory = registered.factory
    label = registry.label(kind, component.name)
    with _reported_as(path, label):
        built = factory(**accepted_injections(factory, injected), **component.options)
    problems = contract.built_problems(kind, built, label, path)
    if problems:
        raise RecipeError(problems)
    remember(built, Culprit(label, path, declared.protocol.__name__.lower(), third_party=not registry.is_builtin(registered.plugin)))
    return built


def objective_arguments(recipe: Recipe, stage: Stage, encoder: Any, dataset_size: int) -> dict[str, Any]:
    """What the core supplies to an objective's factory."""
    per_epoch = steps_per_epoch(dataset_size, recipe.stage_batch_size(stage), stage.max_steps_per_epoch)
    total = stage_plan(stage, per_epoch).total_steps
    return {"encoder": encoder, "channels": tuple(encoder.channels), "strides": tuple(encoder.strides),
            "batch_size": recipe.stage_batch_size(stage), "dataset_size": dataset_size, "total_steps": total}


def build_objective(registry: Registry, recipe: Recipe, stage: Stage, encoder: Any, dataset_size: int) -> nn.Module:
    return build_component(registry, "objectives", stage.objective, f"stages.{stage.name}.objective",
                           **objective_arguments(recipe, stage, encoder, dataset_size))


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
    return build_component(registry, "datasets", Component(data.name, data.options), path,
                           image_size=data.image_size, seed=recipe.seed if data.seed is None else data.seed, cache_dir=cache_dir)


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


def recipe_heads(recipe: Recipe) -> dict[str, tuple[Component, str]]:
    """Every head the recipe's stages define, by name: its component and the recipe path of its first definition."""
    heads: dict[str, tuple[Component, str]] = {}
    for stage in recipe.stages.values():
        for name, head in stage.heads.items():
            heads.setdefault(name, (head.component, f"stages.{stage.name}.heads.{name}"))
    return heads


def build_heads(heads: Mapping[str, tuple[Component, str]], encoder: Any, num_classes: int, registry: Registry) -> dict[str, nn.Module]:
    """Each head on ``encoder``'s pyramid; every head's problems are reported together."""
    built: dict[str, nn.Module] = {}
    problems: list[str] = []
    for name, (component, path) in heads.items():
        try:
            built[name] = build_component(registry, "heads", component, path, channels=tuple(encoder.channels), strides=tuple(encoder.strides),
                                          num_classes=num_classes)
        except RecipeError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems)
    return built


def assemble_model(encoder: Component, heads: Mapping[str, tuple[Component, str]], num_classes: int, registry: Registry | None = None,
                   encoder_path: str = "model.encoder") -> CorexModel:
    """A freshly initialised model from an encoder and heads, each a component with its recipe path."""
    registry = registry or Registry()
    built = build_component(registry, "encoders", encoder, encoder_path)
    return CorexModel(built, build_heads(heads, built, num_classes, registry))


def build_model(recipe: Recipe, num_classes: int, registry: Registry | None = None) -> CorexModel:
    """The encoder and every head defined by the recipe's train stages."""
    try:
        return assemble_model(recipe.model.encoder, recipe_heads(recipe), num_classes, registry)
    except RecipeError as exc:
        raise RecipeError(exc.problems, source=recipe.source) from None


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


def build_optimizer(params: list[nn.Parameter], spec, registry: Registry | None = None, path: str = "optimizer"):
    """The recipe's optimizer from its registered factory. No weight decay on biases and
    normalisation weights (1-D tensors): it only fights their scale."""
    registry = registry or Registry()
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return build_component(registry, "optimizers", Component(spec.name, spec.options), path, param_groups=groups, lr=spec.lr,
                           weight_decay=spec.weight_decay, momentum=spec.momentum, betas=tuple(spec.betas))


def build_schedule(optimizer: Any, spec, plan: StagePlan, registry: Registry | None = None, path: str = "schedule"):
    """The recipe's learning-rate schedule from its registered factory, stepped every optimisation
    step; a warm-up in epochs is converted to steps with the stage's full epochs."""
    registry = registry or Registry()
    warmup = spec.warmup_steps if spec.warmup_steps is not None else round(spec.warmup_epochs * plan.steps_per_epoch)
    return build_component(registry, "schedules", Component(spec.name, spec.options), path, optimizer=optimizer,
                           total_steps=plan.total_steps, warmup_steps=warmup, steps_per_epoch=plan.steps_per_epoch, epochs=plan.epochs,
                           min_lr_ratio=spec.min_lr_ratio)


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


def selection_problem(stage: Stage, registry: Registry) -> None:
    """A train stage selects its best epoch on a metric that one of its evaluators' plugins declares
    (corex.metrics), or on a loss; anything else could never be found in the validation metrics."""
    from corex.metrics import catalog

    metric = stage.select.metric
    if metric == "loss" or (metric.startswith("loss/") and metric[5:] in stage.heads):
        return
    plugins = {registry.get("evaluators", e.name).plugin for e in stage.evaluators}
    declared = catalog(registry.pm)
    if declared.get(metric) is not None and declared.plugin(metric) in plugins:
        return
    offered = sorted(m.name for m in declared if declared.plugin(m.name) in plugins)
    evaluators = ", ".join(e.name for e in stage.evaluators) or "none"
    raise RecipeError([f"stages.{stage.name}.select.metric: '{metric}' is not a metric this stage's evaluators declare "
                       f"(evaluators: {evaluators}; they declare {', '.join(offered) or 'nothing'}; or 'loss')"
                       f"{did_you_mean(metric, [m for m in offered if '*' not in m])}. A third-party evaluator declares its "
                       "metrics with corex_metrics (docs/writing-a-plugin.md#what-your-metrics-mean)"])


def check_components(recipe: Recipe, source: Any, registry: Registry, stage_sources: Mapping[str, Any] | None = None) -> CorexModel:
    """Build the model and, once, every stage's augmentation, evaluators, objective, optimizer and
    schedule, so that the plugins' own checks (a Kornia op that does not exist, a queue size that does
    not divide the batch) and the contract's (a member missing, a pyramid that is not what it declares,
    a selection metric no evaluator declares) are all reported together before any training starts.
    Returns the model."""
    from corex.recipe import iter_components

    problems: list[str] = []
    for kind, path, component in iter_components(recipe):
        with contextlib.suppress(KeyError):  # unknown names were reported when the recipe loaded
            registered = registry.get(kind, component.name)
            label = registry.label(kind, component.name)
            problems.extend(contract.factory_problems(registered.factory, KINDS[kind].injected, label, path))
    class_names = list(source.class_names)
    encoder, encoder_problems = None, []
    try:
        encoder = build_component(registry, "encoders", recipe.model.encoder, "model.encoder")
        registered = registry.get("encoders", recipe.model.encoder.name)
        encoder_problems = contract.pyramid_problems(encoder, registry.label("encoders", recipe.model.encoder.name), "model.encoder")
    except RecipeError as exc:
        encoder_problems = exc.problems
    problems.extend(encoder_problems)
    usable = encoder if encoder is not None and not encoder_problems else _StandInEncoder()
    heads: dict[str, nn.Module] = {}
    try:
        heads = build_heads(recipe_heads(recipe), usable, len(class_names), registry)
    except RecipeError as exc:
        problems.extend(exc.problems)
    stage_sources = stage_sources or {}
    for stage in recipe.stages.values():
        stage_source = stage_sources.get(stage.name, source)

        def check_evaluators(stage: Stage = stage) -> None:
            evaluators = build_evaluators(stage, class_names, registry)
            if stage.kind == "train":  # validation does not show them the training split
                learners = [f"{path}: evaluator '{stage.evaluators[i].name}' learns from the training split, so it runs only in an "
                            "evaluate stage (add one after this stage)" for i, (path, e) in enumerate(evaluators) if isinstance(e, LearnsFromTraining)]
                if learners:
                    raise RecipeError(learners)
                selection_problem(stage, registry)

        objective = None

        def check_objective(stage: Stage = stage) -> None:
            nonlocal objective
            objective = build_objective(registry, recipe, stage, usable, len(stage_source.split("train")))
            label = registry.label("objectives", stage.objective.name)
            if found := contract.objective_problems(objective, usable, label, f"stages.{stage.name}.objective"):
                raise RecipeError(found)

        def check_optimisation(stage: Stage = stage) -> None:  # the optimizer and schedule the stage will build
            modules = [usable, *(heads[h] for h in stage.heads if h in heads), *([objective] if objective is not None else [])]
            params = list({id(p): p for m in modules for p in m.parameters()}.values())
            fraction = 1.0 if stage.kind == "pretrain" else recipe.stage_data(stage).label_fraction
            per_epoch = steps_per_epoch(len(stage_source.split("train", label_fraction=fraction)), recipe.stage_batch_size(stage),
                                        stage.max_steps_per_epoch)
            optimizer = build_optimizer(params, recipe.stage_optimizer(stage), registry,
                                        f"stages.{stage.name}.optimizer" if stage.optimizer is not None else "optimizer")
            build_schedule(optimizer, recipe.stage_schedule(stage), stage_plan(stage, per_epoch), registry,
                           f"stages.{stage.name}.schedule" if stage.schedule is not None else "schedule")

        builders = [lambda: build_augment(stage, registry), check_evaluators]
        if stage.objective is not None:
            builders.append(check_objective)
        if stage.kind != "evaluate":
            builders.append(check_optimisation)
        for build in builders:
            try:
                build()
            except RecipeError as exc:
                problems.extend(exc.problems)
    for i, component in enumerate(recipe.components.get("loggers", [])):  # loggers write nothing until they start
        try:
            build_component(registry, "loggers", component, f"loggers[{i}]", run_dir=Path("."))
        except RecipeError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems, source=recipe.source)
    return CorexModel(encoder, heads)


__all__ = ["DEFAULT_CACHE", "assemble_model", "build_augment", "build_component", "build_data", "build_evaluators", "build_heads", "build_model",
           "build_objective", "build_optimizer", "build_schedule", "build_stage_data", "check_components",
           "objective_arguments", "recipe_heads"]
