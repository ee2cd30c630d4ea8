"""Reading finished run directories: recipe, seed, label fraction, test metrics and predictions."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from corex.errors import CorexError
from corex.metrics import slug, stage_folder


@dataclass
class Run:
    """One run directory with an evaluate stage on the test split."""

    path: Path
    recipe: str
    seed: int
    label_fraction: float
    stage: str  # the evaluate stage scored on the test split
    metrics: dict[str, float]
    intervals: dict[str, list[float]] = field(default_factory=dict)
    time_s: float = 0.0

    @property
    def arm(self) -> str:
        return f"{self.recipe} @ {self.label_fraction:g}"

    def predictions_path(self, name: str) -> Path:
        return stage_folder(self.path, self.stage) / name


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorexError(f"cannot read '{path}': {exc}") from exc


def test_stage(results: dict[str, Any]) -> str | None:
    """The last evaluate stage scored on the test split (``None`` when there is none)."""
    names = [name for name, stage in results.get("stages", {}).items()
             if stage.get("kind") == "evaluate" and stage.get("split", "test") == "test"]
    return names[-1] if names else None


def read_run(path: Path) -> Run | None:
    """The run in ``path``; ``None`` for a run without a test evaluation (a shared pre-training)."""
    results = read_json(path / "results.json")
    stage = test_stage(results)
    if stage is None:
        return None
    recipe_file = path / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.exists() else {}
    stages = results["stages"]
    return Run(
        path=path,
        recipe=str(results.get("recipe") or recipe.get("name") or path.name),
        seed=int(recipe.get("seed", 0)),
        label_fraction=float(recipe.get("data", {}).get("label_fraction", 1.0)),
        stage=stage,
        metrics={k: v for k, v in stages[stage].get("metrics", {}).items() if v is not None},
        intervals=stages[stage].get("intervals", {}),
        time_s=float(sum(s.get("time_s", 0.0) for s in stages.values())),
    )


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run with a test evaluation in ``paths`` (run directories or folders holding runs)."""
    found: list[Run] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise CorexError(f"'{path}' is not a directory (give run or study directories)")
        candidates = [path] if (path / "results.json").exists() else sorted(p.parent for p in path.rglob("results.json"))
        # A folder inside a run (a re-evaluation of it) is not another run of the study.
        candidates = [c for c in candidates if not any(other in c.parents for other in candidates)]
        runs = [run for run in (read_run(c) for c in candidates) if run is not None]
        if not runs:
            raise CorexError(f"'{path}' holds no finished run with a test evaluation (no results.json with an evaluate stage on the test split)")
        found.extend(runs)
    unique = {run.path.resolve(): run for run in found}
    return sorted(unique.values(), key=lambda r: (r.label_fraction, r.recipe, r.seed))


@dataclass
class Predictions:
    """Study-level test predictions of one run: ids, probabilities ``(N, K)``, labels, patient groups."""

    ids: list[str]
    probabilities: np.ndarray
    labels: np.ndarray
    groups: list[str]


def read_predictions(run: Run, name: str) -> Predictions | None:
    """The study-level predictions file ``name`` of the run's test stage (corex's predictions format,
    see :class:`corex.metrics.Metric`); ``None`` when absent.

    Columns: ``study_id`` (or ``image_id``), ``label``, ``p_<class>``; a ``patient_id`` column,
    when present, groups a patient's studies for the bootstrap.
    """
    path = run.predictions_path(name)
    if not path.exists():
        return None
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    columns = list(rows[0])
    id_column = next((c for c in columns if c in ("study_id", "image_id")), columns[0])
    classes = [c for c in columns if c.startswith("p_")]
    index = {c[2:]: i for i, c in enumerate(classes)}
    try:
        labels = np.array([index[slug(row["label"])] for row in rows])
    except KeyError as exc:
        raise CorexError(f"{path}: label {exc} has no probability column (columns: {', '.join(columns)})") from exc
    probabilities = np.array([[float(row[c]) for c in classes] for row in rows])
    ids = [row[id_column] for row in rows]
    groups = [row["patient_id"] for row in rows] if "patient_id" in columns else ids
    return Predictions(ids, probabilities, labels, groups)
