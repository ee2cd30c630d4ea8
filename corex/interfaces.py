"""What the objects built by plugin factories must provide.

These are structural types (``typing.Protocol``): a plugin does not inherit from them, it only has
to match. The core relies on nothing beyond what is written here.

The batch
---------
A batch is a ``dict``:

``image``      ``(B, 1, H, W)`` float32, intensities in ``[0, 1]`` (0 = air/black, 1 = dense/white,
               i.e. MONOCHROME2 after the modality and VOI transforms). The engine checks the first
               batch of every loader and refuses anything far outside that range.
``label``      ``(B,)`` int64 study-level class index, ``-1`` where unknown (unlabelled images).
``mask``       ``(B, 1, H, W)`` float32 opacity mask in ``{0, 1}`` (all zero when there is none).
``has_mask``   ``(B,)`` bool, whether ``mask`` is a real annotation (a negative study with no boxes
               is a real, empty annotation; an unannotated image is not).
``study_id``, ``image_id``, ``patient_id``   lists of ``str``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

if TYPE_CHECKING:  # annotations only: `corex --help` and `corex plugins` must not import torch
    from torch import Tensor
    from torch.utils.data import Dataset


class Batch(TypedDict, total=False):
    """The keys documented above; a plugin may add its own (augmentations pass them through)."""

    image: Tensor
    label: Tensor
    mask: Tensor
    has_mask: Tensor
    study_id: list[str]
    image_id: list[str]
    patient_id: list[str]


@runtime_checkable
class Encoder(Protocol):
    """An ``nn.Module`` turning images into a feature pyramid.

    ``forward(x)`` takes ``(B, in_channels, H, W)`` and returns a list of feature maps ordered
    from the highest resolution to the lowest; map ``i`` has ``channels[i]`` channels and is
    ``strides[i]`` times smaller than the input. ``state_dict()`` keys must be clean (no wrapper
    prefixes) so an exported encoder loads without key surgery.
    """

    arch: str  # e.g. "resnet18"; recorded in exports and checked when weights are loaded
    in_channels: int
    channels: Sequence[int]
    strides: Sequence[int]

    def __call__(self, x: Tensor) -> list[Tensor]: ...


@runtime_checkable
class Head(Protocol):
    """A task head on top of the pyramid.

    ``forward(features)`` returns the head's output (classification: logits ``(B, K)``;
    segmentation: mask logits ``(B, 1, H, W)`` at input resolution). ``loss(output, batch)``
    returns a scalar; it must ignore samples without a target (``label == -1`` or
    ``has_mask == False``) and return a zero that still has a graph when a batch has none.
    ``task`` tells evaluators what the output is ("classification", "segmentation", ...).
    The core multiplies each head's loss by the recipe's ``weight`` and sums them.
    """

    task: str

    def __call__(self, features: list[Tensor]) -> Tensor: ...

    def loss(self, output: Tensor, batch: Batch) -> Tensor: ...


@runtime_checkable
class Objective(Protocol):
    """A self-supervised objective trained in a ``pretrain`` stage.

    It receives the shared encoder at construction and trains it in place: after the stage the
    model's encoder is what transfers (for MoCo: the query encoder). Any extra state (key encoder,
    queue, decoder) lives in the objective's own parameters and buffers, so it is checkpointed.

    ``forward(batch, augment)`` returns a dict with a scalar ``loss`` plus any scalars to log.
    ``augment`` applies the stage's augmentation pipeline to a batch (identity when none is set);
    an objective may call it several times to make views.

    Optional: ``on_epoch_end(epoch, batch, out_dir)`` writes artefacts (e.g. image grids) using a
    fixed batch; ``out_dir`` is the stage's folder in the run directory.
    """

    def __call__(self, batch: Batch, augment: Callable[[Batch], Batch]) -> Mapping[str, Tensor]: ...


@runtime_checkable
class Evaluator(Protocol):
    """Streaming evaluation over a split.

    ``update(batch, outputs)`` sees every batch with ``outputs`` mapping head name to that head's
    output (detached, float32). ``compute()`` returns flat ``{metric_name: float}``; names are
    unique across evaluators of one stage, so prefix them if they could collide.
    ``reset()`` clears state. Optional: ``intervals() -> {metric: (low, high)}`` confidence
    intervals, and ``save(out_dir)`` to write artefacts (plots, tables, per-sample predictions).
    An evaluator that must look inside the model (saliency) sets ``needs_model = True`` and is
    called as ``update(batch, outputs, model=model)`` (and so are its ``training_update`` and
    ``calibration_update``, when it has them) with the model in eval mode, under
    ``torch.no_grad()`` (use ``torch.enable_grad()`` for gradients); ``model(images, [head])``
    returns ``{head: output}`` and ``model.encoder(images)`` the pyramid.
    """

    def update(self, batch: Batch, outputs: Mapping[str, Tensor]) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...


@runtime_checkable
class Augmentation(Protocol):
    """Batch-level augmentation, run by the engine after the batch is on its device.

    ``forward(batch)`` returns a new batch whose ``image`` and ``mask`` went through the same
    geometric transform with per-sample random parameters (drawn from torch's global RNG, so a
    seed repeats them). Other keys pass through unchanged. Called under ``torch.no_grad()``.
    """

    def __call__(self, batch: Batch) -> Batch: ...


@runtime_checkable
class DataSource(Protocol):
    """A dataset with its splits.

    ``class_names`` are the study-level classes in label-index order.
    ``split(name, label_fraction)`` returns a map-style ``Dataset`` of item dicts (the batch keys
    above, unbatched, CPU tensors) for ``"train"``, ``"val"`` or ``"test"``; with
    ``label_fraction < 1`` only that stratified, deterministic fraction of the labelled studies is
    returned. ``describe()`` returns counts per split and class for reports.
    ``skipped()`` lists samples dropped under ``on_bad_sample: skip`` (dicts with ``path``,
    ``reason``), written to the run directory. Optional: ``prepare()`` builds caches ahead of time;
    ``normalization`` (a dict) describes the intensity pipeline for export metadata.
    """

    class_names: Sequence[str]

    def split(self, name: str, label_fraction: float = 1.0) -> Dataset: ...

    def describe(self) -> dict[str, Any]: ...

    def skipped(self) -> list[dict[str, Any]]: ...


# Optional members: the core calls them only on components that have them.


@runtime_checkable
class EpochEndHook(Protocol):
    """An objective that writes artefacts after each epoch from a fixed batch (MoCo's views, inpainting's fills)."""

    def on_epoch_end(self, epoch: int, batch: Batch, out_dir: Path) -> None: ...


@runtime_checkable
class ExplainsUndefined(Protocol):
    """An evaluator whose ``compute()`` may give NaN for a metric that the data cannot measure (AUROC of a
    class without positives, Dice on images with an opacity when there are none): ``undefined()`` returns
    ``{metric: why}`` for each such NaN. A NaN without a reason breaks the contract."""

    def undefined(self) -> dict[str, str]: ...


@runtime_checkable
class HasIntervals(Protocol):
    """An evaluator that gives confidence intervals ``{metric: (low, high)}`` for its metrics."""

    def intervals(self) -> dict[str, tuple[float, float]]: ...


@runtime_checkable
class SavesArtefacts(Protocol):
    """An evaluator that writes plots, tables or per-sample predictions into its stage's folder."""

    def save(self, out_dir: Path) -> None: ...


@runtime_checkable
class NeedsModel(Protocol):
    """An evaluator that looks inside the model (saliency); it is called as ``update(batch, outputs, model=model)``
    when ``needs_model`` is true."""

    needs_model: bool


@runtime_checkable
class Calibrated(Protocol):
    """An evaluator fitted on the validation split before it evaluates (temperature scaling): the engine streams the
    validation split through ``calibration_update`` first."""

    def calibration_update(self, batch: Batch, outputs: Mapping[str, Tensor]) -> None: ...


@runtime_checkable
class LearnsFromTraining(Protocol):
    """An evaluator that learns from the training split before it evaluates (a kNN classifier's reference
    features, a prior fitted on the training boxes, an out-of-distribution detector): in an evaluate
    stage the engine streams the stage's training split (its ``label_fraction``) through
    ``training_update`` first, then the validation split through ``calibration_update`` if it has one,
    then the scored split through ``update``. With ``needs_model`` it is called with ``model=`` as well."""

    def training_update(self, batch: Batch, outputs: Mapping[str, Tensor]) -> None: ...


@runtime_checkable
class Preparable(Protocol):
    """A data source that can build its caches ahead of time (``corex data prepare``)."""

    def prepare(self) -> None: ...


@runtime_checkable
class Logger(Protocol):
    """An experiment tracker (TensorBoard, MLflow ...), fed by the engine on rank 0 only.

    ``start(params, resumed)`` is called once the run directory is decided, with the resolved recipe
    flattened to ``{"stages.train.epochs": 10, ...}`` (``resumed`` when a run continues);
    ``log_metrics(stage, step, metrics)`` with each epoch's metrics.jsonl row (numbers only), ``step``
    counting optimisation steps over all stages; ``log_results(stage, result)`` with each finished
    stage's results.json entry (metrics and intervals); ``log_artifact(path)`` with the files worth
    keeping once the run ends (report.html, results.json); ``close()`` at the end, also after a failure.
    ``state_dict()`` is saved in the run directory (``loggers.json``) after ``start`` and given back to
    ``load_state_dict`` before ``start`` when the run resumes, so a tracker continues the same run.
    """

    def start(self, params: Mapping[str, Any], resumed: bool) -> None: ...

    def log_metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_results(self, stage: str, result: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Optimizer(Protocol):
    """What the engine uses of a ``torch.optim.Optimizer`` (any subclass matches)."""

    param_groups: list[dict[str, Any]]

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@runtime_checkable
class Schedule(Protocol):
    """What the engine uses of a ``torch.optim.lr_scheduler.LRScheduler``: stepped after every
    optimisation step, saved in checkpoints."""

    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


# What a factory registered through each hook returns (see corex.kinds and corex.hookspecs).
EncoderFactory = Callable[..., Encoder]
HeadFactory = Callable[..., Head]
ObjectiveFactory = Callable[..., Objective]
EvaluatorFactory = Callable[..., Evaluator]
AugmentationFactory = Callable[..., Augmentation]
DataSourceFactory = Callable[..., DataSource]
LoggerFactory = Callable[..., Logger]
OptimizerFactory = Callable[..., Optimizer]
ScheduleFactory = Callable[..., Schedule]

__all__ = ["Augmentation", "AugmentationFactory", "Batch", "Calibrated", "DataSource", "DataSourceFactory", "Encoder",
           "EncoderFactory", "EpochEndHook", "ExplainsUndefined", "Evaluator", "EvaluatorFactory", "HasIntervals", "Head", "HeadFactory",
           "LearnsFromTraining", "Logger", "LoggerFactory", "NeedsModel", "Objective", "ObjectiveFactory", "Optimizer", "OptimizerFactory", "Preparable", "SavesArtefacts",
           "Schedule", "ScheduleFactory"]
