"""Recipes: YAML in, a validated :class:`Recipe` out, with every problem reported at once.

A recipe names components (``resnet18``, ``classification``, ``moco`` ...) and their options. The
schema here covers the core's own keys; each component's options are bound to the signature of
the factory that provides it (see :mod:`corex.binding`). Paths in messages use stage names:
``stages.finetune.heads.segmentation.weight: expected a number, got 'high'``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml

from corex.binding import Problems, bind_options, check_value
from corex.errors import RecipeError, did_you_mean
from corex.plugins import Registry

# Arguments the core supplies to factories of each kind (see docs/writing-a-plugin.md).
INJECTED: dict[str, tuple[str, ...]] = {
    "encoders": (),
    "heads": ("channels", "strides", "num_classes"),
    "objectives": ("encoder", "channels", "strides", "batch_size", "dataset_size"),
    "evaluators": ("class_names", "split"),
    "augmentations": (),
    "datasets": ("image_size", "seed", "cache_dir"),
    "optimizers": ("param_groups", "lr", "weight_decay", "momentum", "betas"),
    "schedules": ("optimizer", "steps_per_epoch", "epochs", "warmup_epochs", "min_lr_ratio"),
}

StageKind = Literal["train", "pretrain", "evaluate"]
_TRAINING_KEYS = ("kind", "data", "epochs", "batch_size", "optimizer", "schedule", "augment", "encoder_from", "grad_clip", "amp",
                  "max_steps_per_epoch", "checkpoint_every")
# The stage keys that mean something for each kind of stage (the resolved recipe shows only these).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "train": (*_TRAINING_KEYS, "heads", "evaluators", "freeze", "select", "ema"),
    "pretrain": (*_TRAINING_KEYS, "objective"),
    "evaluate": ("kind", "data", "batch_size", "evaluators", "split", "encoder_from", "amp"),
}

# libyaml's safe loader where PyYAML has it: the same YAML, read several times faster.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# -- value checks, run as each value is read so that they are reported with every other problem ----


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@attrs.frozen
class Limits:
    """The sensible values of a numeric recipe key: bounds (each open or closed), a step, a reason.

    Attached to a schema field as ``metadata={"check": Limits(...)}``; a tuple value (``betas``)
    is checked item by item.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: ``low`` itself is refused
    high_open: bool = False
    multiple_of: int | None = None
    low_why: str = ""  # said when the value is below ``low``
    high_why: str = ""  # said when the value is above ``high``
    multiple_why: str = ""  # said when the value is not a multiple

    def __call__(self, value: float) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            why = self.low_why if too_low else self.high_why
            return f"must be {self._wanted(too_low)}, got {_number(value)}{f' ({why})' if why else ''}"
        if self.multiple_of and value % self.multiple_of:
            because = f" ({self.multiple_why})" if self.multiple_why else ""
            return f"must be a multiple of {self.multiple_of}{because}, got {_number(value)}"
        return None

    def _wanted(self, too_low: bool) -> str:
        """The interval, or when a bound has a reason of its own, just the bound that was crossed."""
        if self.low is not None and self.high is not None and not (self.low_why or self.high_why):
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"
        if too_low:
            return f"{'greater than' if self.low_open else 'at least'} {_number(self.low)}"
        return f"{'less than' if self.high_open else 'at most'} {_number(self.high)}"


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device_problem(value: str) -> str | None:
    if DEVICE.fullmatch(value):
        return None
    hint = did_you_mean(value, ["auto", "cpu", "cuda", "mps"])
    return f"expected auto, cpu, cuda, cuda:N (a GPU index) or mps, got {value!r}{hint}"


def checked(default: Any, check: Callable[[Any], str | None]) -> Any:
    """A schema field whose well-typed value must also pass ``check`` (a message, or None if fine)."""
    return attrs.field(default=default, metadata={"check": check})


POSITIVE = Limits(low=0, low_open=True)
NON_NEGATIVE = Limits(low=0)
AT_LEAST_ONE = Limits(low=1)
FRACTION = Limits(low=0, high=1)
MAX_EPOCHS = 100_000
BATCH_SIZES = Limits(low=1, high=2**20, high_why="more than a million images per batch is surely a typo")
LOADER_WORKERS = Limits(low=0, high=1024, high_why="each worker is a process")
IMAGE_SIZES = Limits(
    low=32, high=4096, multiple_of=32, low_why="the encoders' deepest stride", multiple_why="the encoders' deepest stride",
    high_why="a larger side would not fit in memory: the decoded cache alone holds 2 bytes per pixel of every image",
)


@attrs.define
class Component:
    """A component reference: registered ``name`` plus the options bound to its factory."""

    name: str
    options: dict[str, Any] = attrs.field(factory=dict)



@attrs.define
class Head:
    component: Component
    weight: float = checked(1.0, NON_NEGATIVE)


@attrs.define
class Data:
    name: str
    image_size: int = checked(256, IMAGE_SIZES)
    batch_size: int = checked(16, BATCH_SIZES)
    num_workers: int = checked(0, LOADER_WORKERS)
    label_fraction: float = checked(1.0, Limits(low=0, high=1, low_open=True))
    # Reduce the validation split to label_fraction too: with 10% of the labels, model selection
    # on a fully labelled validation split would use labels the study pretends not to have.
    reduce_val: bool = False
    cache_dir: Path | None = None
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Model:
    encoder: Component
    channels_last: bool = True
    # Batch-norm statistics over the whole global batch under torch.distributed (CUDA only).
    sync_batchnorm: bool = False


@attrs.define
class Optimizer:
    """A registered optimizer (built-ins: sgd, adam, adamw) with the core's settings; any other key
    is the optimizer factory's own option."""

    name: str = "adamw"
    lr: float = checked(1e-3, POSITIVE)
    weight_decay: float = checked(1e-4, NON_NEGATIVE)
    momentum: float = checked(0.9, Limits(low=0, high=1, high_open=True))  # SGD only
    betas: tuple[float, float] = checked((0.9, 0.999), Limits(low=0, high=1, high_open=True))  # Adam/AdamW only
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Schedule:
    """A registered learning-rate schedule (built-ins: cosine, constant); any other key is the
    schedule factory's own option."""

    name: str = "cosine"
    warmup_epochs: float = checked(0.0, NON_NEGATIVE)
    min_lr_ratio: float = checked(0.0, FRACTION)
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Select:
    """Which validation metric picks the best checkpoint of a train stage."""

    metric: str = "loss"
    mode: Literal["min", "max", "auto"] = "auto"

    @property
    def maximize(self) -> bool:
        return self.mode == "max" or (self.mode == "auto" and "loss" not in self.metric)


@attrs.define
class Stage:
    name: str
    kind: StageKind
    epochs: int = checked(1, Limits(low=1, high=MAX_EPOCHS, high_why=f"more than {MAX_EPOCHS:,} epochs is surely a typo"))
    batch_size: int | None = checked(None, BATCH_SIZES)  # None: data.batch_size
    optimizer: Optimizer | None = None
    schedule: Schedule | None = None
    heads: dict[str, Head] = attrs.field(factory=dict)
    objective: Component | None = None
    augment: Component | None = None
    evaluators: list[Component] = attrs.field(factory=list)
    split: Literal["train", "val", "test"] = "test"
    encoder_from: str | None = None
    freeze: bool = False
    select: Select = attrs.field(factory=Select)
    grad_clip: float | None = checked(None, POSITIVE)  # None: no clipping
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    max_steps_per_epoch: int | None = checked(None, AT_LEAST_ONE)
    # This stage's own data source (e.g. pre-training on an unlabelled corpus); None: the recipe's.
    data: Data | None = None
    # Also write last.pt every N optimisation steps, for epochs too long to lose (None: epoch ends only).
    checkpoint_every: int | None = checked(None, AT_LEAST_ONE)
    # Exponential moving average of the weights with this decay (e.g. 0.999), used for validation and
    # the stage's final model (None: off).
    ema: float | None = checked(None, Limits(low=0, high=1, low_open=True, high_open=True))


@attrs.define
class Recipe:
    name: str
    data: Data
    model: Model
    stages: dict[str, Stage]
    description: str = ""
    seed: int = checked(0, Limits(low=0, high=2**63 - 1))
    device: str = checked("auto", _device_problem)
    deterministic: bool = False
    output: Path | None = None
    optimizer: Optimizer = attrs.field(factory=Optimizer)
    schedule: Schedule = attrs.field(factory=Schedule)
    source: str | None = attrs.field(default=None, eq=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`load_recipe` turns back into an equal recipe."""
        return _unstructure(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A short hash of the resolved recipe, recorded in exports and used to check resumes."""
        data = self.resolved(Path("."))
        data["data"].pop("cache_dir")  # where decoded images are kept changes no result
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def stage_optimizer(self, stage: Stage) -> Optimizer:
        return stage.optimizer or self.optimizer

    def stage_schedule(self, stage: Stage) -> Schedule:
        return stage.schedule or self.schedule

    def stage_data(self, stage: Stage) -> Data:
        """The data a stage reads: its own ``data``, else the recipe's."""
        return stage.data if stage.data is not None else self.data

    def stage_batch_size(self, stage: Stage) -> int:
        return self.stage_data(stage).batch_size if stage.batch_size is None else stage.batch_size

    def resolved(self, default_cache: Path) -> dict[str, Any]:
        """The recipe as a run uses it: each stage's inherited optimizer, schedule and batch size
        and the cache path filled in, and keys that mean nothing for a stage's kind left out.
        Loading it back gives a recipe whose ``resolved()`` is the same."""
        data = self.to_dict()
        data["data"]["cache_dir"] = str(Path(self.data.cache_dir or default_cache).expanduser())
        for name, stage in self.stages.items():
            entry = data["stages"][name]
            entry["batch_size"] = self.stage_batch_size(stage)
            if stage.data is not None:
                entry["data"]["cache_dir"] = str(Path(stage.data.cache_dir or default_cache).expanduser())
            if stage.kind != "evaluate":
                entry["optimizer"] = _unstructure(self.stage_optimizer(stage))
                entry["schedule"] = _unstructure(self.stage_schedule(stage))
            keep = [k for k in STAGE_KEYS[stage.kind] if k != "data" or stage.data is not None]  # no `data: null` noise
            data["stages"][name] = {k: v for k, v in entry.items() if k in keep}
        return data


# -- loading --------------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError([f"cannot read the recipe: {exc.strerror}"], source=str(path)) from exc
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError([f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})"], source=str(path)) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"the top level must be a mapping, got {type(data).__name__}"], source=str(path))
    return data


def first_comment(path: Path) -> str:
    """The recipe's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Apply ``KEY=VALUE`` overrides in place; return problems (unknown paths, bad syntax).

    Keys are dotted paths (stages by name, list items by index); values are parsed as YAML, so
    ``3`` is a number, ``[a, b]`` a list and ``null`` none. A component written as a bare name
    becomes ``{name: ...}`` when one of its options is set.
    """
    problems = []
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {override!r}: expected KEY=VALUE, e.g. stages.train.epochs=3")
            continue
        try:
            value = yaml.load(raw, Loader=SAFE_LOADER) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node: Any = data
        trail: list[str] = []
        for i, part in enumerate(parts[:-1]):
            trail.append(part)
            child = _child(node, part)
            if child is _ABSENT:
                keys = list(node) if isinstance(node, dict) else []
                where = ".".join(trail[:-1]) or "the top level"
                problems.append(f"--set {key}: there is no '{part}' under {where}{did_you_mean(part, keys)}")
                break
            if isinstance(child, str) and i + 1 < len(parts):  # bare component name -> mapping
                child = {"name": child}
                _assign(node, part, child)
            elif child is None:
                child = {}
                _assign(node, part, child)
            node = child
        else:
            if not _assign(node, parts[-1], value):
                problems.append(f"--set {key}: '{'.'.join(parts[:-1])}' is not a mapping or list")
    return problems


_ABSENT = object()


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part, _ABSENT)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return _ABSENT


def _assign(node: Any, part: str, value: Any) -> bool:
    if isinstance(node, dict):
        node[part] = value
        return True
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        node[int(part)] = value
        return True
    return False


def load_recipe(
    source: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    registry: Registry | None = None,
) -> Recipe:
    """Load, override and validate a recipe; raise :class:`RecipeError` listing every problem.

    ``source`` is a YAML file or an already-parsed mapping (a custom study can build one in
    Python). Component options are bound to the registered factories of ``registry`` (the
    process-wide plugins by default).
    """
    if isinstance(source, Mapping):
        data, where, default_name = copy.deepcopy(dict(source)), None, "recipe"
    else:
        path = Path(source)
        data, where, default_name = read_yaml(path), str(path), path.stem
    problems = Problems(apply_overrides(data, overrides))
    data.setdefault("name", default_name)
    recipe = _structure(Recipe, data, "", problems)
    if recipe is not None:  # bind and cross-check what could be read, to report everything at once
        recipe.stages = {k: v for k, v in recipe.stages.items() if v is not None}
        for stage in recipe.stages.values():
            stage.heads = {k: v for k, v in stage.heads.items() if v is not None}
            stage.evaluators = [e for e in stage.evaluators if e is not None]
        _bind_components(recipe, registry or Registry(), problems)
    if recipe is not None and not problems:  # cross-checks compare values, so only well-typed ones
        _cross_check(recipe, problems)
    if problems:
        raise RecipeError(problems, source=where)
    recipe.source = where
    return recipe


# -- structuring: plain data -> attrs classes ------------------------------------------------------

# Keys the core reads from a component mapping; the rest are the factory's options.
_COMPONENT_KEYS = {"name"}


def _structure(cls: type, data: Any, path: str, problems: Problems) -> Any:
    hints = typing.get_type_hints(cls)
    if cls is Component:
        return _component(data, path, problems)
    if not isinstance(data, Mapping):
        problems.add(path or "recipe", f"expected a mapping, got {data!r}")
        return None
    fields = {f.name: f for f in attrs.fields(cls) if f.name != "source"}
    data = dict(data)
    if cls in (Data, Optimizer, Schedule):  # the component's own options sit beside the core's keys
        core = {k for k in fields if k != "options"}
        options = {k: data.pop(k) for k in list(data) if k not in core}
        data["options"] = options
    if cls is Recipe and isinstance(data.get("stages"), Mapping):
        data["stages"] = {
            name: ({**spec, "name": name} if isinstance(spec, Mapping) else spec)
            for name, spec in data["stages"].items()
        }
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            known = [k for k in fields if k != "options" and not (cls is Stage and k == "name")]
            problems.add(where, f"unknown key{did_you_mean(key, known) or '.'} Known keys: {', '.join(known)}")
            continue
        before = len(problems)
        kwargs[key] = _field_value(hints[key], value, where, problems)
        check = fields[key].metadata.get("check")
        if check is not None and len(problems) == before and kwargs[key] is not None:
            _check_value(check, kwargs[key], where, problems)
    for name, field in fields.items():
        if field.default is attrs.NOTHING and name not in kwargs:
            problems.add(f"{path}.{name}" if path else name, "is required")
    if any(v is None and fields[k].default is attrs.NOTHING for k, v in kwargs.items()):
        return None
    try:
        return cls(**kwargs)
    except TypeError:  # missing fields, already reported
        return None


def _field_value(annotation: Any, value: Any, path: str, problems: Problems) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, __import__("types").UnionType) and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _field_value(inner[0], value, path, problems)
    if annotation is Select and isinstance(value, str):  # `select: macro_f1` shorthand
        return Select(metric=value)
    if attrs.has(annotation) and annotation is not Head:
        return _structure(annotation, value, path, problems)
    if origin is dict and args and args[1] is Stage:
        if not isinstance(value, Mapping) or not value:
            problems.add(path, "expected a mapping of stage name to stage, e.g. {train: {kind: train, ...}}")
            return {}
        return {name: _structure(Stage, spec, f"{path}.{name}", problems) for name, spec in value.items()}
    if origin is dict and args and args[1] is Head:
        if not isinstance(value, Mapping):
            problems.add(path, "expected a mapping of head name to head, e.g. {classification: {weight: 1.0}}")
            return {}
        return {name: _head(name, spec, f"{path}.{name}", problems) for name, spec in value.items()}
    if origin is list and args and args[0] is Component:
        if isinstance(value, (str, Mapping)):
            value = [value]
        if not isinstance(value, list):
            problems.add(path, f"expected a list of components, got {value!r}")
            return []
        return [_component(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return check_value(value, annotation, path, problems)


def _check_value(check: Callable[[Any], str | None], value: Any, path: str, problems: Problems) -> None:
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_value(check, item, f"{path}[{i}]", problems)
        return
    problem = check(value)
    if problem:
        problems.add(path, problem)


def _component(value: Any, path: str, problems: Problems) -> Component | None:
    if isinstance(value, str):
        return Component(value)
    if isinstance(value, Mapping):
        if "name" not in value:
            problems.add(path, "a component needs a 'name' (e.g. {name: resnet18, width: 16})")
            return None
        name = value["name"]
        if not isinstance(name, str):
            problems.add(f"{path}.name", f"expected a string, got {name!r}")
            return None
        return Component(name, {k: v for k, v in value.items() if k not in _COMPONENT_KEYS})
    problems.add(path, f"expected a component name or a mapping with 'name', got {value!r}")
    return None


def _head(key: str, value: Any, path: str, problems: Problems) -> Head | None:
    if value is None or isinstance(value, str):
        return Head(Component(value or key))
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a mapping of head options (or nothing), got {value!r}")
        return None
    options = dict(value)
    before = len(problems)
    weight = check_value(options.pop("weight", 1.0), float, f"{path}.weight", problems)
    if len(problems) == before:
        _check_value(attrs.fields(Head).weight.metadata["check"], weight, f"{path}.weight", problems)
    name = options.pop("name", key)
    return Head(Component(name, options), weight)


def _unstructure(obj: Any) -> Any:
    if isinstance(obj, Component):
        return {"name": obj.name, **_unstructure(obj.options)}
    if isinstance(obj, Head):
        return {"name": obj.component.name, "weight": obj.weight, **_unstructure(obj.component.options)}
    if isinstance(obj, (Data, Optimizer, Schedule)):
        out = {f.name: _unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj)) if f.name != "options"}
        return {**out, **_unstructure(obj.options)}
    if isinstance(obj, Stage):
        return {f.name: _unstructure(getattr(obj, f.name)) for f in attrs.fields(Stage) if f.name != "name"}
    if attrs.has(type(obj)):
        return {f.name: _unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj)) if f.name != "source"}
    if isinstance(obj, Mapping):
        return {k: _unstructure(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_unstructure(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# -- binding components and cross-references -------------------------------------------------------


def iter_components(recipe: Recipe):
    """Yield ``(kind, recipe path, Component)`` for every component the recipe names."""
    yield "datasets", "data", Component(recipe.data.name, recipe.data.options)
    yield "optimizers", "optimizer", Component(recipe.optimizer.name, recipe.optimizer.options)
    yield "schedules", "schedule", Component(recipe.schedule.name, recipe.schedule.options)
    if recipe.model.encoder is not None:
        yield "encoders", "model.encoder", recipe.model.encoder
    for stage in recipe.stages.values():
        base = f"stages.{stage.name}"
        if stage.data is not None:
            yield "datasets", f"{base}.data", Component(stage.data.name, stage.data.options)
        if stage.optimizer is not None:
            yield "optimizers", f"{base}.optimizer", Component(stage.optimizer.name, stage.optimizer.options)
        if stage.schedule is not None:
            yield "schedules", f"{base}.schedule", Component(stage.schedule.name, stage.schedule.options)
        for head_name, head in stage.heads.items():
            yield "heads", f"{base}.heads.{head_name}", head.component
        if stage.objective is not None:
            yield "objectives", f"{base}.objective", stage.objective
        if stage.augment is not None:
            yield "augmentations", f"{base}.augment", stage.augment
        for i, evaluator in enumerate(stage.evaluators):
            yield "evaluators", f"{base}.evaluators[{i}]", evaluator


def _bind_components(recipe: Recipe, registry: Registry, problems: Problems) -> None:
    for kind, path, component in iter_components(recipe):
        if not isinstance(component.name, str):
            continue  # a name of the wrong type: already reported by the schema check
        try:
            registered = registry.get(kind, component.name)
        except KeyError as exc:
            problems.add(path if kind not in ("datasets", "optimizers", "schedules") else f"{path}.name", exc.args[0])
            continue
        bound = bind_options(registered.factory, component.options, path, problems, injected=INJECTED[kind])
        component.options.clear()  # in place: a data block's Component shares its options dict
        component.options.update(bound)


def _cross_check(recipe: Recipe, problems: Problems) -> None:
    seen: list[str] = []
    head_specs: dict[str, tuple[str, Component]] = {}
    for stage in recipe.stages.values():
        base = f"stages.{stage.name}"
        if stage.kind == "train" and not stage.heads:
            problems.add(f"{base}.heads", "a train stage needs at least one head, e.g. {classification: {}}")
        if stage.kind != "train" and stage.heads:
            problems.add(f"{base}.heads", f"only train stages have heads; this stage is '{stage.kind}'")
        if stage.kind == "pretrain" and stage.objective is None:
            problems.add(f"{base}.objective", "a pretrain stage needs an objective, e.g. moco")
        if stage.kind != "pretrain" and stage.objective is not None:
            problems.add(f"{base}.objective", f"only pretrain stages have an objective; this stage is '{stage.kind}'")
        if stage.kind == "evaluate" and not stage.evaluators:
            problems.add(f"{base}.evaluators", "an evaluate stage needs at least one evaluator, e.g. [classification]")
        for head_name, head in stage.heads.items():
            earlier = head_specs.get(head_name)
            if earlier and earlier[1] != head.component:
                problems.add(
                    f"{base}.heads.{head_name}",
                    f"stage '{earlier[0]}' already defines head '{head_name}' with other options; "
                    "a head is one module shared by the stages, so give this one another name",
                )
            head_specs.setdefault(head_name, (stage.name, head.component))
        for i, evaluator in enumerate(stage.evaluators):
            head = evaluator.options.get("head")
            if isinstance(head, str) and head not in head_specs:
                problems.add(
                    f"{base}.evaluators[{i}].head",
                    f"no stage up to this one defines a head '{head}'{did_you_mean(head, head_specs) or '.'}",
                )
        source = stage.encoder_from
        if source is not None and source not in seen and not Path(source).expanduser().exists():
            problems.add(
                f"{base}.encoder_from",
                f"'{source}' is neither an earlier stage ({', '.join(seen) or 'none'}) nor an existing file"
                f"{did_you_mean(source, seen)}",
            )
        if stage.kind == "train" and stage.select.metric != "loss" and not stage.evaluators:
            problems.add(f"{base}.select.metric", f"selecting on '{stage.select.metric}' needs evaluators in this stage (validation runs them)")
        if stage.ema is not None and stage.kind != "train":
            problems.add(f"{base}.ema", f"only train stages keep an EMA of the weights; this stage is '{stage.kind}'")
        if stage.checkpoint_every is not None and stage.kind == "evaluate":
            problems.add(f"{base}.checkpoint_every", "an evaluate stage trains nothing and writes no checkpoints")
        seen.append(stage.name)
