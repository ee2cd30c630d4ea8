"""Every hook corex calls, in one flat module.

Two families:

* Registration hooks (``corex_encoders`` ... ``corex_datasets``) return a mapping of component
  name to factory. The core owns the lookup: an unknown name gets a did-you-mean error, and two
  plugins claiming one name is an error naming both. A factory is an ordinary typed callable; the
  recipe's options are bound to its signature (and checked against its annotations) before any
  work starts. The interfaces the built objects satisfy are in :mod:`corex.interfaces`, with one
  factory type per hook (``EncoderFactory`` returns an ``Encoder``, ...).
  Registering must stay light: ``corex --help``, ``corex plugins`` and ``corex validate --no-build``
  load every plugin and read the factories' signatures without building anything, so a factory is
  a typed function in a module that does not import torch, and imports its implementation when
  called (see ``plugins/corex_moco/__init__.py``).
* Observer hooks (``corex_run_start`` ... ``corex_run_end``) are called with keyword arguments;
  every implementation runs and return values are ignored. Use them for loggers and custom studies.

A plugin implements any subset, as plain functions marked ``@corex.hookimpl``, and accepts any
subset of a hook's arguments (pluggy passes only the ones it names).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

import pluggy

from corex.context import RunContext
from corex.interfaces import (AugmentationFactory, DataSourceFactory, EncoderFactory, EvaluatorFactory, HeadFactory,
                              ObjectiveFactory)

PROJECT = "corex"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

OptimizerFactory = Callable[..., Any]  # returns a torch.optim.Optimizer
ScheduleFactory = Callable[..., Any]  # returns a torch.optim.lr_scheduler.LRScheduler

# -- registration ---------------------------------------------------------------------------------


@hookspec
def corex_encoders() -> Mapping[str, EncoderFactory]:
    """Name encoder factories.

    Called once when the registry is first needed. Each factory returns an
    :class:`~corex.interfaces.Encoder`: an ``nn.Module`` mapping ``(B, C, H, W)`` images to a
    feature pyramid. Recipe key: ``model.encoder``.
    """


@hookspec
def corex_objectives() -> Mapping[str, ObjectiveFactory]:
    """Name self-supervised objective factories.

    Each factory returns an :class:`~corex.interfaces.Objective`. The core passes the shared
    encoder as ``encoder`` (plus ``channels``, ``strides``, ``batch_size``, ``dataset_size`` where the factory's
    signature asks for them). Recipe key: ``stages.<name>.objective`` of a ``pretrain`` stage.
    """


@hookspec
def corex_heads() -> Mapping[str, HeadFactory]:
    """Name task-head factories.

    Each factory returns a :class:`~corex.interfaces.Head`. The core passes the encoder's
    ``channels`` and ``strides`` and the dataset's ``num_classes`` where the signature asks.
    Recipe key: ``stages.<name>.heads.<head>`` of a ``train`` stage.
    """


@hookspec
def corex_evaluators() -> Mapping[str, EvaluatorFactory]:
    """Name evaluator factories.

    Each factory returns an :class:`~corex.interfaces.Evaluator` (streaming ``update`` /
    ``compute``). The core passes ``class_names`` where the signature asks.
    Recipe key: ``stages.<name>.evaluators``.
    """


@hookspec
def corex_augmentations() -> Mapping[str, AugmentationFactory]:
    """Name batch-augmentation factories.

    Each factory returns an :class:`~corex.interfaces.Augmentation` that transforms a batch on the
    device where it lives, image and mask together. Recipe key: ``stages.<name>.augment``.
    """


@hookspec
def corex_datasets() -> Mapping[str, DataSourceFactory]:
    """Name dataset factories.

    Each factory returns a :class:`~corex.interfaces.DataSource`. The core passes ``image_size``,
    ``seed`` and ``cache_dir`` where the signature asks. Recipe key: ``data``.
    """


@hookspec
def corex_optimizers() -> Mapping[str, OptimizerFactory]:
    """Name optimizer factories.

    Each factory returns a ``torch.optim.Optimizer``. The core passes ``param_groups`` (weights
    with the recipe's ``weight_decay``, biases and normalisation weights without) and, where the
    signature asks, the recipe's ``lr``, ``weight_decay``, ``momentum`` and ``betas``; other keys
    of the recipe's optimizer block are the factory's own options. Recipe key: ``optimizer``
    (or ``stages.<name>.optimizer``).
    """


@hookspec
def corex_schedules() -> Mapping[str, ScheduleFactory]:
    """Name learning-rate schedule factories.

    Each factory returns a ``torch.optim.lr_scheduler.LRScheduler`` that the engine steps after
    every optimisation step and saves in checkpoints. The core passes ``optimizer``,
    ``steps_per_epoch`` and ``epochs`` and, where the signature asks, the recipe's
    ``warmup_epochs`` and ``min_lr_ratio``. Recipe key: ``schedule`` (or ``stages.<name>.schedule``).
    """


# -- command line ---------------------------------------------------------------------------------


@hookspec
def corex_cli(commands: argparse._SubParsersAction, data_commands: argparse._SubParsersAction) -> None:
    """Add sub-commands to ``corex`` (``commands``) or to ``corex data`` (``data_commands``).

    Called while the parser is built. Give each parser ``set_defaults(handler=fn)``; ``fn(args)``
    returns the exit code.
    """


# -- lifecycle observers --------------------------------------------------------------------------


@hookspec
def corex_run_start(run: RunContext) -> None:
    """Called once the run directory exists and the recipe is resolved, before the first stage."""


@hookspec
def corex_epoch_end(run: RunContext, stage: str, epoch: int, metrics: Mapping[str, float]) -> None:
    """Called after each epoch of a ``train`` or ``pretrain`` stage with that epoch's metrics
    (training losses, throughput and any validation metrics), as written to ``metrics.jsonl``."""


@hookspec
def corex_stage_end(run: RunContext, stage: str, results: Mapping[str, Any]) -> None:
    """Called when a stage finishes, with the stage's entry of ``results.json``."""


@hookspec
def corex_run_end(run: RunContext, results: Mapping[str, Any]) -> None:
    """Called after the last stage, with the complete ``results.json`` content."""
