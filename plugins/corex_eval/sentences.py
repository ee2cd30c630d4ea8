"""corex_eval's findings about the deploy-readiness verdict, calibration, selective prediction, subgroups
and the localisation baselines: plain sentences, each a rule applied to whatever an evaluate stage left.

Light (no torch): the report imports it through the ``corex_findings`` hook. Every function returns
:class:`corex.metrics.Finding` objects whose ``metric``/``value`` (and ``also``) are the numbers quoted,
with the file they come from.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from corex.metrics import Finding
from corex_eval.exact import clopper_pearson
from corex_eval.rules import CONFIDENCE, COVERAGES, READY_RECALL, SANE_TEMPERATURE, SETTINGS_FILE, TARGET_ACCURACY, subgroup_key

TIE = 1e-9  # values closer than this are a tie


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def read_settings(folder: Path, name: str = SETTINGS_FILE) -> dict[str, Any]:
    """An evaluator's settings file in the stage's folder (``{}`` for runs older than it)."""
    path = folder / name
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def classification_settings(folder: Path) -> dict[str, Any]:
    """The verdict's and selective prediction's settings a run used (corex_eval.rules' defaults before they were written)."""
    settings = read_settings(folder)
    return {"ready_recall": float(settings.get("ready_recall", READY_RECALL)),
            "confidence": float(settings.get("confidence", CONFIDENCE)),
            "target_accuracy": float(settings.get("target_accuracy", TARGET_ACCURACY)),
            "coverages": tuple(settings.get("coverages", COVERAGES)),
            "selective_ranking": settings.get("selective_ranking", ""),
            "units": {"study": "studies", "image": "images"}.get(settings.get("level", "")),
            "temperature_problem": settings.get("temperature_problem")}


def rule(ready_recall: float, confidence: float) -> str:
    return (f"Deploy-readiness rule used here: every class must reach a test recall of at least {ready_recall:.2f} (one weak "
            f"class is enough to say no). Each recall is quoted with its exact (Clopper-Pearson) {confidence:.0%} interval: a "
            "shortfall is established when the whole interval lies below the bar, and reaching the bar is established when "
            "the whole interval lies above it. Meeting the rule is not a clinical validation.")


def names(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _finding(text: str, metric: str, value: float, source: str, stage: str, also: Sequence[Mapping[str, Any]] = (),
             verdict: bool = False, note: str = "") -> Finding:
    return Finding(text, metric, float(value), source, stage, tuple(dict(a) for a in also), verdict=verdict, note=note)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# -- the verdict --------------------------------------------------------------------------------------


def verdict_finding(per_class: list[dict[str, str]], settings: Mapping[str, Any], split: str, stage: str) -> list[Finding]:
    """Every class's recall against the bar, each with its exact interval; every class below the bar named."""
    bar, confidence = settings["ready_recall"], settings["confidence"]
    classes = []
    for row in per_class:
        recall, support = _number(row.get("recall")), _number(row.get("support"))
        if not math.isfinite(recall) or not support or not math.isfinite(support):
            continue
        low, high = _number(row.get("recall_low")), _number(row.get("recall_high"))
        quoted = math.isfinite(low) and math.isfinite(high)  # in the file: the finding can cite it
        if not quoted:  # a per_class.csv older than the intervals
            recalled = _number(row.get("recalled"))
            recalled = round(recall * support) if not math.isfinite(recalled) else int(recalled)
            low, high = clopper_pearson(int(recalled), int(support), confidence)
        classes.append({"name": row["class"], "recall": recall, "low": low, "high": high, "quoted": quoted})
    if not classes:
        return []
    level = f"{confidence:.0%}"

    def described(c: dict[str, Any], first: bool) -> str:
        interval = f"{level} interval {c['low']:.2f} to {c['high']:.2f}" if first else f"{c['low']:.2f} to {c['high']:.2f}"
        return f"{c['name']} {c['recall']:.2f} ({interval})"

    def cite(chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        also = []
        for c in chosen:
            also.append({"metric": f"recall/{c['name']}", "value": c["recall"], "source": "per_class.csv"})
            if c["quoted"]:
                also += [{"metric": f"recall_low/{c['name']}", "value": c["low"], "source": "per_class.csv"},
                         {"metric": f"recall_high/{c['name']}", "value": c["high"], "source": "per_class.csv"}]
        return also

    below = sorted((c for c in classes if c["recall"] < bar), key=lambda c: c["recall"])
    ready = [c for c in classes if c["recall"] >= bar]
    note = rule(bar, confidence)
    if below:
        listing = names([described(c, i == 0) for i, c in enumerate(below)])
        if not ready:
            head = f"No class reaches {bar:.2f} recall on the {split} split: {listing}."
        else:
            verb = "reaches" if len(ready) == 1 else "reach"
            head = f"{len(ready)} of {len(classes)} classes {verb} {bar:.2f} recall on the {split} split; below it: {listing}."
        established = [c["name"] for c in below if c["high"] < bar]
        open_ = [c["name"] for c in below if c["high"] >= bar]
        lie = "its interval lies" if len(established) == 1 else "their intervals lie"
        straddle = "its interval straddles" if len(open_) == 1 else "their intervals straddle"
        if not open_:
            sentence = (f"{'The' if len(below) == 1 else 'Each'} shortfall is established ({lie} below {bar:.2f})")
        elif not established:
            sentence = (f"{'The shortfall is not' if len(below) == 1 else 'None of these shortfalls is'} established "
                        f"({straddle} {bar:.2f})")
        else:
            sure = f"{established[0]}'s shortfall is" if len(established) == 1 else f"the shortfalls of {names(established)} are"
            unsure = f"{open_[0]}'s is" if len(open_) == 1 else f"those of {names(open_)} are"
            sentence = f"{sure} established ({lie} below {bar:.2f}); {unsure} not ({straddle} {bar:.2f})"
        text = f"{head} {sentence[0].upper()}{sentence[1:]}: not ready to deploy."
        worst = below[0]
        also = [a for a in cite(below) if not (a["metric"] == f"recall/{worst['name']}")]
        return [_finding(text, f"recall/{worst['name']}", worst["recall"], "per_class.csv", stage, also, True, note)]
    worst = min(classes, key=lambda c: c["recall"])
    unsure = sorted((c for c in classes if c["low"] < bar), key=lambda c: c["low"])
    text = (f"Every class reaches {bar:.2f} recall on the {split} split, the lowest {described(worst, True)}: the model "
            "meets this report's rule, which is not a clinical validation.")
    if unsure:
        their = "its interval reaches" if len(unsure) == 1 else "their intervals reach"
        text += (f" That {names([c['name'] for c in unsure])} reach{'es' if len(unsure) == 1 else ''} the bar is not established "
                 f"on a test set of this size: {their} below {bar:.2f}.")
    also = [a for a in cite([worst]) if a["metric"] != f"recall/{worst['name']}"]
    return [_finding(text, f"recall/{worst['name']}", worst["recall"], "per_class.csv", stage, also, True, note)]


def hardest_finding(f1: Mapping[str, float], stage: str) -> list[Finding]:
    """The class (or the tied classes) with the lowest F1."""
    if len(f1) < 2:
        return []
    lowest = min(f1.values())
    tied = [name for name, value in f1.items() if value - lowest <= TIE]
    first = tied[0]
    if len(tied) == len(f1):
        text = f"Every class has the same F1, {lowest:.2f}: none is hardest."
    elif len(tied) == 1:
        text = f"The hardest class is {first} (lowest F1, {lowest:.2f})."
    else:
        text = f"The hardest classes are {names(tied)} (lowest F1, {lowest:.2f}, a tie)."
    return [_finding(text, f"f1/{first}", f1[first], "results.json", stage)]


# -- calibration ---------------------------------------------------------------------------------------


def calibration_finding(metrics: Mapping[str, float], stage: str, problem: str | None = None) -> list[Finding]:
    """ECE before and after temperature scaling, unless the temperature is no calibration at all
    (``problem``: the evaluator's ``temperature_problem``, read from classification.json)."""
    if "ece" not in metrics:
        return []
    temperature = metrics.get("temperature")
    if temperature is not None and problem == "no validation error":
        text = (f"Temperature scaling found no error on the validation split to learn from, so no temperature is best (the "
                f"fit stopped at T = {temperature:.3g}): the figures after scaling are not a calibration of this model; ECE "
                f"before scaling {metrics['ece']:.2f}.")
        also = [{"metric": "ece", "value": metrics["ece"], "source": "results.json"}]
        return [_finding(text, "temperature", temperature, "results.json", stage, also)]
    if temperature is not None and math.isfinite(temperature) and not SANE_TEMPERATURE[0] <= temperature <= SANE_TEMPERATURE[1]:
        low, high = SANE_TEMPERATURE
        if temperature > high:
            why = ("the flattest probabilities fit the validation labels best, so the model's scores carry little information "
                   "on the validation split (they do no better there than a uniform guess)")
        else:
            why = ("the validation split gave (almost) no error to fit, so the fit ran towards 0 and stopped at an arbitrary "
                   "value")
        shown = f"{temperature:.0f}" if temperature >= 100 else f"{temperature:.3g}"
        text = (f"Temperature scaling fitted T = {shown} on the validation split, outside {low:g} to {high:g}: {why}. "
                f"The figures after scaling are not a calibration of this model; ECE before scaling {metrics['ece']:.2f}.")
        also = [{"metric": "ece", "value": metrics["ece"], "source": "results.json"}]
        return [_finding(text, "temperature", temperature, "results.json", stage, also)]
    if "ece/calibrated" in metrics:
        also = [{"metric": "ece/calibrated", "value": metrics["ece/calibrated"], "source": "results.json"}]
        detail = ""
        if temperature is not None:
            also.append({"metric": "temperature", "value": temperature, "source": "results.json"})
            detail = f" (temperature {temperature:.2f}, fitted on the validation split)"
        text = f"ECE {metrics['ece']:.2f} before and {metrics['ece/calibrated']:.2f} after temperature scaling{detail}."
        return [_finding(text, "ece", metrics["ece"], "results.json", stage, also)]
    text = (f"ECE {metrics['ece']:.2f}: the top-class confidence differs from the accuracy by about "
            f"{100 * metrics['ece']:.0f} percentage points on average.")
    return [_finding(text, "ece", metrics["ece"], "results.json", stage)]


# -- selective prediction ------------------------------------------------------------------------------


def selective_finding(metrics: Mapping[str, float], intervals: Mapping[str, Any], settings: Mapping[str, Any], level: str,
                      stage: str) -> list[Finding]:
    """What referring the least confident studies buys, and how well the confidence ranks the errors."""
    if "selective/aurc" not in metrics or "accuracy" not in metrics:
        return []
    accuracy = metrics["accuracy"]
    shares = sorted((s for s in settings["coverages"] if f"selective/accuracy_at_{round(100 * s)}" in metrics), reverse=True)
    if not shares:
        return []
    kept = {s: metrics[f"selective/accuracy_at_{round(100 * s)}"] for s in shares}
    deepest = shares[-1]
    also = [{"metric": "accuracy", "value": accuracy, "source": "results.json"}]
    ranking = settings.get("selective_ranking") or "the top-class probability"
    level = settings.get("units") or level
    if kept[deepest] > accuracy + TIE:
        others = "; ".join(f"the {1 - s:.0%} least confident: {kept[s]:.2f}" for s in shares if s != deepest)
        text = (f"Referring the {1 - deepest:.0%} least confident {level} to a reader raises accuracy on the rest from "
                f"{accuracy:.2f} to {kept[deepest]:.2f}" + (f" ({others})" if others else "") + ".")
        also += [{"metric": f"selective/accuracy_at_{round(100 * s)}", "value": kept[s], "source": "results.json"}
                 for s in shares if s != deepest]
    else:
        text = (f"Referring the {1 - deepest:.0%} least confident {level} does not raise accuracy ({accuracy:.2f} on all, "
                f"{kept[deepest]:.2f} on the rest): the confidence does not rank the errors last.")
    target = settings["target_accuracy"]
    coverage = metrics.get("selective/coverage_at_target")
    if coverage is not None and math.isfinite(coverage):
        also.append({"metric": "selective/coverage_at_target", "value": coverage, "source": "results.json"})
        text += (f" Accuracy {target:.2f} is reached answering {100 * coverage:.0f}% of the {level}." if coverage > 0 else
                 f" Accuracy {target:.2f} is not reached at any coverage.")
    area, excess = metrics["selective/aurc"], metrics.get("selective/e_aurc")
    also.append({"metric": "selective/aurc", "value": area, "source": "results.json"})
    interval = intervals.get("selective/aurc")
    detail = f" (95% interval {interval[0]:.3f} to {interval[1]:.3f})" if interval else ""
    text += f" Area under the risk-coverage curve {area:.3f}{detail}"
    if excess is not None and math.isfinite(excess):
        also.append({"metric": "selective/e_aurc", "value": excess, "source": "results.json"})
        text += f", {excess:.3f} above an oracle that ranks every error last"
    text += f" (ranked by {ranking})." if settings.get("selective_ranking") else "."
    return [_finding(text, f"selective/accuracy_at_{round(100 * deepest)}", kept[deepest], "results.json", stage, also)]


# -- subgroups -------------------------------------------------------------------------------------------

METRIC_TITLES = {"macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "auroc": "macro AUROC"}


def subgroup_findings(folder: Path, metrics: Mapping[str, float], stage: str) -> list[Finding]:
    """One finding per subgroup worse than the rest beyond chance, or one saying that none is."""
    if "subgroups/examined" not in metrics:
        return []
    settings = read_settings(folder, "subgroups.json")
    rows = read_rows(folder / "subgroups.csv")
    level = "images" if settings.get("level") == "image" else "studies"
    examined, tests = int(metrics["subgroups/examined"]), int(metrics.get("subgroups/tests", 0))
    correction = str(settings.get("correction", "holm")).capitalize()
    if not examined:
        smallest = settings.get("min_studies")
        size = f" at least {smallest} {level} (and as many outside it)" if smallest else " enough studies"
        text = (f"No subgroup of the header metadata has{size}: none was examined (the data may carry no header metadata).")
        return [_finding(text, "subgroups/examined", 0, "results.json", stage)]
    count = f"{examined} subgroup{'s' if examined != 1 else ''}"
    family = f"{correction} over {tests} tests, {count} by {len(METRIC_TITLES)} metrics"
    if not tests:
        text = f"{count} examined, without bootstrap resamples: no subgroup was tested against the rest."
        return [_finding(text, "subgroups/examined", examined, "results.json", stage)]
    found = []
    by_key: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        by_key.setdefault((row["field"], row["group"]), []).append(row)
    for (field, group), group_rows in by_key.items():
        worse = [row for row in group_rows if row.get("worse") == "yes"]
        if not worse:
            continue
        row = worse[0]  # the first metric in the evaluator's order (macro-F1 first)
        tail = f", worse beyond chance after {correction} over {tests} tests ({count} by {len(METRIC_TITLES)} metrics)"
        found.append(_subgroup_sentence(row, level, tail, stage,
                                        [r["metric"] for r in worse[1:]]))
    if found:
        return found
    # Nothing flagged: say so, with the largest gap on the first metric so the reader sees the size of it.
    first = next(iter(METRIC_TITLES))
    candidates = [row for row in rows if row["metric"] == first and math.isfinite(_number(row["difference"]))]
    if not candidates:
        return []
    gap = min(candidates, key=lambda row: _number(row["difference"]))
    sentence = _subgroup_sentence(gap, level, "", stage, [])
    text = (f"No subgroup is worse than the rest of the split beyond chance ({family}). The largest gap: "
            + sentence.text[0].lower() + sentence.text[1:])
    return [_finding(text, sentence.metric, sentence.value, sentence.source, stage, sentence.also)]


def _subgroup_sentence(row: Mapping[str, str], level: str, tail: str, stage: str, more: list[str]) -> Finding:
    key = subgroup_key(row["field"], row["group"])
    metric = row["metric"]
    title = METRIC_TITLES.get(metric, metric)
    inside, rest, difference = _number(row["subgroup"]), _number(row["rest"]), _number(row["difference"])
    low, high = _number(row["difference_low"]), _number(row["difference_high"])
    interval = f" (95% interval {low:+.2f} to {high:+.2f})" if math.isfinite(low) and math.isfinite(high) else ""
    extra = f"; also worse on {names([METRIC_TITLES.get(m, m) for m in more])}" if more else ""
    text = (f"{level.capitalize()} with {row['field']} {row['group']} (n={row['n']}): {title} {inside:.2f} against {rest:.2f} "
            f"for the rest, difference {difference:+.2f}{interval}{tail}{extra}.")
    name = f"subgroup/{key}/{metric}"
    also = [{"metric": name, "value": inside, "source": "subgroups.csv"},
            {"metric": f"{name}/rest", "value": rest, "source": "subgroups.csv"}]
    return _finding(text, f"{name}/difference", difference, "subgroups.csv", stage, also)


# -- localisation baselines and faithfulness -------------------------------------------------------------


def localization_baseline_findings(metrics: Mapping[str, float], intervals: Mapping[str, Any], split: str, stage: str) -> list[Finding]:
    """The pointing game against the training boxes' fixed point, and the deletion/insertion curves against a random order."""
    found = []
    if "pointing_game" in metrics and math.isfinite(metrics.get("pointing_game/prior", math.nan)):
        game, prior = metrics["pointing_game"], metrics["pointing_game/prior"]
        margin = metrics.get("pointing_game/vs_prior", game - prior)
        interval = intervals.get("pointing_game/vs_prior")
        detail = f" (95% interval {interval[0]:+.2f} to {interval[1]:+.2f})" if interval else ""
        if interval and interval[0] > 0:
            reading = "the saliency beats a map that ignores the image"
        elif interval and interval[1] < 0:
            reading = "the saliency does worse than a map that ignores the image"
        else:
            reading = "the saliency is not shown to beat a map that ignores the image"
        uniform = f", a uniform map {metrics['mask_area']:.2f}" if "mask_area" in metrics else ""
        also = [{"metric": "pointing_game", "value": game, "source": "results.json"},
                {"metric": "pointing_game/prior", "value": prior, "source": "results.json"}]
        if "mask_area" in metrics:
            also.append({"metric": "mask_area", "value": metrics["mask_area"], "source": "results.json"})
        text = (f"Pointing game {game:.2f} on the {split} split against {prior:.2f} for the one point inside the most "
                f"training boxes{uniform}: a margin of {margin:+.2f}{detail}, so {reading}.")
        found.append(_finding(text, "pointing_game/vs_prior", margin, "results.json", stage, also))
    if "deletion_auc" in metrics and math.isfinite(metrics["deletion_auc"]):
        deletion, insertion = metrics["deletion_auc"], metrics.get("insertion_auc", math.nan)
        deletion_random, insertion_random = metrics.get("deletion_auc/random", math.nan), metrics.get("insertion_auc/random", math.nan)
        faithful = deletion < deletion_random and insertion > insertion_random
        verdict = ("the maps point at what the classifier uses" if faithful else
                   "the maps are no more faithful to the classifier than a random order on at least one of the two")
        parts = []
        for name, value, chance, better in (("deletion", deletion, deletion_random, "lower"),
                                            ("insertion", insertion, insertion_random, "higher")):
            interval = intervals.get(f"{name}_auc/vs_random")
            detail = f", difference 95% interval {interval[0]:+.2f} to {interval[1]:+.2f}" if interval else ""
            parts.append(f"{name} AUC {value:.2f} against {chance:.2f} for a random order ({better} is better{detail})")
        also = [{"metric": "deletion_auc/random", "value": deletion_random, "source": "results.json"},
                {"metric": "insertion_auc", "value": insertion, "source": "results.json"},
                {"metric": "insertion_auc/random", "value": insertion_random, "source": "results.json"}]
        text = (f"Removing the most salient pixels first (RISE's deletion and insertion curves of the true class's "
                f"probability, {split} split): {parts[0]}; {parts[1]}: {verdict}.")
        found.append(_finding(text, "deletion_auc", deletion, "results.json", stage, also))
    return found


__all__ = ["calibration_finding", "classification_settings", "hardest_finding", "localization_baseline_findings",
           "read_rows", "read_settings", "rule", "selective_finding", "subgroup_findings", "verdict_finding"]
