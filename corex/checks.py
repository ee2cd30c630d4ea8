"""The contract at run time: what components RETURN, checked on the first step of a stage and the
first batch of every evaluation, so that a plugin's mistake ends in one message naming the culprit.

:mod:`corex.contract` checks what a component IS when it is built; this module checks what it
gives back while running: a data source's batches, an augmentation's output, an objective's loss,
the heads' outputs and losses, an evaluator's metrics. Each check costs one look at one batch.
A failure is a :class:`~corex.errors.PluginError` that names the component, its plugin (with its
distribution and version), the recipe key, what was expected and what came back.

:func:`blame` does the same for an exception raised inside a third-party plugin's code: the
message names the plugin and the line; an exception inside corex's own code keeps its traceback
(that is a bug in corex).
"""

from __future__ import annotations

import contextlib
import math
import traceback
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from corex.errors import CorexError, PluginError, RunFailure
from corex.loaders import INTENSITY_SLACK

CONTRACT = "docs/contract.md"
ID_KEYS = ("study_id", "image_id", "patient_id")


def shown(value: Any) -> str:
    """A value as a message describes it: type, dtype, shape, device; a short repr otherwise."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device.type}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))[:12]}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items" + (f" ({type(value[0]).__name__})" if value else "")
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


class Culprit:
    """A component as messages name it: its label (kind, name, plugin, distribution), its recipe key, the
    section of docs/contract.md for its kind, and whether its plugin is a third party's (not corex's own)."""

    def __init__(self, label: str, path: str, section: str, third_party: bool = True):
        self.label, self.path, self.section, self.third_party = label, path, section, third_party

    def fail(self, expected: str, got: str) -> PluginError:
        return PluginError(f"{self.path}: {self.label} broke the contract: expected {expected}; got {got} "
                           f"(see {CONTRACT}#{self.section})")


# -- data sources --------------------------------------------------------------------------------


def check_batch(batch: Any, culprit: Culprit, num_classes: int, multilabel: bool = False) -> None:
    """Every documented batch key with its type, shape and range (a DataSource's items, collated)."""
    if not isinstance(batch, Mapping):
        raise culprit.fail("items that are dicts of the documented keys (image, label, mask, has_mask, ids)", shown(batch))
    missing = [k for k in ("image", "label", "mask", "has_mask", *ID_KEYS) if k not in batch]
    if missing:
        raise culprit.fail(f"every item to hold {', '.join(missing)}", f"items with keys {sorted(map(str, batch))}")
    image = batch["image"]
    if not isinstance(image, Tensor) or image.dim() != 4 or not image.is_floating_point():
        raise culprit.fail("'image' as a float tensor (B, C, H, W) (an item: (C, H, W))", shown(image))
    size = image.shape[0]
    _tensor(batch, "label", culprit, (size,), torch.int64, "int64 class indices, -1 where unknown")
    _tensor(batch, "mask", culprit, (size, 1, *image.shape[2:]), None, "a float mask (B, 1, H, W) at the image's size")
    if not batch["mask"].is_floating_point():
        raise culprit.fail("'mask' as a float tensor in {0, 1}", shown(batch["mask"]))
    _tensor(batch, "has_mask", culprit, (size,), torch.bool, "one bool per image")
    for key in ID_KEYS:
        ids = batch[key]
        if not isinstance(ids, (list, tuple)) or len(ids) != size or not all(isinstance(i, str) for i in ids):
            raise culprit.fail(f"'{key}' as a list of {size} strings", shown(ids))
    labels = batch["label"]
    if ((labels < -1) | (labels >= num_classes)).any():
        bad = sorted({int(v) for v in labels[(labels < -1) | (labels >= num_classes)]})
        raise culprit.fail(f"labels in [-1, {num_classes}) (class indices from 0, -1 where unknown) for {num_classes} classes",
                           f"label values {bad}" + (" (1-based labels?)" if bad == [num_classes] else ""))
    if multilabel or "labels" in batch:
        _tensor(batch, "labels", culprit, (size, num_classes), None, f"a float multi-hot target (B, {num_classes})")
        values = batch["labels"]
        if not values.is_floating_point() or not torch.isin(values, torch.tensor([-1.0, 0.0, 1.0], device=values.device)).all():
            raise culprit.fail("'labels' of 1.0 (positive), 0.0 (negative) or -1.0 (unknown)", shown(values))


def _tensor(batch: Mapping[str, Any], key: str, culprit: Culprit, shape: tuple[int, ...], dtype: torch.dtype | None, what: str) -> None:
    value = batch[key]
    if not isinstance(value, Tensor) or tuple(value.shape) != tuple(shape) or (dtype is not None and value.dtype != dtype):
        expected = f"'{key}' as {what}: {dtype or 'a tensor'} of shape {tuple(shape)}"
        raise culprit.fail(expected, shown(value))


# -- augmentations ---------------------------------------------------------------------------------


def check_augmented(before: Mapping[str, Any], after: Any, culprit: Culprit) -> None:
    """An augmentation keeps every key, the image's dtype and device, image and mask together, and [0, 1]."""
    if not isinstance(after, Mapping):
        raise culprit.fail("the batch back, as a dict", shown(after))
    dropped = [k for k in before if k not in after]
    if dropped:
        raise culprit.fail("every key of the batch back (other keys pass through unchanged)", f"a batch without {', '.join(dropped)}")
    image, original = after["image"], before["image"]
    if not isinstance(image, Tensor) or image.dtype != original.dtype or image.device != original.device or image.dim() != 4:
        raise culprit.fail(f"'image' as {shown(original)} (the same dtype and device)", shown(image))
    if image.shape[0] != original.shape[0]:
        raise culprit.fail(f"the batch's {original.shape[0]} images", shown(image))
    mask = after.get("mask")
    if isinstance(mask, Tensor) and mask.shape[-2:] != image.shape[-2:]:
        raise culprit.fail("'image' and 'mask' transformed together (the same height and width)",
                           f"image {tuple(image.shape)} and mask {tuple(mask.shape)}")
    low, high = image.min().item(), image.max().item()
    if not (math.isfinite(low) and math.isfinite(high)) or low < -INTENSITY_SLACK or high > 1 + INTENSITY_SLACK:
        raise culprit.fail("intensities in [0, 1] after augmentation (0 = air, 1 = dense)", f"intensities in [{low:.3g}, {high:.3g}]")


# -- losses and outputs ------------------------------------------------------------------------------


def check_loss(loss: Any, culprit: Culprit, what: str, training: bool = True) -> None:
    """A finite scalar tensor, attached to the autograd graph when training."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise culprit.fail(f"{what} as a scalar tensor", shown(loss))
    if training and not loss.requires_grad:
        raise culprit.fail(f"{what} attached to the autograd graph (computed from the model's outputs, not detached)",
                           "a tensor that requires no gradient")
    if not torch.isfinite(loss.detach()).all():
        raise RunFailure(f"{culprit.path}: {culprit.label} gave {what} {float(loss.detach())} on the first step; "
                         "check its options and the data (see " + CONTRACT + f"#{culprit.section})")


def check_objective_output(out: Any, culprit: Culprit) -> None:
    if not isinstance(out, Mapping) or "loss" not in out:
        raise culprit.fail("a mapping with a scalar 'loss' (plus any scalars to log)", shown(out))
    check_loss(out["loss"], culprit, "'loss'")
    for key, value in out.items():
        if key != "loss" and not (isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1)):
            raise culprit.fail(f"'{key}' as a scalar to log", shown(value))


def check_head_output(output: Any, task: str, image: Tensor, num_classes: int, culprit: Culprit,
                      amp: torch.dtype | None = None) -> None:
    """Classification logits (B, K); segmentation logits (B, 1, H, W) at the input's size; any task: a
    float32 tensor (B, ...) (or the mixed-precision dtype ``amp`` when the stage runs under it)."""
    size = image.shape[0]
    allowed = {torch.float32} | ({amp} if amp is not None else set())
    if not isinstance(output, Tensor) or output.dtype not in allowed or output.shape[:1] != (size,):
        names = " or ".join(str(d) for d in sorted(allowed, key=str))
        raise culprit.fail(f"a {names} tensor with the batch's {size} samples first", shown(output))
    if task == "classification" and tuple(output.shape) != (size, num_classes):
        raise culprit.fail(f"logits of shape ({size}, {num_classes}) for the data's {num_classes} classes", shown(output))
    if task == "segmentation" and tuple(output.shape) != (size, 1, *image.shape[2:]):
        raise culprit.fail(f"mask logits of shape ({size}, 1, {image.shape[2]}, {image.shape[3]}) at the input's size", shown(output))


# -- evaluators ------------------------------------------------------------------------------------------


def check_intervals(intervals: Any, metrics: Mapping[str, Any], culprit: Culprit) -> dict[str, tuple[float, float]]:
    """``intervals()``: metric name -> (low, high), two numbers with low <= high, for metrics compute() returned."""
    if not isinstance(intervals, Mapping):
        raise culprit.fail("intervals() to return a mapping of metric name to (low, high)", shown(intervals))
    clean = {}
    for key, pair in intervals.items():
        if key not in metrics:
            raise culprit.fail(f"intervals only for metrics compute() returned ({', '.join(sorted(metrics)[:8])} ...)", f"an interval for '{key}'")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair):
            raise culprit.fail(f"the interval of '{key}' as two numbers (low, high)", shown(pair))
        low, high = float(pair[0]), float(pair[1])
        if not (math.isnan(low) or math.isnan(high)) and low > high:
            raise culprit.fail(f"the interval of '{key}' with low <= high", f"({low:g}, {high:g})")
        clean[key] = (low, high)
    return clean


def check_metrics(metrics: Any, culprit: Culprit, undefined: Mapping[str, str] | None = None) -> dict[str, float]:
    """``compute()``'s result: metric name -> a finite number, NaN only with a reason (``undefined``)."""
    if not isinstance(metrics, Mapping):
        raise culprit.fail("compute() to return a mapping of metric name to number", shown(metrics))
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise culprit.fail("metric names as strings", f"the name {key!r}")
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise culprit.fail(f"metric '{key}' as a number", shown(value))
        if isinstance(value, float) and math.isinf(value):
            raise culprit.fail(f"metric '{key}' as a finite number", repr(value))
        if isinstance(value, float) and math.isnan(value) and undefined is not None and key not in undefined:
            raise culprit.fail(f"metric '{key}' as a finite number, or NaN with a reason (undefined() -> {{'{key}': 'why'}})", "NaN without a reason")
        clean[key] = value if isinstance(value, int) else float(value)
    return clean


# -- exceptions raised inside a plugin ---------------------------------------------------------------------


def _library_dirs() -> tuple[str, ...]:
    """Where frames belong to torch, the standard library or corex's core, not to a plugin."""
    import corex

    dirs = [str(Path(torch.__file__).parent), str(Path(contextlib.__file__).parent), str(Path(corex.__file__).parent)]
    return tuple(dirs)


# Every component corex built, with how to name it (weak: a component's entry goes with it).
_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BUILT_BY_ID: dict[int, Culprit] = {}


def remember(component: Any, culprit: Culprit) -> None:
    """Keep how to name ``component`` in later messages (called for every component corex builds)."""
    try:
        _BUILT[component] = culprit
    except TypeError:  # not weak-referenceable (or unhashable): keep it by identity
        _BUILT_BY_ID[id(component)] = culprit


def culprit_of(component: Any, path: str = "the recipe", kind: str = "component") -> Culprit:
    """How to name a component corex built; a generic culprit for one it did not."""
    try:
        found = _BUILT.get(component)
    except TypeError:
        found = None
    found = found or _BUILT_BY_ID.get(id(component))
    section = {"dataset": "datasource", "component": "the-contract-at-run-time"}.get(kind, kind)
    return found or Culprit(f"{kind} {type(component).__name__}", path, section, third_party=False)


def _innermost_component(exc: BaseException) -> Culprit | None:
    """The innermost component corex built whose method is on the traceback (``self`` of a frame)."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None:
            try:
                named = _BUILT.get(owner) or _BUILT_BY_ID.get(id(owner))
            except TypeError:
                named = _BUILT_BY_ID.get(id(owner))
            found = named or found
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def blame(culprit: Culprit, doing: str) -> Iterator[None]:
    """Name a third-party plugin when its code raises while ``doing`` (the innermost component on the
    traceback, e.g. a head inside the model); corex's own components keep their traceback."""
    try:
        yield
    except (CorexError, KeyboardInterrupt):
        raise
    except torch.OutOfMemoryError as exc:
        raise RunFailure(f"{culprit.path}: out of memory while {doing} ({str(exc).splitlines()[0][:160]}); "
                         "lower the batch size or the image size") from exc
    except Exception as exc:
        culprit = _innermost_component(exc) or culprit
        if not culprit.third_party:
            raise
        libraries = _library_dirs()
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(libraries)]
        where = f" at {frames[-1].filename}, line {frames[-1].lineno}, in {frames[-1].name}()" if frames else ""
        raise PluginError(f"{culprit.path}: {culprit.label} raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} "
                          f"while {doing}{where}").with_traceback(None) from None


__all__ = ["Culprit", "blame", "culprit_of", "remember", "check_augmented", "check_intervals", "check_batch", "check_head_output", "check_loss", "check_metrics",
           "check_objective_output", "shown"]
