"""The recipe's schema: attrs classes for the core's own keys, each value checked as it is read.

A recipe names components (``resnet18``, ``classification``, ``moco`` ...) and their options; the
options are bound to the signature of the factory that provides each (:mod:`corex.binding`), and
where each kind of component sits in a recipe is declared in :mod:`corex.kinds`. Loading YAML,
overrides and cross-checks are in :mod:`corex.recipe`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml

from corex.errors import did_you_mean

StageKind = Literal["train", "pretrain", "evaluate"]
_TRAINING_KEYS = ("kind", "data", "epochs", "steps", "batch_size", "optimizer", "schedule", "augment", "encoder_from", "grad_clip", "amp",
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
    # The data seed (a synthetic data set, the split, the label subset); None: the recipe's seed. With
    # it the study separates variation between data draws from variation between trainings.
    seed: int | None = checked(None, Limits(low=0, high=2**63 - 1))
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
    # Warm-up in optimisation steps; overrides warmup_epochs (equal warm-ups at any label fraction).
    warmup_steps: int | None = checked(None, NON_NEGATIVE)
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
    # A budget of optimisation steps instead of epochs: the stage runs ceil(steps / steps per epoch)
    # epochs, the last one cut short, so exactly this many steps are taken (None: epochs decide).
    steps: int | None = checked(None, Limits(low=1, high=10**9, high_why="a billion steps is surely a typo"))
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
    # The top-level component lists, by kind (corex.kinds.run_level): {"loggers": [...]}.
    components: dict[str, list[Component]] = attrs.field(factory=dict)
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

    def val_fraction(self, stage: Stage) -> float:
        """The share of the validation split a stage validates and calibrates on (``reduce_val``)."""
        data = self.stage_data(stage)
        return data.label_fraction if data.reduce_val else 1.0

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
    if isinstance(obj, Recipe):
        out = {f.name: _unstructure(getattr(obj, f.name)) for f in attrs.fields(Recipe) if f.name not in ("source", "components")}
        return {**out, **{kind: _unstructure(items) for kind, items in obj.components.items() if items}}
    if attrs.has(type(obj)):
        return {f.name: _unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj)) if f.name != "source"}
    if isinstance(obj, Mapping):
        return {k: _unstructure(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_unstructure(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


__all__ = ["Component", "Data", "Head", "Limits", "Model", "Optimizer", "Recipe", "Schedule", "Select", "Stage", "StageKind", "checked"]
