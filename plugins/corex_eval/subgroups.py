"""Subgroup evaluator: is the model worse on some kind of study (age, sex, view, device, portable films)?

A model that is good on average can fail a group of patients or a kind of acquisition, and a test set
dominated by one kind hides it. Every image of a corex_cxr source carries its DICOM header values in
``batch["meta"]`` (``corex_cxr.metadata``); this evaluator scores the headline classification metrics
on each subgroup those values define and compares each subgroup with the rest of the test set.

Why an evaluator of its own rather than an option of ``classification``: it has its own options
(which fields, the smallest subgroup, the multiplicity correction), its own metric namespace and
artefacts, and a cost (a bootstrap per subgroup) that a train stage's per-epoch validation should
not pay; the study-level scoring itself is the classification evaluator's, reused, so both agree
on every study's probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from corex.rundir import write_json
from corex_eval.artefacts import number, save_figure, write_csv
from corex_eval.bootstrap import percentile_intervals, resample_blocks
from corex_eval.classification import ClassificationEvaluator, weighted_metrics
from corex_eval.rules import subgroup_key

FIELDS = ("age_band", "sex", "view", "manufacturer", "modality", "portable")
METRICS = {"macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "auroc": "macro AUROC"}
MIXED = "mixed"  # a study whose images disagree on a field
UNKNOWN = ""  # never examined as a subgroup: "unknown" is not a kind of patient
SETTINGS_FILE = "subgroups.json"


class SubgroupEvaluator:
    """Headline classification metrics per subgroup of the header metadata, against the rest of the split.

    Subgroups. For each field of ``fields`` (``batch["meta"]``; a ``+`` joins fields, e.g.
    ``view+portable`` gives ``AP+yes``), a scored study (or image, ``level="image"``) takes the
    value its images share, or ``mixed`` when they differ; a study whose value is unknown (``""``)
    is in no subgroup of that field but stays in the rest of every other. A subgroup is examined
    when it has at least ``min_studies`` studies and so has the rest of the split.

    Metrics, each on the subgroup and on the rest, computed as the classification evaluator
    computes them (torchmetrics' conventions): ``macro_f1``, ``balanced_accuracy``, ``accuracy``,
    ``auroc``. In ``results.json``: ``subgroup/<field>=<value>/<metric>`` and its
    ``.../difference`` (subgroup minus rest), with 95% intervals, and ``subgroups/examined``,
    ``subgroups/tests``, ``subgroups/worse`` (subgroups worse beyond chance on some metric).

    Uncertainty. ``bootstrap`` resamples draw patients with all their studies (the classification
    evaluator's cluster bootstrap); subgroup and rest are scored on the *same* resamples, so the
    difference's interval is paired. Each difference is tested against 0 with the normal
    approximation ``z = d / sd_boot(d)`` (the bootstrap's percentile tails cannot resolve the small
    p-values a multiplicity correction needs), and the p-values of every examined (subgroup,
    metric) pair are corrected together, by Holm's step-down method (``correction="holm"``,
    default) or Bonferroni's, at family-wise level ``alpha``. A subgroup is *worse beyond chance*
    on a metric when its difference is negative and its corrected p-value is below ``alpha``.

    Artefacts: ``subgroups.csv`` (one row per subgroup and metric), ``subgroups.png`` (a forest
    plot of the differences) and ``subgroups.json`` (the settings, which the findings read).
    """

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        head: str = "classification",
        level: Literal["study", "image"] = "study",
        fields: tuple[str, ...] = FIELDS,
        min_studies: int = 20,
        bootstrap: int = 1000,
        alpha: float = 0.05,
        correction: Literal["holm", "bonferroni"] = "holm",
        seed: int = 0,
        split: str = "test",
    ) -> None:
        if min_studies < 1:
            raise ValueError(f"min_studies must be at least 1, got {min_studies}.")
        if bootstrap < 0:
            raise ValueError(f"bootstrap must be 0 (off) or a number of resamples, got {bootstrap}.")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}.")
        if correction not in ("holm", "bonferroni"):
            raise ValueError(f"correction must be 'holm' or 'bonferroni', got {correction!r}.")
        fields = list(fields)
        if not fields or any(not part for field in fields for part in field.split("+")):
            raise ValueError(f"fields must name metadata fields (a '+' joins several), got {fields!r}.")
        self._classification = ClassificationEvaluator(class_names=class_names, head=head, level=level, bootstrap=0,
                                                       seed=seed, split=split)
        self.class_names = list(class_names)
        self.head, self.level, self.fields = head, level, fields
        self.min_studies, self.bootstrap, self.alpha, self.correction = min_studies, bootstrap, alpha, correction
        self.seed, self.split = seed, split
        self._base_fields = list(dict.fromkeys(part for field in fields for part in field.split("+")))
        self.reset()

    def reset(self) -> None:
        self._classification.reset()
        self._meta: dict[str, list[str]] = {field: [] for field in self._base_fields}
        self._analysis: dict[str, Any] | None = None

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        self._classification.update(batch, outputs)
        keep = (batch["label"].detach().long().cpu() >= 0).tolist()
        meta = batch.get("meta") or {}
        for field in self._base_fields:
            values = meta.get(field)
            values = [UNKNOWN] * len(keep) if values is None else [str(v) for v in values]
            self._meta[field] += [v for v, k in zip(values, keep, strict=True) if k]
        self._analysis = None

    # -- the analysis -----------------------------------------------------------------------------

    def unit_values(self) -> tuple[list[str], dict[str, list[str]]]:
        """The scored units' ids and, per field of ``fields``, each unit's value (shared, ``mixed``
        or ``""``)."""
        units = self._classification._units(self._classification._scored)
        image_unit = units.unit.tolist()
        values: dict[str, list[str]] = {}
        for field in self.fields:
            parts = field.split("+")
            seen: list[set[str]] = [set() for _ in units.ids]
            for i, u in enumerate(image_unit):
                image_values = [self._meta[part][i] for part in parts]
                seen[u].add(UNKNOWN if UNKNOWN in image_values else "+".join(image_values))
            known = [s - {UNKNOWN} for s in seen]
            values[field] = [UNKNOWN if not k else next(iter(k)) if len(k) == 1 else MIXED for k in known]
        return units.ids, values

    def subgroups(self) -> list[tuple[str, str, Tensor]]:
        """The examined subgroups: ``(field, value, membership (N,) bool)``, in field order, larger first."""
        ids, values = self.unit_values()
        total = len(ids)
        chosen = []
        for field in self.fields:
            counts: dict[str, int] = {}
            for value in values[field]:
                if value != UNKNOWN:
                    counts[value] = counts.get(value, 0) + 1
            for value, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
                if count >= self.min_studies and total - count >= self.min_studies:
                    member = torch.tensor([v == value for v in values[field]], dtype=torch.bool)
                    chosen.append((field, value, member))
        return chosen

    def analysis(self) -> dict[str, Any]:
        """Every examined subgroup's metrics, the rest's, the paired differences, intervals and tests."""
        if self._analysis is not None:
            return self._analysis
        evaluator = self._classification
        units = evaluator._units(evaluator._scored)
        rows: list[dict[str, Any]] = []
        intervals: dict[str, tuple[float, float]] = {}
        groups = self.subgroups() if units.ids else []
        if groups:
            probabilities, labels = units.probabilities(), units.labels
            members = torch.stack([member for _, _, member in groups]).double()  # (S, N)
            point = weighted_metrics(probabilities, labels, torch.cat([members, 1 - members]))
            samples: dict[str, list[Tensor]] = {}
            if self.bootstrap:
                for counts in resample_blocks(units.clusters, self.bootstrap, self.seed):
                    for s, member in enumerate(members):
                        both = weighted_metrics(probabilities, labels, torch.cat([counts * member, counts * (1 - member)]))
                        for metric in METRICS:
                            inside, outside = both[metric].chunk(2)
                            key = f"{s}/{metric}"
                            samples.setdefault(f"{key}/subgroup", []).append(inside)
                            samples.setdefault(f"{key}/difference", []).append(inside - outside)
            quantiles = percentile_intervals(samples)
            patients = units.patients
            for s, (field, value, member) in enumerate(groups):
                n = int(member.sum())
                in_patients = len({patients[i] for i in member.nonzero().flatten().tolist()}) if patients else n
                for metric in METRICS:
                    inside, outside = float(point[metric][s]), float(point[metric][len(groups) + s])
                    key = f"{s}/{metric}"
                    difference_samples = torch.cat(samples[f"{key}/difference"]) if samples else torch.empty(0)
                    valid = difference_samples[~difference_samples.isnan()]
                    p = math.nan
                    difference = inside - outside
                    if len(valid) >= 10 and math.isfinite(difference):
                        spread = float(valid.std())
                        p = math.erfc(abs(difference) / spread / math.sqrt(2)) if spread > 0 else float(difference == 0)
                    rows.append({
                        "field": field, "group": value, "key": subgroup_key(field, value), "metric": metric,
                        "n": n, "patients": in_patients, "rest_n": len(units.ids) - n,
                        "subgroup": inside, "subgroup_interval": quantiles.get(f"{key}/subgroup"),
                        "rest": outside, "difference": difference, "difference_interval": quantiles.get(f"{key}/difference"),
                        "p": p,
                    })
        tested = [row for row in rows if math.isfinite(row["p"])]
        adjusted = correct_p_values([row["p"] for row in tested], self.correction)
        for row, p in zip(tested, adjusted):
            row["p_adjusted"] = p
        for row in rows:
            row.setdefault("p_adjusted", math.nan)
            row["worse"] = bool(row["difference"] < 0 and row["p_adjusted"] < self.alpha)
            name = f"subgroup/{row['key']}/{row['metric']}"
            if row["subgroup_interval"]:
                intervals[name] = row["subgroup_interval"]
            if row["difference_interval"]:
                intervals[f"{name}/difference"] = row["difference_interval"]
        self._analysis = {"rows": rows, "intervals": intervals, "subgroups": len(groups), "tests": len(tested),
                          "units": len(units.ids)}
        return self._analysis

    # -- the evaluator protocol -------------------------------------------------------------------

    def compute(self) -> dict[str, float]:
        analysis = self.analysis()
        rows = analysis["rows"]
        metrics: dict[str, float] = {
            "subgroups/examined": float(analysis["subgroups"]),
            "subgroups/tests": float(analysis["tests"]),
            "subgroups/worse": float(len({row["key"] for row in rows if row["worse"]})),
        }
        for row in rows:
            name = f"subgroup/{row['key']}/{row['metric']}"
            metrics[name] = row["subgroup"]
            metrics[f"{name}/difference"] = row["difference"]
        return metrics

    def intervals(self) -> dict[str, tuple[float, float]]:
        return dict(self.analysis()["intervals"])

    def save(self, out_dir: Path) -> None:
        """Write ``subgroups.csv``, ``subgroups.json`` and, when a subgroup was examined, ``subgroups.png``."""
        analysis = self.analysis()
        if not analysis["units"]:
            return
        out_dir = Path(out_dir)
        rows = analysis["rows"]

        def ends(interval: tuple[float, float] | None) -> list[str]:
            return [number(interval[0]), number(interval[1])] if interval else ["", ""]

        write_csv(
            out_dir / "subgroups.csv",
            ["field", "group", "metric", "n", "patients", "subgroup", "subgroup_low", "subgroup_high", "rest_n", "rest",
             "difference", "difference_low", "difference_high", "p", "p_adjusted", "worse"],
            [[row["field"], row["group"], row["metric"], row["n"], row["patients"], number(row["subgroup"]),
              *ends(row["subgroup_interval"]), row["rest_n"], number(row["rest"]), number(row["difference"]),
              *ends(row["difference_interval"]), number(row["p"]), number(row["p_adjusted"]), "yes" if row["worse"] else "no"]
             for row in rows],
        )
        write_json(out_dir / SETTINGS_FILE, {
            "level": self.level, "fields": self.fields, "min_studies": self.min_studies, "bootstrap": self.bootstrap,
            "alpha": self.alpha, "correction": self.correction, "subgroups": analysis["subgroups"],
            "tests": analysis["tests"], "metrics": list(METRICS), "scored": analysis["units"],
            "test": "two-sided normal approximation from the bootstrap standard deviation of the paired difference",
        })
        if rows:
            plot_forest(rows, self.split, self.level, self.correction, analysis["tests"], out_dir / "subgroups.png")


def correct_p_values(p_values: Sequence[float], correction: str) -> list[float]:
    """Family-wise corrected p-values: Holm's step-down (``holm``) or Bonferroni's (``bonferroni``)."""
    m = len(p_values)
    if correction == "bonferroni":
        return [min(1.0, m * p) for p in p_values]
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def plot_forest(rows: list[dict[str, Any]], split: str, level: str, correction: str, tests: int, path: Path) -> None:
    """One panel per metric: each subgroup's difference from the rest of the split with its interval."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    labels = list(dict.fromkeys((row["field"], row["group"], row["n"]) for row in rows))
    units = "studies" if level == "study" else "images"
    figure = Figure(figsize=(3.2 * len(metrics) + 2.4, 1.6 + 0.32 * len(labels)), layout="constrained")
    panels = figure.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    positions = {label: len(labels) - 1 - i for i, label in enumerate(labels)}
    for axes, metric in zip(panels, metrics):
        axes.axvline(0.0, color="grey", linestyle="--", linewidth=1)
        for row in (r for r in rows if r["metric"] == metric):
            y = positions[(row["field"], row["group"], row["n"])]
            colour = "tab:red" if row["worse"] else "black"
            interval = row["difference_interval"]
            if interval:
                axes.plot(interval, [y, y], color=colour, linewidth=1.5)
            axes.plot([row["difference"]], [y], marker="s" if row["worse"] else "o", color=colour, markersize=5)
        axes.set(title=METRICS.get(metric, metric), xlabel="difference: subgroup minus the rest")
        axes.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(list(positions.values()), [f"{field} {group} (n={n})" for field, group, n in positions])
    panels[0].set_ylim(-0.7, len(labels) - 0.3)
    legend = [
        Line2D([], [], color="grey", linestyle="--", label="the rest of the split (difference 0)"),
        Line2D([], [], color="black", marker="o", label="difference with its 95% bootstrap interval (patients resampled)"),
        Line2D([], [], color="tab:red", marker="s", label=f"worse beyond chance ({correction.capitalize()} over {tests} tests)"),
    ]
    figure.legend(handles=legend, loc="outside lower center", ncols=1, fontsize=8, frameon=False)
    figure.suptitle(f"Subgroups against the rest of the {split} split ({units})")
    save_figure(figure, path)


__all__ = ["FIELDS", "METRICS", "SubgroupEvaluator", "correct_p_values", "plot_forest", "subgroup_key"]
