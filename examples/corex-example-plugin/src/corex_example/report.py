"""What the example evaluator's numbers mean: its metrics, its file, and a finding about them.

corex reads these through the ``corex_metrics``, ``corex_artefacts`` and ``corex_findings`` hooks,
so the run's summary table, its report, ``corex compare`` and ``corex study`` show the evaluator's
metric like a built-in one, with no change to corex. Light: no torch.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from corex.metrics import Finding, Metric, stage_folder

METRICS = (
    Metric("sens_at_spec90", "sensitivity at 90% specificity", headline=True,
           description="per class, one against the rest, the share found at a threshold that flags at most 10% of the others; "
                       "the mean over classes"),
    Metric("sens_at_spec*", "sensitivity at a fixed specificity"),  # other specificities, and each class's value
)
ARTEFACTS = {"sens_at_spec90.csv": "Operating points at 90% specificity on the {split} split: each class's threshold, sensitivity "
                                   "and achieved specificity."}


def findings(run_dir: Path, stage: str, result: dict[str, Any]) -> list[Finding]:
    """One sentence per operating point the evaluator wrote: the mean sensitivity and the weakest class."""
    found = []
    metrics = result.get("metrics", {})
    for table in sorted(stage_folder(run_dir, stage).glob("sens_at_spec*.csv")):
        name = table.stem
        with table.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["sensitivity"] not in ("", "nan")]
        if not rows or not isinstance(metrics.get(name), (int, float)) or math.isnan(metrics[name]):
            continue
        weakest = min(rows, key=lambda row: float(row["sensitivity"]))
        specificity = name.removeprefix("sens_at_spec")
        text = (f"At {specificity}% specificity per class, the classes are found at a mean sensitivity of {metrics[name]:.2f}; "
                f"the weakest is {weakest['class']} at {float(weakest['sensitivity']):.2f}.")
        also = ({"metric": f"{name}/{weakest['class']}", "value": float(weakest["sensitivity"]), "source": table.name},)
        found.append(Finding(text, name, float(metrics[name]), "results.json", stage, also))
    return found
