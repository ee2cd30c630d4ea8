"""corex_example: a third-party corex plugin, as small as a real one can be.

Installed, it registers (through the ``corex`` entry point named ``example`` in pyproject.toml):

* encoder ``example_mobilenet``: a MobileNet-style pyramid of depthwise-separable convolutions,
  four levels at strides 2, 4, 8, 16 (:mod:`corex_example.encoder`);
* evaluator ``example_sens_at_spec``: per-class sensitivity at a fixed specificity, one class
  against the rest (:mod:`corex_example.evaluator`), with what its metric means and a finding about
  it (:mod:`corex_example.report`): it appears in the run's summary, its report, ``corex compare``
  and ``corex study`` like a built-in metric.

The CSV logger (:mod:`corex_example.csv_logger`) is a separate plugin that is *not* an entry
point, because an installed observer runs in every run of the environment; switch it on per run
with ``COREX_PLUGINS=corex_example.csv_logger``.

This module imports no torch: corex loads every installed plugin for ``corex --help`` and
``corex plugins`` and reads the factories' signatures, so the factories below import their torch
code only when they are called (importing torch here would cost every corex command seconds).
Each factory repeats its class's options and defaults, with annotations corex can read without
torch: the protocols of :mod:`corex.interfaces` for the return types.
The names carry the prefix ``example_`` so they cannot clash with corex's own.
"""

from __future__ import annotations

from collections.abc import Sequence

from corex import hookimpl
from corex.interfaces import Encoder, Evaluator  # protocols only: corex.interfaces imports no torch

__version__ = "0.1.0"


def example_mobilenet(*, in_channels: int = 1, width: int = 16, blocks: int = 1) -> Encoder:
    """MobileNet-style encoder: channels ``width * (1, 2, 4, 8)`` at strides ``(2, 4, 8, 16)``.

    ``blocks``: depthwise-separable blocks per level (the first of each level downsamples).
    """
    from corex_example.encoder import MobileNetPyramid

    return MobileNetPyramid(in_channels=in_channels, width=width, blocks=blocks)


def example_sens_at_spec(
    *,
    head: str = "classification",
    specificity: float = 0.9,
    class_names: Sequence[str] | None = None,
) -> Evaluator:
    """Per-class sensitivity at ``specificity`` from the ``head``'s logits (``class_names`` comes from corex)."""
    from corex_example.evaluator import SensitivityAtSpecificity

    return SensitivityAtSpecificity(head=head, specificity=specificity, class_names=class_names)


@hookimpl
def corex_encoders():
    return {"example_mobilenet": example_mobilenet}


@hookimpl
def corex_evaluators():
    return {"example_sens_at_spec": example_sens_at_spec}


@hookimpl
def corex_metrics():
    from corex_example.report import METRICS

    return METRICS


@hookimpl
def corex_artefacts():
    from corex_example.report import ARTEFACTS

    return ARTEFACTS


@hookimpl
def corex_findings(run_dir, stage, result):
    from corex_example.report import findings

    return findings(run_dir, stage, result)


__all__ = ["corex_artefacts", "corex_encoders", "corex_evaluators", "corex_findings", "corex_metrics", "example_mobilenet",
           "example_sens_at_spec"]
