"""A third-party plugin full of plausible mistakes, written from the docs alone (docs/writing-a-plugin.md,
docs/hooks.md, corex/interfaces.py), as a plugin author would make them.

Every component is named ``oops_*``; the tests register this module as the plugin ``oops-plugin``
(:data:`PLUGIN`) and run one recipe per mistake through the real command line
(tests/boundaries/test_plugin_mistakes.py). Each component is otherwise sound, so that the one
mistake it makes is the only thing that can go wrong.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from corex import hookimpl
from corex.testing import ToyDataset, ToySource

PLUGIN = "oops-plugin"
__version__ = "0.0.1"


# -- encoders -------------------------------------------------------------------------------------


class TwoLevelEncoder(nn.Module):
    """A sound two-level pyramid at strides (2, 4) with channels (w, 2w)."""

    arch = "oops_two_level"

    def __init__(self, width: int = 8, first_stride: int = 2):
        super().__init__()
        self.in_channels = 1
        self.channels = (width, 2 * width)
        self.strides = (2, 4)
        self.stem = nn.Conv2d(1, width, 3, stride=first_stride, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        return [a, torch.relu(self.down(a))]


def oops_wrong_strides_encoder(*, width: int = 8) -> nn.Module:
    """Declares strides (2, 4) but its stem has stride 4: the maps are at strides (4, 8)."""
    return TwoLevelEncoder(width, first_stride=4)


def oops_width_encoder(*, width: int = 8) -> nn.Module:
    """Checks its option the documented way: a ValueError with a specific message."""
    if width < 1:
        raise ValueError("width must be at least 1")
    return TwoLevelEncoder(width)


# -- heads ----------------------------------------------------------------------------------------


class LogitsHead(nn.Module):
    """A sound classification head: pools the deepest map, (B, K) logits, cross-entropy ignoring -1."""

    task = "classification"

    def __init__(self, channels: tuple, num_classes: int, extra: int = 0):
        super().__init__()
        self.fc = nn.Linear(int(channels[-1]), num_classes + extra)

    def logits(self, features):
        return self.fc(features[-1].mean((2, 3)))

    def forward(self, features):
        return self.logits(features)

    def loss(self, output, batch):
        return F.cross_entropy(output, batch["label"], ignore_index=-1)


class ExtraClassHead(LogitsHead):
    """One class too many: (B, K + 1); its cross-entropy still runs, the labels being < K."""


class DoubleHead(LogitsHead):
    def forward(self, features):
        return self.logits(features).double()  # e.g. numpy float64 constants mixed in

    def loss(self, output, batch):
        return F.cross_entropy(output, batch["label"], ignore_index=-1).float()


class ListHead(LogitsHead):
    def forward(self, features):
        return [self.logits(features)]  # "a list of outputs, like the encoder"

    def loss(self, output, batch):
        return F.cross_entropy(output[0], batch["label"], ignore_index=-1)


class FloatLossHead(LogitsHead):
    def loss(self, output, batch):
        return F.cross_entropy(output, batch["label"], ignore_index=-1).item()  # a float: no graph


class NanLossHead(LogitsHead):
    def loss(self, output, batch):
        return F.cross_entropy(output, batch["label"], ignore_index=-1) * float("nan")


class HalfResolutionSegmentationHead(nn.Module):
    """Mask logits from the first map, but forgets to upsample by strides[0]: (B, 1, H/2, W/2)."""

    task = "segmentation"

    def __init__(self, channels: tuple):
        super().__init__()
        self.conv = nn.Conv2d(int(channels[0]), 1, 1)

    def forward(self, features):
        return self.conv(features[0])

    def loss(self, output, batch):
        keep = batch["has_mask"]
        return F.binary_cross_entropy_with_logits(output[keep], batch["mask"][keep])


def oops_extra_class_head(*, channels: tuple, num_classes: int) -> nn.Module:
    return ExtraClassHead(channels, num_classes, extra=1)


def oops_double_head(*, channels: tuple, num_classes: int) -> nn.Module:
    return DoubleHead(channels, num_classes)


def oops_list_head(*, channels: tuple, num_classes: int) -> nn.Module:
    return ListHead(channels, num_classes)


def oops_float_loss_head(*, channels: tuple, num_classes: int) -> nn.Module:
    return FloatLossHead(channels, num_classes)


def oops_nan_loss_head(*, channels: tuple, num_classes: int) -> nn.Module:
    return NanLossHead(channels, num_classes)


def oops_half_resolution_head(*, channels: tuple) -> nn.Module:
    return HalfResolutionSegmentationHead(channels)


def oops_near_miss_head(*, channels: tuple, num_class: int) -> nn.Module:
    """``num_class``: a near miss of the supplied ``num_classes``."""
    return LogitsHead(channels, num_class)


# -- objectives -------------------------------------------------------------------------------------


class EnergyObjective(nn.Module):
    """A sound objective: holds the encoder, ``{"loss": scalar}`` from its deepest map."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def energy(self, batch, augment):
        view = augment(batch)
        return self.encoder(view["image"])[-1].pow(2).mean((1, 2, 3))  # per sample

    def forward(self, batch, augment):
        return {"loss": self.energy(batch, augment).mean()}


class TensorObjective(EnergyObjective):
    def forward(self, batch, augment):
        return self.energy(batch, augment).mean()  # the loss itself, not {"loss": ...}


class VectorObjective(EnergyObjective):
    def forward(self, batch, augment):
        return {"loss": self.energy(batch, augment)}  # (B,): forgot the mean


class DetachedObjective(EnergyObjective):
    def forward(self, batch, augment):
        return {"loss": self.energy(batch, augment).mean().detach()}


class NanObjective(EnergyObjective):
    def forward(self, batch, augment):
        energy = self.energy(batch, augment)
        return {"loss": ((energy - energy) / (energy - energy)).mean()}  # 0 / 0


class CrashingObjective(EnergyObjective):
    def __init__(self, encoder: nn.Module, channels: tuple):
        super().__init__(encoder)
        self.projection = nn.Linear(int(channels[-1]) + 1, 16)  # off by one

    def forward(self, batch, augment):
        pooled = self.encoder(augment(batch)["image"])[-1].mean((2, 3))
        return {"loss": self.projection(pooled).pow(2).mean()}


def oops_tensor_objective(*, encoder: nn.Module) -> nn.Module:
    return TensorObjective(encoder)


def oops_vector_objective(*, encoder: nn.Module) -> nn.Module:
    return VectorObjective(encoder)


def oops_detached_objective(*, encoder: nn.Module) -> nn.Module:
    return DetachedObjective(encoder)


def oops_nan_objective(*, encoder: nn.Module) -> nn.Module:
    return NanObjective(encoder)


def oops_crashing_objective(*, encoder: nn.Module, channels: tuple) -> nn.Module:
    return CrashingObjective(encoder, channels)


# -- evaluators -----------------------------------------------------------------------------------------


class CountingEvaluator:
    """A sound evaluator: the share of correct study labels, as ``{"oops/acc": float}``."""

    def __init__(self, class_names: list, split: str = "val"):
        self.class_names, self.split = list(class_names), split
        self.reset()

    def reset(self) -> None:
        self.right = self.seen = 0

    def update(self, batch, outputs) -> None:
        known = batch["label"] >= 0
        predicted = outputs["classification"].argmax(1)
        self.right += int((predicted[known] == batch["label"][known]).sum())
        self.seen += int(known.sum())

    def accuracy(self) -> float:
        return self.right / max(self.seen, 1)

    def compute(self):
        return {"oops/acc": self.accuracy()}


class FloatEvaluator(CountingEvaluator):
    def compute(self):
        return self.accuracy()  # the number itself, not {name: number}


class StringEvaluator(CountingEvaluator):
    def compute(self):
        return f"accuracy {self.accuracy():.3f}"


class NonNumberEvaluator(CountingEvaluator):
    def compute(self):
        return {"oops/acc": f"{self.accuracy():.3f}"}  # formatted for display


class NanEvaluator(CountingEvaluator):
    def compute(self):
        return {"oops/score": float("nan")}  # and no word on why


class CollidingEvaluator(CountingEvaluator):
    def compute(self):
        return {"macro_f1": self.accuracy()}  # the classification evaluator's name too


class KeyErrorEvaluator(CountingEvaluator):
    def update(self, batch, outputs) -> None:
        self.seen += int(batch["labels"].shape[0])  # a multi-label data set's key, not this one's


class PairlessIntervalsEvaluator(CountingEvaluator):
    def intervals(self):
        return {"oops/acc": 0.05}  # a half-width, not (low, high)


class NanSelectEvaluator(CountingEvaluator):
    """NaN with a reason, at every validation: selecting on it can never choose an epoch."""

    def compute(self):
        return {"oops/auc": math.nan}

    def undefined(self):
        return {"oops/auc": "needs at least 100 studies"}


def _evaluator(cls):
    def factory(*, class_names: list, split: str) -> Any:
        return cls(class_names, split)

    factory.__name__ = factory.__qualname__ = f"build_{cls.__name__}"
    return factory


# -- augmentations ---------------------------------------------------------------------------------------


class DropLabel:
    def __call__(self, batch):
        return {"image": batch["image"].flip(-1), "mask": batch["mask"].flip(-1)}  # "only image and mask change"


class Float64:
    def __call__(self, batch):
        return {**batch, "image": batch["image"].double()}


class CropImageOnly:
    def __call__(self, batch):
        image = batch["image"]
        side = image.shape[-1] * 3 // 4
        return {**batch, "image": image[..., :side, :side]}  # the mask stays full size


class OtherDevice:
    def __call__(self, batch):
        return {**batch, "image": batch["image"].to("meta")}  # e.g. .cuda() on a CPU run


class Brighten:
    def __call__(self, batch):
        return {**batch, "image": batch["image"] * 255.0}  # "back to pixel values"


class ForgetsToReturn:
    def __call__(self, batch):
        batch["image"] = batch["image"].flip(-1)  # in place, and no return


def _augmentation(cls):
    def factory() -> Any:
        return cls()

    factory.__name__ = factory.__qualname__ = f"build_{cls.__name__}"
    return factory


# -- data sources ------------------------------------------------------------------------------------------


class _Edited(ToySource):
    """The toy data with every item passed through :meth:`edit`."""

    def edit(self, item: dict[str, Any]) -> dict[str, Any]:
        return item

    def split(self, name: str, label_fraction: float = 1.0) -> ToyDataset:
        return ToyDataset([self.edit(dict(item)) for item in super().split(name, label_fraction).items])


class OneBasedLabels(_Edited):
    def edit(self, item):
        return {**item, "label": item["label"] + 1}  # classes numbered 1..K as in the CSV


class NoHasMask(_Edited):
    def edit(self, item):
        item.pop("has_mask")
        return item


class Uint8Images(_Edited):
    def edit(self, item):
        return {**item, "image": (item["image"] * 255).round().to(torch.uint8)}  # as decoded by PIL


class ChannelLess(_Edited):
    def edit(self, item):
        return {**item, "image": item["image"][0]}  # (H, W)


class ListDescribe(ToySource):
    def describe(self):
        return [{"split": name, **info} for name, info in super().describe().items()]


def _source(cls):
    def factory(*, image_size: int, seed: int, studies: int = 20) -> Any:
        return cls(image_size=image_size, seed=seed, studies=studies)

    factory.__name__ = factory.__qualname__ = f"build_{cls.__name__}"
    return factory


# -- optimizers, schedules, loggers -------------------------------------------------------------------------


def oops_params_optimizer(*, params: list, lr: float) -> Any:
    """torch's own name for the parameters: ``params``, where corex supplies ``param_groups``."""
    return torch.optim.SGD(params, lr=lr)


def oops_plateau_schedule(*, optimizer: Any) -> Any:
    """ReduceLROnPlateau: its step() needs the metric, but corex steps a schedule after every step."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)


class RefusingLogger:
    """A tracker whose server refuses the metrics."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def start(self, params, resumed) -> None:
        pass

    def log_metrics(self, stage, step, metrics) -> None:
        raise ConnectionError("tracking server at localhost:5000 refused the connection")

    def log_results(self, stage, result) -> None:
        pass

    def log_artifact(self, path) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


def oops_refusing_logger(*, run_dir: Path) -> Any:
    return RefusingLogger(run_dir)


# -- the hooks -------------------------------------------------------------------------------------------------


@hookimpl
def corex_encoders():
    return {"oops_wrong_strides_encoder": oops_wrong_strides_encoder, "oops_width_encoder": oops_width_encoder}


@hookimpl
def corex_heads():
    return {
        "oops_extra_class_head": oops_extra_class_head,
        "oops_double_head": oops_double_head,
        "oops_list_head": oops_list_head,
        "oops_float_loss_head": oops_float_loss_head,
        "oops_nan_loss_head": oops_nan_loss_head,
        "oops_half_resolution_head": oops_half_resolution_head,
        "oops_near_miss_head": oops_near_miss_head,
    }


@hookimpl
def corex_objectives():
    return {
        "oops_tensor_objective": oops_tensor_objective,
        "oops_vector_objective": oops_vector_objective,
        "oops_detached_objective": oops_detached_objective,
        "oops_nan_objective": oops_nan_objective,
        "oops_crashing_objective": oops_crashing_objective,
    }


@hookimpl
def corex_evaluators():
    return {
        "oops_float_evaluator": _evaluator(FloatEvaluator),
        "oops_string_evaluator": _evaluator(StringEvaluator),
        "oops_non_number_evaluator": _evaluator(NonNumberEvaluator),
        "oops_nan_evaluator": _evaluator(NanEvaluator),
        "oops_colliding_evaluator": _evaluator(CollidingEvaluator),
        "oops_key_error_evaluator": _evaluator(KeyErrorEvaluator),
        "oops_pairless_intervals_evaluator": _evaluator(PairlessIntervalsEvaluator),
        "oops_nan_select_evaluator": _evaluator(NanSelectEvaluator),
    }


@hookimpl
def corex_augmentations():
    return {
        "oops_drop_label_augment": _augmentation(DropLabel),
        "oops_float64_augment": _augmentation(Float64),
        "oops_crop_image_only_augment": _augmentation(CropImageOnly),
        "oops_other_device_augment": _augmentation(OtherDevice),
        "oops_brighten_augment": _augmentation(Brighten),
        "oops_no_return_augment": _augmentation(ForgetsToReturn),
    }


@hookimpl
def corex_datasets():
    return {
        "oops_one_based_data": _source(OneBasedLabels),
        "oops_no_has_mask_data": _source(NoHasMask),
        "oops_uint8_data": _source(Uint8Images),
        "oops_channel_less_data": _source(ChannelLess),
        "oops_list_describe_data": _source(ListDescribe),
    }


@hookimpl
def corex_optimizers():
    return {"oops_params_optimizer": oops_params_optimizer}


@hookimpl
def corex_schedules():
    return {"oops_plateau_schedule": oops_plateau_schedule}


@hookimpl
def corex_metrics():
    """What the evaluators' numbers mean, declared as the docs ask (so that select: oops/auc is accepted)."""
    from corex.metrics import Metric

    return [Metric(name="oops/*", title="oops metrics", description="the share of correct study labels, and worse")]


@hookimpl
def corex_loggers():
    return {"oops_refusing_logger": oops_refusing_logger}
