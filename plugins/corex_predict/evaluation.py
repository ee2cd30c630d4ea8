"""``corex evaluate``: a finished run (or an export) evaluated again, without training.

The data come from the run's resolved recipe (``--set`` changes it for this evaluation only, e.g.
``data.root=/elsewhere``); the model is the run's final one (or ``--stage``'s). The evaluators are
``--evaluators``, else those of the recipe's evaluate stage for that split (the last evaluate
stage when none matches), else one per head. Everything is written into a new folder,
``RUN/evaluations/<split>-<n>/`` (beside an export: ``<name>-evaluations/<split>-<n>/``), so the
run's own results are never touched: ``results.json``, ``recipe.yaml`` as used, and the
evaluators' artefacts; with ``--tta`` the metrics with TTA are added under ``tta/`` and their
artefacts go to ``tta/``. Evaluators that look inside the model (Grad-CAM) run once, without TTA.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import corex
from corex import rundir
from corex.errors import CorexError
from corex.interfaces import NeedsModel
from corex.plugins import Registry
from corex.recipe import Component, Recipe, Stage
from corex_predict.model import load_model
from corex_predict.tta import TTAModel, parse_tta

SPLITS = ("train", "val", "test")


def evaluate(
    model: str | Path,
    *,
    split: str = "test",
    overrides: Sequence[str] = (),
    evaluators: Sequence[str] | None = None,
    tta: str | Sequence[str] | None = None,
    stage: str | None = None,
    out: str | Path | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    registry: Registry | None = None,
) -> tuple[dict[str, Any], Path]:
    """Evaluate ``model`` (run directory or export) on ``split``; returns ``(results, folder)``."""
    if split not in SPLITS:
        raise CorexError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    if batch_size is not None and batch_size < 1:
        raise CorexError(f"--batch-size must be at least 1, got {batch_size}")
    registry = registry or Registry()
    views = parse_tta(tta)
    loaded = load_model(model, stage=stage, registry=registry)
    loaded.require_torch("corex evaluate")
    recipe = loaded.recipe(list(overrides))
    loaded.to(device or recipe.device)
    spec = _evaluation_stage(recipe, split, evaluators, loaded, registry)

    source = corex.build_data(recipe, registry)
    if list(source.class_names) != loaded.class_names:
        raise CorexError(f"the data's classes {list(source.class_names)} are not the model's {loaded.class_names}")
    folder = _new_folder(Path(model).expanduser(), split, out)
    rundir.atomic_write_text(folder / "recipe.yaml", recipe.to_yaml())
    if batch_size is not None:
        spec.batch_size = batch_size

    heads = list(loaded.model.heads)
    weights = {name: float(head.get("weight", 1.0)) for name, head in loaded.meta["heads"].items()}

    def run(model, evaluators, artefacts: Path, label: str):
        # Exactly the engine's evaluate stage: calibration fitted on the validation split first.
        return corex.evaluate_split(model, source, recipe, spec, evaluators, loaded.device, split=split, heads=heads, weights=weights,
                              artefacts=artefacts, desc=f"[evaluate] {label}", channels_last=loaded.channels_last)

    def build():
        return with_fitted_gate(corex.build_evaluators(spec, loaded.class_names, registry, split), loaded.gate)

    metrics, intervals = run(loaded.model, build(), folder, split)
    if views:
        # Evaluators that look inside the model (Grad-CAM, the gate) would see the plain model: run them once.
        plain_only = [(path, e) for path, e in build() if not (isinstance(e, NeedsModel) and e.needs_model)]
        tta_metrics, tta_intervals = run(TTAModel(loaded.model, views), plain_only, folder / "tta", f"{split} with tta")
        metrics.update({f"tta/{k}": v for k, v in tta_metrics.items()})
        intervals.update({f"tta/{k}": v for k, v in tta_intervals.items()})

    result: dict[str, Any] = {"kind": "evaluate", "split": split, "metrics": metrics}
    if intervals:
        result["intervals"] = {k: [float(low), float(high)] for k, (low, high) in intervals.items()}
    results = {
        "recipe": recipe.name,
        "model": str(loaded.source),
        "stage": loaded.meta.get("stage"),
        "recipe_digest": loaded.meta.get("recipe_digest"),
        "split": split,
        "evaluators": [c.name for c in spec.evaluators] + (["input_gate"] if loaded.gate is not None and
                                                            "input_gate" not in [c.name for c in spec.evaluators] else []),
        "tta": [view.name for view in views],
        "overrides": list(overrides),
        "stages": {"evaluate": result},
    }
    rundir.write_json(folder / "results.json", results)
    return results, folder


def with_fitted_gate(evaluators: list[tuple[str, Any]], gate: Any) -> list[tuple[str, Any]]:
    """A model that carries a fitted input gate is judged by that gate, not by one fitted again on
    this data (which may be another source): each ``input_gate`` evaluator is replaced by it, and it
    is added when none is listed."""
    if gate is None:
        return evaluators
    from corex_predict.gate import FittedGateEvaluator, GateEvaluator

    replaced = [(path, FittedGateEvaluator(gate) if isinstance(e, GateEvaluator) else e) for path, e in evaluators]
    if not any(isinstance(e, GateEvaluator) for _, e in evaluators):
        replaced.append(("input_gate (the model's fitted gate)", FittedGateEvaluator(gate)))
    return replaced


def _evaluation_stage(recipe: Recipe, split: str, names: Sequence[str] | None, loaded, registry: Registry) -> Stage:
    """A stage holding the evaluators to run, with the batch size and precision of the recipe's
    matching evaluate stage."""
    evaluate_stages = [s for s in recipe.stages.values() if s.kind == "evaluate"]
    template = next((s for s in reversed(evaluate_stages) if s.split == split), evaluate_stages[-1] if evaluate_stages else None)
    if names:
        components = [Component(name) for name in names]
    elif template is not None:
        components = list(template.evaluators)
    else:  # one evaluator per head, named after the head's task
        known = registry.components("evaluators")
        components = [
            Component(task, {"head": head}) for head, module in loaded.model.heads.items()
            if (task := getattr(module, "task", None)) in known
        ]
    if not components:
        raise CorexError("no evaluator to run: pass --evaluators (see `corex plugins`)")
    for component in components:
        try:
            registry.get("evaluators", component.name)
        except KeyError as exc:
            raise CorexError(f"--evaluators: {exc.args[0]}") from None
    return Stage(
        name="evaluate", kind="evaluate", split=split, evaluators=components,
        batch_size=template.batch_size if template else None, amp=template.amp if template else "auto",
    )


def _new_folder(model: Path, split: str, out: str | Path | None) -> Path:
    """``out`` (new or empty), else the next free ``<split>-<n>`` under the run's ``evaluations``."""
    if out is not None:
        folder = Path(out).expanduser()
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise CorexError(f"--out: '{folder}' already holds files; choose a new folder (evaluations never overwrite)")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    base = model / "evaluations" if model.is_dir() else model.parent / f"{model.stem}-evaluations"
    base.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            (base / f"{split}-{n}").mkdir()  # atomic: two evaluations never share a folder
            return base / f"{split}-{n}"
        except FileExistsError:
            n += 1


__all__ = ["evaluate"]
