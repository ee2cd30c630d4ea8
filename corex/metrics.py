"""What the numbers mean: metric declarations and findings, contributed by the plugins that compute them.

An evaluator's plugin declares its metrics through ``corex_metrics`` (a :class:`Metric` each: title,
direction, headline or not, how to recompute it from predictions) and writes sentences about a run
through ``corex_findings`` (a :class:`Finding` each). The run's summary table, the curves, the
report, ``corex compare`` and ``corex study`` read them here, so none of them holds another
plugin's metric names. Imports no torch.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from corex.errors import PluginError


@attrs.frozen
class Metric:
    """One metric, or a family of them (``name="f1/*"``: one per class).

    ``recompute(probabilities, labels, weights)`` scores study-level probabilities ``(N, K)`` with
    labels ``(N,)`` under each row of ``weights`` ``(R, N)`` (how often each study counts; a
    bootstrap resample is a weighting) and returns ``(R,)`` values: ``corex compare`` uses it for
    differences paired by test study. ``bounds`` is the metric's range where it has one.
    ``predictions`` names the file of the stage's folder that holds the study-level predictions
    ``recompute`` scores, in corex's predictions format: one row per study (``study_id``, else
    ``image_id``), its ``label`` (a class name), one column ``p_<slug(class)>`` per class in label
    order, and optionally ``patient_id`` (a patient's studies are resampled together).
    """

    name: str
    title: str
    higher_is_better: bool | None = True  # None: neither (a count, a fitted temperature)
    headline: bool = False
    description: str = ""
    bounds: tuple[float, float] | None = (0.0, 1.0)
    recompute: Callable[[Any, Any, Any], Any] | None = attrs.field(default=None, eq=False, repr=False)
    predictions: str | None = None


@attrs.frozen
class Finding:
    """A plain sentence computed from a run's numbers, kept with the number it is about.

    ``source`` is the file the number comes from (``results.json`` or a file of the stage's folder);
    ``also`` lists further numbers the sentence quotes, as ``{"metric", "value", "source"}``. A
    ``verdict`` (is the model fit to deploy?) is shown before the other findings, with its ``note``
    (the rule it applies) beside it.
    """

    text: str
    metric: str
    value: float
    source: str = "results.json"
    stage: str = ""
    also: tuple[Mapping[str, Any], ...] = ()
    verdict: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "metric": self.metric, "value": float(self.value), "source": self.source, "stage": self.stage,
                "also": [dict(item) for item in self.also], "verdict": self.verdict, "note": self.note}


class Catalog:
    """Every declared metric, looked up by name (an exact declaration first, then a ``prefix/*`` family)."""

    def __init__(self, metrics: Iterable[tuple[str, Metric]] = ()):
        self._metrics: dict[str, tuple[str, Metric]] = {}
        for plugin, metric in metrics:
            if metric.name in self._metrics:
                raise PluginError(f"metric '{metric.name}' is declared twice: by plugin '{self._metrics[metric.name][0]}' "
                                  f"and by plugin '{plugin}'")
            self._metrics[metric.name] = (plugin, metric)

    def __iter__(self):
        return (metric for _, metric in self._metrics.values())

    def get(self, name: str) -> Metric | None:
        """The declaration of ``name``; a ``val/`` or ``tta/`` prefix is looked through."""
        for candidate in (name, name.split("/", 1)[1] if name.startswith(("val/", "tta/")) else None):
            if candidate is None:
                continue
            if candidate in self._metrics:
                return self._metrics[candidate][1]
            family = next((m for pattern, (_, m) in self._metrics.items() if "*" in pattern and fnmatch.fnmatchcase(candidate, pattern)), None)
            if family is not None:
                return family
        return None

    def plugin(self, name: str) -> str | None:
        metric = self.get(name)
        return None if metric is None else self._metrics[metric.name][0]

    def headline(self) -> list[str]:
        """Headline metric names in declaration order."""
        return [metric.name for _, metric in self._metrics.values() if metric.headline and "*" not in metric.name]

    def higher_is_better(self, name: str) -> bool | None:
        metric = self.get(name)
        if metric is not None:
            return metric.higher_is_better
        return False if "loss" in name else None

    def title(self, name: str) -> str:
        metric = self.get(name)
        return metric.title if metric is not None and metric.name == name else name


def catalog(pm: Any = None) -> Catalog:
    """The metrics every loaded plugin declares (``corex_metrics``)."""
    from corex.plugins import call_named, get_plugin_manager

    pm = pm or get_plugin_manager()
    declared = []
    for plugin, metrics in call_named(pm, "corex_metrics"):
        for metric in metrics:
            if not isinstance(metric, Metric):
                raise PluginError(f"plugin '{plugin}': corex_metrics() must return corex.metrics.Metric objects, got {type(metric).__name__}")
            declared.append((plugin, metric))
    return Catalog(declared)


def findings(run_dir: Path, stage: str, result: Mapping[str, Any], pm: Any = None) -> list[Finding]:
    """Every plugin's findings about one evaluate stage, verdicts first."""
    from corex.plugins import call_named, get_plugin_manager

    pm = pm or get_plugin_manager()
    found: list[Finding] = []
    for plugin, items in call_named(pm, "corex_findings", run_dir=Path(run_dir), stage=stage, result=result):
        for item in items:
            if not isinstance(item, Finding):
                raise PluginError(f"plugin '{plugin}': corex_findings() must return corex.metrics.Finding objects, got {type(item).__name__}")
            found.append(item)
    return sorted(found, key=lambda f: not f.verdict)  # stable: plugin order within each group


def artefacts(pm: Any = None) -> dict[str, str]:
    """What each file an evaluator writes shows (``corex_artefacts``), in declaration order."""
    from corex.plugins import call_named, get_plugin_manager

    described: dict[str, str] = {}
    for _, mapping in call_named(pm or get_plugin_manager(), "corex_artefacts"):
        described.update(mapping)
    return described


def slug(name: str) -> str:
    """Lower-case ``name`` with runs of other characters turned into ``_`` (``"Negative for Pneumonia"``
    becomes ``"negative_for_pneumonia"``): how class names appear in metric and column names."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def stage_folder(run_dir: Path, stage: str) -> Path:
    """Where an evaluate stage's artefacts are: ``RUN/STAGE/``, or the folder itself for a
    re-evaluation (``corex evaluate``) that holds one stage's artefacts beside its results.json."""
    folder = Path(run_dir) / stage
    return folder if folder.is_dir() else Path(run_dir)


def headline_rows(metrics: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """``names`` that ``metrics`` holds as numbers, in order."""
    return [name for name in names if isinstance(metrics.get(name), (int, float)) and not isinstance(metrics.get(name), bool)]


__all__ = ["Catalog", "Finding", "Metric", "artefacts", "catalog", "findings", "headline_rows", "slug", "stage_folder"]
