"""corex_eval's findings: plain sentences computed from its metrics and files, each kept with the numbers it quotes.

Each is a :class:`corex.metrics.Finding` (the ``corex_findings`` hook): ``metric`` and ``value``
are the number the sentence is about and ``source`` where it comes from (``results.json``,
``per_class.csv`` or ``predictions.csv`` of the stage); ``also`` lists any further numbers the
sentence quotes in the same form. Nothing here is written for one run: every sentence is a rule
applied to whatever metrics and artefacts the evaluate stage left.

Deploy-readiness rule (stated in every report): a model is called ready only when every class
reaches a test recall of at least ``READY_RECALL``; a missed finding of any class is a clinical
error, so one weak class is enough to say no. Meeting the rule is not a clinical validation.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from corex.metrics import Finding, stage_folder

READY_RECALL = 0.8
CONFUSION_SHOWN = 0.10  # confusions at least this common are stated
MAX_CONFUSIONS = 3

RULE = (f"Deploy-readiness rule used here: every class must reach a test recall of at least {READY_RECALL:.2f} "
        "(one weak class is enough to say no); meeting it is not a clinical validation.")


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

    recalls = {row["class"]: float(row["recall"]) for row in per_class if row.get("recall") not in (None, "", "nan")}
    if recalls:
        ready = [c for c, r in recalls.items() if r >= READY_RECALL]
        worst = min(recalls, key=recalls.get)
        best = max(recalls, key=recalls.get)
        if not ready:
            text = (f"No class reaches {READY_RECALL:.2f} recall on the {split} split (the best, {best}, reaches "
                    f"{recalls[best]:.2f}): not ready to deploy.")
            found.append(_finding(text, f"recall/{best}", recalls[best], "per_class.csv", stage, verdict=True, note=RULE))
        elif len(ready) < len(recalls):
            verb = "reaches" if len(ready) == 1 else "reach"
            text = (f"{len(ready)} of {len(recalls)} classes {verb} {READY_RECALL:.2f} recall; {worst} falls short at "
                    f"{recalls[worst]:.2f}: not ready to deploy.")
            found.append(_finding(text, f"recall/{worst}", recalls[worst], "per_class.csv", stage, verdict=True, note=RULE))
        else:
            text = (f"Every class reaches {READY_RECALL:.2f} recall (the lowest, {worst}, {recalls[worst]:.2f}): the "
                    "model meets this report's rule, which is not a clinical validation.")
            found.append(_finding(text, f"recall/{worst}", recalls[worst], "per_class.csv", stage, verdict=True, note=RULE))

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
    if len(f1) > 1:
        hardest = min(f1, key=f1.get)
        found.append(_finding(f"The hardest class is {hardest} (lowest F1, {f1[hardest]:.2f}).",
                              f"f1/{hardest}", f1[hardest], "results.json", stage))

    if "study_map" in metrics:
        found.append(_finding(f"Study-level mAP (the SIIM-FISABIO-RSNA study score) {metrics['study_map']:.3f}.",
                              "study_map", metrics["study_map"], "results.json", stage))

    if "ece" in metrics and "ece/calibrated" in metrics:
        also = [{"metric": "ece/calibrated", "value": metrics["ece/calibrated"], "source": "results.json"}]
        detail = ""
        if "temperature" in metrics:
            also.append({"metric": "temperature", "value": metrics["temperature"], "source": "results.json"})
            detail = f" (temperature {metrics['temperature']:.2f}, fitted on the validation split)"
        text = f"ECE {metrics['ece']:.2f} before and {metrics['ece/calibrated']:.2f} after temperature scaling{detail}."
        found.append(_finding(text, "ece", metrics["ece"], "results.json", stage, also))
    elif "ece" in metrics:
        text = (f"ECE {metrics['ece']:.2f}: the top-class confidence differs from the accuracy by about "
                f"{100 * metrics['ece']:.0f} percentage points on average.")
        found.append(_finding(text, "ece", metrics["ece"], "results.json", stage))

    if "pointing_game" in metrics:
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
    return found
