"""Every hook corex calls, in one flat module.

Three families:

* Registration hooks (``corex_encoders`` ... ``corex_schedules``), one per kind of component,
  generated from the declarations in :mod:`corex.kinds`: each returns a mapping of component name
  to factory. The core owns the lookup: an unknown name gets a did-you-mean error, and two plugins
  claiming one name is an error naming both. A factory is an ordinary typed callable; the recipe's
  options are bound to its signature (and checked against its annotations) before any work starts.
  The interfaces the built objects satisfy are in :mod:`corex.interfaces`.
  Registering must stay light: ``corex --help``, ``corex plugins`` and ``corex validate --no-build``
  load every plugin and read the factories' signatures without building anything, so a factory is
  a typed function in a module that does not import torch, and imports its implementation when
  called (see ``plugins/corex_moco/__init__.py``).
* Report hooks (``corex_metrics``, ``corex_findings``, ``corex_artefacts``): what the numbers and
  files a plugin's evaluators write mean, so that reports, ``corex compare`` and ``corex study``
  hold no plugin's metric names.
* Observer hooks (``corex_run_start`` ... ``corex_run_end``) are called with keyword arguments;
  every implementation runs and return values are ignored. Use them for loggers and custom studies.

A plugin implements any subset, as plain functions marked ``@corex.hookimpl``, and accepts any
subset of a hook's arguments (pluggy passes only the ones it names).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pluggy

from corex.context import RunContext
from corex.kinds import KINDS, Kind, hook_doc
from corex.metrics import Finding, Metric

PROJECT = "corex"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# -- registration: one hook per kind of component (corex.kinds) --------------------------------------


def _registration_hook(kind: Kind) -> Callable[[], Mapping[str, Callable[..., Any]]]:
    def hook() -> Mapping[str, Callable[..., Any]]: ...

    hook.__name__ = hook.__qualname__ = kind.hook
    hook.__doc__ = hook_doc(kind)
    hook.__annotations__ = {"return": f"Mapping[str, Callable[..., {kind.protocol.__name__}]]"}
    return hookspec(hook)


for _kind in KINDS.values():
    globals()[_kind.hook] = _registration_hook(_kind)
del _kind


# -- reports ----------------------------------------------------------------------------------------


@hookspec
def corex_metrics() -> Sequence[Metric]:
    """Declare the metrics this plugin's evaluators compute: name (or a ``prefix/*`` family),
    a reader's title, whether higher is better, whether it is a headline figure, and optionally how
    to recompute it from study-level predictions (for ``corex compare``'s paired bootstrap).

    Called when a report, the run's summary table, ``corex compare`` or ``corex study`` needs them.
    Two plugins declaring one name is an error naming both. Must stay light (no torch).
    """


@hookspec
def corex_findings(run_dir: Path, stage: str, result: Mapping[str, Any]) -> Sequence[Finding]:
    """Plain sentences about one evaluate stage of a finished run, computed from its numbers.

    ``result`` is the stage's entry of ``results.json``; the stage's artefacts are in
    ``run_dir / stage``. Return findings only about the metrics and files your plugin's evaluators
    write (an empty list when the stage has none of them). Every implementation runs; the report
    shows verdicts first, then the rest in plugin order.
    """


@hookspec
def corex_artefacts() -> Mapping[str, str]:
    """Describe the files your evaluators write into an evaluate stage's folder: ``{file name: what
    it shows}`` (``{split}`` is replaced by the stage's split). The report captions figures with
    these; the run directory's README lists them."""


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


__all__ = ["PROJECT", "hookimpl", "hookspec"]
