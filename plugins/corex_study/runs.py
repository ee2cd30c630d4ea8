"""Reading finished run directories: recipe, seeds, label fraction, test metrics and predictions."""

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
    seed: int  # the training seed (initialisation, order, augmentation): the recipe's ``seed``
    label_fraction: float
    stage: str  # the evaluate stage scored on the test split
    metrics: dict[str, float]
    intervals: dict[str, list[float]] = field(default_factory=dict)
    time_s: float = 0.0
    data_seed: int | None = None  # the data seed (phantom, split, label subset): ``data.seed``, else ``seed``
    config: dict[str, Any] = field(default_factory=dict)  # the run's recipe.yaml
    study_arm: str | None = None  # the arm's name in a `corex study` directory (its recipe file name)
    label: str = ""  # the arm's label: the recipe name, and the keys that set it apart from a namesake

    def __post_init__(self) -> None:
        if self.data_seed is None:
            self.data_seed = self.seed
        self.label = self.label or self.recipe

    @property
    def arm(self) -> str:
        return f"{self.label} @ {self.label_fraction:g}"

    @property
    def seeds(self) -> str:
        """How the run's seeds read in a message."""
        return f"seed {self.seed}" if self.seed == self.data_seed else f"data seed {self.data_seed}, training seed {self.seed}"

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
    recipe = recipe if isinstance(recipe, dict) else {}
    stages = results["stages"]
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    seed = int(recipe.get("seed", 0))
    # A `corex study` directory lays its runs out as ARM/frac-F/SEEDS: the arm is the recipe's file name.
    study_arm = path.parent.parent.name if path.parent.name.startswith("frac-") else None
    return Run(
        path=path,
        recipe=str(results.get("recipe") or recipe.get("name") or path.name),
        seed=seed,
        label_fraction=float(data.get("label_fraction", 1.0)),
        stage=stage,
        metrics={k: v for k, v in stages[stage].get("metrics", {}).items() if v is not None},
        intervals=stages[stage].get("intervals", {}),
        time_s=float(sum(s.get("time_s", 0.0) for s in stages.values())),
        data_seed=int(data["seed"]) if data.get("seed") is not None else seed,
        config=recipe,
        study_arm=study_arm,
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
    return sorted(unique.values(), key=lambda r: (r.label_fraction, r.recipe, r.data_seed, r.seed))


@dataclass
class Predictions:
    """Study-level test predictions of one run: ids, probabilities ``(N, K)``, labels, patient groups."""

    ids: list[str]
    probabilities: np.ndarray
    labels: np.ndarray
    groups: list[str]
    classes: list[str] = field(default_factory=list)  # the class of each probability column, as the labels name it


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
    names = {slug(row["label"]): row["label"] for row in rows}
    return Predictions(ids, probabilities, labels, groups, [names.get(c[2:], c[2:]) for c in classes])
