"""corex_eval's findings: plain sentences computed from its metrics and files, each kept with the numbers it quotes.

Each is a :class:`corex.metrics.Finding` (the ``corex_findings`` hook): ``metric`` and ``value``
are the number the sentence is about and ``source`` where it comes from (``results.json``,
``per_class.csv`` or ``predictions.csv`` of the stage); ``also`` lists any further numbers the
sentence quotes in the same form. Nothing here is written for one run: every sentence is a rule
applied to whatever metrics and artefacts the evaluate stage left.

Deploy-readiness rule (stated in every report): a model is called ready only when every class
reaches a test recall of at least the classification evaluator's ``ready_recall`` (default
``READY_RECALL``); a missed finding of any class is a clinical error, so one weak class is enough to
say no. Each recall is quoted with its exact interval (:mod:`corex_eval.sentences`). Meeting the
rule is not a clinical validation.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from corex.metrics import Finding, slug, stage_folder
from corex_eval import sentences
from corex_eval.external import external_findings
from corex_eval.rules import CONFIDENCE, READY_RECALL

CONFUSION_SHOWN = 0.10  # confusions at least this common are stated
MAX_CONFUSIONS = 3

RULE = sentences.rule(READY_RECALL, CONFIDENCE)  # with the default settings


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _finding(text: str, metric: str, value: float, source: str, stage: str, also: list[dict[str, Any]] | None = None,
             verdict: bool = False, note: str = "") -> Finding:
    return Finding(text, metric, float(value), source, stage, tuple(also or ()), verdict=verdict, note=note)


def confusion_shares(predictions: list[dict[str, str]]) -> dict[str, dict[str, tuple[int, int]]]:
    """``{true: {predicted: (count, total of true)}}`` from predictions.csv rows."""
    counts: dict[str, dict[str, int]] = {}
    for row in predictions:
        counts.setdefault(row["label"], {}).setdefault(row["predicted"], 0)
        counts[row["label"]][row["predicted"]] += 1
    return {true: {pred: (n, sum(row.values())) for pred, n in row.items()} for true, row in counts.items()}


def stage_findings(run_dir: Path, stage: str, result: dict[str, Any]) -> list[Finding]:
    """The findings of one evaluate stage, most important first."""
    metrics = {k: v for k, v in result.get("metrics", {}).items() if v is not None}
    intervals = result.get("intervals", {})
    folder = stage_folder(run_dir, stage)
    split = result.get("split", stage)
    per_class = read_csv(folder / "per_class.csv")
    predictions = read_csv(folder / "predictions.csv")
    level = "studies" if predictions and "study_id" in predictions[0] else "images"
    found: list[Finding] = []

    settings = sentences.classification_settings(folder)
    found.extend(sentences.verdict_finding(per_class, settings, split, stage))

    if "macro_f1" in metrics:
        interval = intervals.get("macro_f1")
        detail = f" (95% interval {interval[0]:.2f} to {interval[1]:.2f})" if interval else ""
        count = f" over {int(metrics['n'])} {level}" if "n" in metrics else ""
        found.append(_finding(f"Macro-F1 {metrics['macro_f1']:.2f}{detail}{count} of the {split} split.",
                              "macro_f1", metrics["macro_f1"], "results.json", stage))
        if interval:
            width = interval[1] - interval[0]
            found.append(_finding(
                f"The 95% interval of macro-F1 is {width:.2f} wide: it says how well this one model's score is known "
                "on a test set of this size. Two models scored on the same test studies are compared with a paired test "
                "(corex compare), which resolves much smaller differences.", "interval/macro_f1", width, "results.json", stage))

    shares = confusion_shares(predictions)
    confusions = sorted(
        ((n / total, true, pred, n, total) for true, row in shares.items() for pred, (n, total) in row.items() if pred != true),
        reverse=True,
    )
    for share, true, pred, n, total in [c for c in confusions if c[0] >= CONFUSION_SHOWN][:MAX_CONFUSIONS]:
        text = f"{percent(share)} of {true} {split} {level} were predicted {pred} ({n} of {total})."
        found.append(_finding(text, f"confusion/{true}/{pred}", share, "predictions.csv", stage))

    f1 = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("f1/")}
    found.extend(sentences.hardest_finding(f1, stage))

    if "study_map" in metrics:
        found.append(_finding(f"Study-level mAP (the SIIM-FISABIO-RSNA study score) {metrics['study_map']:.3f}.",
                              "study_map", metrics["study_map"], "results.json", stage))

    found.extend(sentences.calibration_finding(metrics, stage, settings.get("temperature_problem")))
    found.extend(sentences.selective_finding(metrics, intervals, settings, level, stage))
    found.extend(sentences.subgroup_findings(folder, metrics, stage))

    # With the training boxes' fixed point known, the baseline finding states the pointing game instead.
    if "pointing_game" in metrics and not math.isfinite(metrics.get("pointing_game/prior", math.nan)):
        also, chance = [], ""
        if "mask_area" in metrics:
            also = [{"metric": "mask_area", "value": metrics["mask_area"], "source": "results.json"}]
            chance = f"; a uniform map would hit {percent(metrics['mask_area'])}"
        text = (f"The pointing game hit {percent(metrics['pointing_game'])} of {split} images with opacity boxes "
                f"(the saliency maximum lies inside a box{chance}).")
        found.append(_finding(text, "pointing_game", metrics["pointing_game"], "results.json", stage, also))

    if "dice/positive" in metrics:
        also, caveat = [], ""
        if "dice" in metrics and abs(metrics["dice"] - metrics["dice/positive"]) >= 0.005:
            also = [{"metric": "dice", "value": metrics["dice"], "source": "results.json"}]
            caveat = f"; the plain Dice of {metrics['dice']:.2f} counts an empty prediction on an empty mask as perfect"
        text = f"On images with an opacity, the predicted masks reach Dice {metrics['dice/positive']:.2f}{caveat}."
        found.append(_finding(text, "dice/positive", metrics["dice/positive"], "results.json", stage, also))
    if "fp_area/negative" in metrics:
        text = (f"On images without an opacity, {100 * metrics['fp_area/negative']:.1f}% of the image is predicted as "
                "opacity on average.")
        found.append(_finding(text, "fp_area/negative", metrics["fp_area/negative"], "results.json", stage))
    found.extend(sentences.localization_baseline_findings(metrics, intervals, split, stage))
    found.extend(external_findings(run_dir, stage, result))
    found.extend(multilabel_findings(folder, stage, split, metrics, intervals))
    found.extend(knn_findings(folder, stage, split, metrics, intervals))
    return found


def _interval(intervals: dict[str, Any], name: str) -> str:
    interval = intervals.get(name)
    return f" (95% interval {interval[0]:.2f} to {interval[1]:.2f})" if interval else ""


def multilabel_findings(folder: Path, stage: str, split: str, metrics: dict[str, Any], intervals: dict[str, Any]) -> list[Finding]:
    """The ``multilabel`` evaluator's: the macro figures, the best and worst finding, where the thresholds came from."""
    if "multilabel/auroc" not in metrics:
        return []
    found = []
    per_label = read_csv(folder / "multilabel_per_label.csv")
    predictions = read_csv(folder / "multilabel_predictions.csv")
    level = "images" if predictions and "image_id" in predictions[0] else "studies"
    count = f" over {int(metrics['multilabel/labels'])} findings" if "multilabel/labels" in metrics else ""
    scored = f" of {int(metrics['multilabel/n'])} {level}" if "multilabel/n" in metrics else ""
    also = [{"metric": "multilabel/ap", "value": metrics["multilabel/ap"], "source": "results.json"}] if "multilabel/ap" in metrics else []
    ap = f" and macro AP {metrics['multilabel/ap']:.2f}{_interval(intervals, 'multilabel/ap')}" if also else ""
    text = f"Macro AUROC {metrics['multilabel/auroc']:.2f}{_interval(intervals, 'multilabel/auroc')}{ap}{count}{scored} of the {split} split."
    found.append(_finding(text, "multilabel/auroc", metrics["multilabel/auroc"], "results.json", stage, also))
    names = {slug(row["label"]): row["label"] for row in per_label}
    auroc = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith("multilabel/auroc/") and not math.isnan(v)}
    if len(auroc) > 1:
        best, worst = max(auroc, key=auroc.get), min(auroc, key=auroc.get)
        text = (f"The best-separated finding is {names.get(best, best)} (AUROC {auroc[best]:.2f}), the worst "
                f"{names.get(worst, worst)} (AUROC {auroc[worst]:.2f}).")
        found.append(_finding(text, f"multilabel/auroc/{worst}", auroc[worst], "results.json", stage,
                              [{"metric": f"multilabel/auroc/{best}", "value": auroc[best], "source": "results.json"}]))
    sources = [row.get("threshold_from", "") for row in per_label]
    if sources:
        fitted = sources.count("validation F1")
        if "fixed" in sources:
            text = f"Every finding is called positive at the fixed threshold {float(per_label[0]['threshold']):.2f}."
        elif fitted:
            rest = len(sources) - fitted
            tail = f"; {rest} at 0.5, without a validation positive" if rest else ""
            text = f"Decision thresholds: {fitted} of {len(sources)} findings at the F1-best threshold on the validation split{tail}."
        else:
            text = "Every finding is called positive at 0.5: no validation data chose the thresholds (F1 is at 0.5)."
        found.append(_finding(text, "thresholds/fitted", fitted, "multilabel_per_label.csv", stage))
    return found


def knn_findings(folder: Path, stage: str, split: str, metrics: dict[str, Any], intervals: dict[str, Any]) -> list[Finding]:
    """The ``knn`` evaluator's: how well a kNN vote on the frozen encoder's features does, against chance."""
    found = []
    bank = f", {int(metrics['knn/n_train'])} training images voting" if "knn/n_train" in metrics else ""
    if "knn/macro_f1" in metrics:
        header = next(iter(read_csv(folder / "knn_predictions.csv")), {})
        classes = sum(1 for column in header if column.startswith("p_"))
        chance = f" (chance: {1 / classes:.2f})" if classes else ""
        also = [{"metric": "knn/balanced_accuracy", "value": metrics["knn/balanced_accuracy"], "source": "results.json"}] \
            if "knn/balanced_accuracy" in metrics else []
        balanced = f" and balanced accuracy {metrics['knn/balanced_accuracy']:.2f}{chance}" if also else ""
        text = (f"A weighted kNN vote on the encoder's pooled features, without fine-tuning{bank}, reaches macro-F1 "
                f"{metrics['knn/macro_f1']:.2f}{_interval(intervals, 'knn/macro_f1')}{balanced} on the {split} split.")
        found.append(_finding(text, "knn/macro_f1", metrics["knn/macro_f1"], "results.json", stage, also))
    elif "knn/auroc" in metrics:
        text = (f"A weighted kNN vote on the encoder's pooled features, without fine-tuning{bank}, reaches macro AUROC "
                f"{metrics['knn/auroc']:.2f}{_interval(intervals, 'knn/auroc')} over the findings of the {split} split "
                "(0.5 is chance).")
        found.append(_finding(text, "knn/auroc", metrics["knn/auroc"], "results.json", stage))
    return found
