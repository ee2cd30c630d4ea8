"""Evaluation: a model's outputs streamed through a stage's evaluators, on one process or several.

:func:`evaluate_split` is what an evaluate stage does, for ``corex run`` and ``corex evaluate``
alike (calibration on the validation split first, then the scored split); :func:`evaluate_loader`
is the loop under it, also used for validation during training; :func:`evaluate_model` is the
Python API's entry point with evaluators named as in a recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from corex import distributed
from corex.build import build_component
from corex.checks import blame, check_batch, check_head_output, check_intervals, check_metrics, culprit_of
from corex.errors import CorexError, PluginError, RecipeError
from corex.interfaces import Calibrated, ExplainsUndefined, HasIntervals, LearnsFromTraining, NeedsModel, SavesArtefacts
from corex.loaders import RankShard, autocast_dtype, check_intensities, resolve_device, stage_loader, to_device
from corex.model import CorexModel
from corex.plugins import Registry
from corex.progress import Progress, format_value
from corex.schema import Component, Recipe, Stage


def format_metric(name: str, value: Any) -> str:
    """Counts as integers, everything else with four decimals."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and (name == "n" or name.startswith("n_") or name.endswith("/n"))):
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else format_value(value)


def _outputs(model: CorexModel, loader: DataLoader, heads: list[str], device: torch.device, *, amp: torch.dtype | None,
             channels_last: bool, where: str, desc: str | None, check: Callable[[dict], None] | None = None,
             num_classes: int | None = None) -> Iterator[tuple[dict[str, Any], dict[str, Tensor]]]:
    """``(batch on the device, head outputs)`` for every batch of ``loader``, in eval mode. The first
    batch is held to the data contract (``check``) and, with ``num_classes``, the heads' outputs to theirs."""
    model.eval()
    bar = Progress(len(loader), desc or "", unit="batch", mode=None if desc else "off")
    with bar:
        for index, batch in enumerate(loader):
            if index == 0:
                if check is not None:
                    check(batch)
                check_intensities(batch, where)
            batch = to_device(batch, device, channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                with blame(culprit_of(model, "the model"), "running the model"):
                    outputs = model(batch["image"], heads)
            if index == 0 and num_classes is not None:
                for h in heads:
                    module = model.heads[h] if h in getattr(model, "heads", {}) else None
                    check_head_output(outputs[h], getattr(module, "task", ""), batch["image"], num_classes,
                                      culprit_of(module, f"head {h}", "head"), amp)
            yield batch, outputs
            bar.update(1)


def _to_cpu(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in values.items()}


def _feed(evaluators: list[tuple[str, Any]], method: str, batch: dict[str, Any], outputs: Mapping[str, Tensor], model: CorexModel, heads: list[str]) -> None:
    for path, evaluator in evaluators:
        try:
            with blame(culprit_of(evaluator, path, "evaluator"), f"{method}()"):
                if isinstance(evaluator, NeedsModel) and evaluator.needs_model:  # saliency, features: they look inside the model
                    getattr(evaluator, method)(batch, outputs, model=model)
                else:
                    getattr(evaluator, method)(batch, outputs)
        except KeyError as exc:  # a built-in evaluator reading a head the model does not have
            if exc.args and exc.args[0] == getattr(evaluator, "head", None) and exc.args[0] not in outputs:
                raise CorexError(f"{path}: reads the output of head {exc}, but the model's heads are {', '.join(heads) or 'none'}") from exc
            raise


def evaluate_split(model: CorexModel, source: Any, recipe: Recipe, stage: Stage, evaluators: list[tuple[str, Any]], device: torch.device, *,
                   split: str | None = None, heads: list[str] | None = None, weights: Mapping[str, float] | None = None,
                   artefacts: Path | None = None, desc: str | None = None, channels_last: bool | None = None):
    """What an evaluate stage does (``corex run`` and ``corex evaluate`` alike): when an evaluator
    calibrates (temperature scaling), first stream the validation split through it, never the split
    it is scored on; then evaluate ``split`` (default: the stage's) with the stage's batch size and
    precision. Under torch.distributed every rank predicts its share and rank 0 scores.
    Returns ``(metrics, intervals)``."""
    split = split or stage.split
    heads = list(model.heads) if heads is None else heads
    amp = autocast_dtype(stage, device)
    channels_last = recipe.model.channels_last if channels_last is None else channels_last
    where = f"stages.{stage.name}"
    learners = [(path, e) for path, e in evaluators if isinstance(e, LearnsFromTraining)]
    if learners and distributed.is_main():  # the scores are gathered on rank 0: so is what they learn from
        loader = stage_loader(recipe, stage, source, "train", device, shuffle=False, label_fraction=recipe.stage_data(stage).label_fraction)
        feed(model, loader, heads, learners, "training_update", device, amp=amp, channels_last=channels_last, where=where)
    calibrated = [(path, e) for path, e in evaluators if isinstance(e, Calibrated)]
    if calibrated and split != "val" and distributed.is_main():
        loader = stage_loader(recipe, stage, source, "val", device, shuffle=False, label_fraction=recipe.val_fraction(stage))
        feed(model, loader, heads, calibrated, "calibration_update", device, amp=amp, channels_last=channels_last, where=where)
    loader = stage_loader(recipe, stage, source, split, device, shuffle=False, rank=distributed.rank(), world=distributed.world_size())
    return evaluate_loader(model, loader, heads, evaluators, device, weights=weights, amp=amp, channels_last=channels_last,
                           artefacts=artefacts, where=where, desc=desc, check=data_check(source, recipe, stage),
                           num_classes=len(source.class_names))


def data_check(source: Any, recipe: Recipe, stage: Stage) -> Callable[[dict], None]:
    """Holds a batch of ``source`` to the data contract, naming the data's recipe key."""
    path = f"stages.{stage.name}.data" if stage.data is not None else "data"
    culprit = culprit_of(source, path, "dataset")
    return lambda batch: check_batch(batch, culprit, len(source.class_names), getattr(source, "multilabel", False))


@torch.no_grad()
def feed(model: CorexModel, loader: DataLoader, heads: list[str], evaluators: list[tuple[str, Any]], method: str, device: torch.device, *,
         amp: torch.dtype | None = None, channels_last: bool = True, where: str = "evaluate") -> None:
    """Stream ``loader`` through every evaluator's ``method`` (``training_update`` with the training
    split, ``calibration_update`` with the validation split) before the scored split."""
    for batch, outputs in _outputs(model, loader, heads, device, amp=amp, channels_last=channels_last, where=where, desc=None):
        _feed(evaluators, method, batch, {k: v.detach().float() for k, v in outputs.items()}, model, heads)


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
    check: Callable[[dict], None] | None = None,
    num_classes: int | None = None,
    producers: dict[str, str] | None = None,
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Head losses plus every evaluator's metrics and intervals over ``loader``.

    ``evaluators`` are ``(recipe path, evaluator)`` pairs; the path names the evaluator in errors.
    The loss is weighted like the training loss, so the curves are comparable. ``desc`` names the
    progress shown while it runs (none without it). ``check`` holds the first batch to the data
    contract and ``num_classes`` the heads' first outputs to theirs (corex.checks). ``producers``, when
    given, is filled with which evaluator (recipe key and label) produced each metric.
    """
    for _, evaluator in evaluators:
        evaluator.reset()
    loss_sums = {h: 0.0 for h in heads}
    total = 0
    # Under torch.distributed each rank predicts its share (RankShard) and rank 0 scores them all.
    sharded = isinstance(getattr(loader, "sampler", None), RankShard)
    records = []
    for batch, outputs in _outputs(model, loader, heads, device, amp=amp, channels_last=channels_last, where=where, desc=desc,
                                   check=check, num_classes=num_classes):
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
    made_by: dict[str, Any] = {}  # metric -> the evaluator's culprit that produced it
    for path, evaluator in evaluators:
        culprit = culprit_of(evaluator, path, "evaluator")
        with blame(culprit, "compute()"):
            computed = evaluator.compute()
            reasons = evaluator.undefined() if isinstance(evaluator, ExplainsUndefined) else None
        # NaN needs a reason (ExplainsUndefined); corex's own evaluators without undefined() are trusted.
        strict = culprit.third_party or reasons is not None
        for key, value in check_metrics(computed, culprit, (reasons or {}) if strict else None).items():
            if key in metrics:
                other = f"{made_by[key].path}: {made_by[key].label}" if key in made_by else "the stage's loss"
                raise PluginError(f"{path}: {culprit.label} returns metric '{key}', which {other} returns too: metric names must be "
                                  "unique among a stage's evaluators; prefix yours (see docs/contract.md#evaluator)")
            metrics[key] = value
            made_by[key] = culprit
        if isinstance(evaluator, HasIntervals):
            with blame(culprit, "intervals()"):
                given = evaluator.intervals()
            intervals.update(check_intervals(given, computed, culprit))
        if artefacts is not None and isinstance(evaluator, SavesArtefacts):
            artefacts.mkdir(parents=True, exist_ok=True)
            with blame(culprit, f"save() into {artefacts}"):
                evaluator.save(artefacts)
    if producers is not None:
        producers.update({key: f"{c.path}: {c.label}" for key, c in made_by.items()})
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
    from corex.binding import Problems
    from corex.recipe import bind_component

    registry = registry or Registry()
    specs = evaluators if evaluators is not None else list(heads)
    components, problems = [], Problems()
    for i, spec in enumerate(specs):  # bound and type-checked exactly as a recipe's are
        component = Component(spec) if isinstance(spec, str) else Component(spec["name"], {k: v for k, v in spec.items() if k != "name"})
        if bind_component(registry, "evaluators", component, f"evaluators[{i}]", problems):
            components.append((i, component))
    if problems:
        raise RecipeError(problems)
    built = [(f"evaluators[{i}]", build_component(registry, "evaluators", component, f"evaluators[{i}]", class_names=list(class_names), split="test"))
             for i, component in components]
    target = resolve_device(device)
    model.to(target)
    return evaluate_loader(model, loader, heads, built, target, artefacts=Path(out) if out else None)


__all__ = ["data_check", "evaluate_loader", "evaluate_model", "evaluate_split", "feed", "format_metric"]
