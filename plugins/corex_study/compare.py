"""``corex compare``: the headline test metrics across arms, and paired differences to a baseline.

An *arm* is a recipe at one label fraction; its runs differ by their seeds: the data seed (phantom,
split, label subset: ``data.seed``, else ``seed``) and the training seed (``seed``: initialisation,
order, augmentation). Runs of one recipe name whose recipes differ otherwise (an ablation: another
head weight, say) are separate arms, labelled by the keys that differ
(``quickstart [stages.train.heads.segmentation.weight=0.5]``).

Every other arm is compared with the baseline arm at the same label fraction, paired by what the
runs share:

* by test study: runs with the same data seed are scored on the same test studies; a paired
  bootstrap resamples those studies (patients drawn together when the predictions have
  ``patient_id``) and scores both arms on every resample (:func:`corex_study.stats.paired_bootstrap`),
  for the metrics whose declaration says how to recompute them from predictions;
* by seed: runs with the same data seed *and* training seed are paired; a Student-t interval over
  the data seeds (each the mean difference over its trainings), or over the training seeds when
  there is one data draw.

Each kind of test is corrected with Holm over the comparisons made. A difference is called detected
only when both tests reject (an intersection-union test); otherwise the row says which test failed.
For each difference compare also gives the seeds a paired t test would need for 80% power at the
observed spread, and for each arm and difference the variance components: between data draws,
between trainings, and from the sampling of the test studies. Degenerate runs (no better than an
uninformative prediction on a headline metric, or a class never predicted) are named.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from corex import metrics as declared
from corex.errors import CorexError, did_you_mean
from corex.rundir import atomic_path, atomic_write_text, write_json
from corex_study import stats
from corex_study.runs import Predictions, Run, find_runs, read_predictions

ALPHA = 0.05
POWER = 0.8
Z95 = 1.959963984540054  # the normal 97.5% quantile: a 95% interval spans 2 * Z95 sd
# Keys that differ between the runs of one arm by design (seeds, label fraction, where things are).
SEED_KEYS = ("seed", "data.seed", "data.label_fraction", "data.cache_dir", "output", "description", "name", "source")
MISSING = object()


def default_metric(catalog: declared.Catalog, runs: list[Run] | None = None) -> str:
    """The first headline metric the plugins declare that the runs have (corex_eval's macro-F1 for
    a classification study)."""
    names = [n for n in catalog.headline() if runs is None or any(n in run.metrics for run in runs)]
    if not names:
        raise CorexError("--metric: no headline metric that the plugins declare is among the runs' test metrics; name the metric to compare")
    return names[0]


def compare_runs(paths: list[Path], *, baseline: str | None = None, metric: str | None = None,
                 resamples: int = 2000, seed: int = 0, catalog: declared.Catalog | None = None) -> dict[str, Any]:
    """The comparison of every run found under ``paths`` as plain data (see :func:`write_comparison`).

    The table's columns are the metrics the plugins declare as headline (:mod:`corex.metrics`);
    a metric is compared by test study when its declaration says how to recompute it from predictions.
    ``baseline`` is an arm's label, its recipe name, or its name in a study directory (the recipe file
    name); by default the first label in alphabetical order.
    """
    catalog = catalog or declared.catalog()
    runs = find_runs(paths)
    metric = metric or default_metric(catalog, runs)
    if not any(metric in run.metrics for run in runs):
        available = sorted({k for run in runs for k in run.metrics})
        raise CorexError(f"--metric: no run has the test metric '{metric}'{did_you_mean(metric, available)}; available: {', '.join(available)}")
    label_arms(runs)
    arms = group_arms(runs)
    baseline = resolve_baseline(baseline, runs)
    columns = [metric] + [m for m in catalog.headline() if m != metric and any(m in run.metrics for run in runs)]
    declaration = catalog.get(metric)
    cache = PredictionCache()
    summaries = [summarise_arm(label, fraction, arm_runs, columns, metric, declaration, catalog, cache, resamples, seed)
                 for (label, fraction), arm_runs in arms.items()]
    differences = [paired_difference(arm_runs, arms[(baseline, fraction)], metric, resamples, seed, declaration, cache)
                   for (label, fraction), arm_runs in arms.items()
                   if label != baseline and (baseline, fraction) in arms]
    for test in ("by_seed", "by_study"):
        adjusted = stats.holm([d[test]["p"] if d[test] else math.nan for d in differences])
        m = sum(not math.isnan(p) for p in adjusted)
        for difference, p in zip(differences, adjusted):
            if difference[test]:
                difference[test].update({"p_holm": p, "comparisons": m})
    tested = sum(1 for d in differences if d["by_seed"] and math.isfinite(d["by_seed"]["p"]))
    degenerate = {(a["label"], a["label_fraction"]): a["degenerate"] for a in summaries}
    for difference in differences:
        difference["power"] = power(difference, ALPHA / max(1, tested), tested)
        difference["degenerate"] = {
            "arm": degenerate.get((difference["arm"], difference["label_fraction"]), []),
            "baseline": degenerate.get((baseline, difference["label_fraction"]), []),
        }
        difference["conclusion"], difference["detected"] = conclusion(difference)
    return {
        "metric": metric,
        "title": catalog.title(metric),
        "baseline": baseline,
        "columns": columns,
        "arms": summaries,
        "differences": differences,
        "resamples": resamples,
        "alpha": ALPHA,
        "higher_is_better": catalog.higher_is_better(metric),
    }


# -- arms ---------------------------------------------------------------------------------------------


def label_arms(runs: list[Run]) -> None:
    """Label each run's arm: its recipe name, and, when runs of that name with the same seeds and
    label fraction differ in other keys of their recipes (an ablation), those keys and their values."""
    by_name: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_name[run.recipe].append(run)
    for name, group in by_name.items():
        twins: dict[tuple[float, int, int], list[Run]] = defaultdict(list)
        for run in group:
            twins[(run.label_fraction, run.data_seed, run.seed)].append(run)
        keys: set[str] = set()
        for same in twins.values():
            if len(same) > 1:
                keys |= differing_keys([comparable(run.config) for run in same])
        if not keys:
            continue
        labels: dict[str, str] = {}
        for run in group:
            config = comparable(run.config)
            label = f"{name} [{describe(config, sorted(keys))}]"
            signature = json.dumps([lookup(config, k) if lookup(config, k) is not MISSING else "\0" for k in sorted(keys)],
                                   sort_keys=True, default=str)
            while label in labels and labels[label] != signature:  # the values were shortened alike
                label = f"{label}'"
            labels[label] = signature
            run.label = label


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's recipe without the keys that differ between the runs of one arm by design."""
    config = json.loads(json.dumps(config, default=str))
    for key in SEED_KEYS:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return config


def differing_keys(configs: list[Any], path: str = "") -> set[str]:
    """Dotted paths where ``configs`` differ, as high up as the difference starts (a key that some
    lack is named itself, not through each of its sub-keys)."""
    if all(isinstance(c, dict) for c in configs):
        found: set[str] = set()
        for key in dict.fromkeys(k for c in configs for k in c):
            values = [c.get(key, MISSING) for c in configs]
            where = f"{path}.{key}" if path else str(key)
            if any(v is MISSING for v in values):
                if not all(v is MISSING for v in values):
                    found.add(where)
            else:
                found |= differing_keys(values, where)
        return found
    first = json.dumps(configs[0], sort_keys=True)
    return {path} if any(json.dumps(c, sort_keys=True) != first for c in configs[1:]) else set()


def lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return MISSING
        config = config[part]
    return config


def describe(config: dict[str, Any], keys: list[str], shown: int = 3) -> str:
    def short(value: Any) -> str:
        if value is MISSING:
            return "absent"
        text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{key}={short(lookup(config, key))}" for key in keys[:shown]]
    if len(keys) > shown:
        parts.append(f"+{len(keys) - shown} more keys")
    return ", ".join(parts)


def group_arms(runs: list[Run]) -> dict[tuple[str, float], list[Run]]:
    arms: dict[tuple[str, float], list[Run]] = defaultdict(list)
    for run in runs:
        twin = next((other for other in arms[(run.label, run.label_fraction)]
                     if (other.data_seed, other.seed) == (run.data_seed, run.seed)), None)
        if twin is not None:
            raise CorexError(f"two runs of {run.arm} with {run.seeds} and the same recipe: '{twin.path}' and '{run.path}'; "
                             "compare one of them")
        arms[(run.label, run.label_fraction)].append(run)
    return dict(sorted(arms.items(), key=lambda item: (-item[0][1], item[0][0])))


def resolve_baseline(name: str | None, runs: list[Run]) -> str:
    """The label of the baseline arm: ``name`` is a label, a recipe name or a study's arm (recipe
    file) name; ``None``: the first label in alphabetical order."""
    labels = sorted({run.label for run in runs})
    if name is None:
        return labels[0]
    if name in labels:
        return name
    aliases: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        aliases[run.recipe].add(run.label)
        if run.study_arm:
            aliases[run.study_arm].add(run.label)
    matched = aliases.get(name, set())
    if len(matched) == 1:
        return next(iter(matched))
    if matched:
        raise CorexError(f"--baseline: '{name}' names {len(matched)} arms ({'; '.join(sorted(matched))}); give one of these labels")
    known = sorted(set(labels) | set(aliases))
    raise CorexError(f"--baseline: no arm named '{name}'{did_you_mean(name, known)}; the arms are {'; '.join(labels)}")


class PredictionCache:
    """Each run's study-level predictions, read once."""

    def __init__(self) -> None:
        self._read: dict[tuple[str, str], Predictions | None] = {}

    def get(self, run: Run, name: str) -> Predictions | None:
        key = (str(run.path), name)
        if key not in self._read:
            self._read[key] = read_predictions(run, name)
        return self._read[key]


def finite_metric(run: Run, metric: str) -> bool:
    value = run.metrics.get(metric)
    return isinstance(value, (int, float)) and math.isfinite(value)


def summarise_arm(label: str, fraction: float, runs: list[Run], columns: list[str], metric: str, declaration: declared.Metric | None,
                  catalog: declared.Catalog, cache: PredictionCache, resamples: int, seed: int) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: (r.data_seed, r.seed))
    values = {m: [float(run.metrics.get(m, math.nan)) for run in runs] for m in columns}
    summary = {m: stats.mean_sd([v for v in values[m] if not math.isnan(v)]) for m in columns}
    return {
        "arm": runs[0].arm, "label": label, "recipe": runs[0].recipe, "label_fraction": fraction,
        "aliases": sorted({run.recipe for run in runs} | {run.study_arm for run in runs if run.study_arm}),
        "seeds": [run.seed for run in runs], "data_seeds": [run.data_seed for run in runs], "runs": [str(run.path) for run in runs],
        "values": values,
        "intervals": {m: [run.intervals.get(m) for run in runs] for m in columns},
        "mean": {m: s[0] for m, s in summary.items()}, "sd": {m: s[1] for m, s in summary.items()},
        "time_s": [run.time_s for run in runs],
        "variance": arm_variance(runs, metric, declaration, cache, resamples, seed),
        "degenerate": [entry for entry in (degenerate_run(run, catalog, cache) for run in runs) if entry],
    }


def arm_variance(runs: list[Run], metric: str, declaration: declared.Metric | None, cache: PredictionCache,
                 resamples: int, seed: int) -> dict[str, Any]:
    """Variance components of one arm's metric (:func:`corex_study.stats.variance_components`); the
    test-sampling part from a bootstrap of each data draw's test studies when the metric can be
    recomputed from predictions, else from the runs' own 95% bootstrap intervals."""
    runs = [run for run in runs if finite_metric(run, metric)]
    test, how = math.nan, None
    blocks = by_data_seed(runs)
    if recomputable(declaration) and runs:
        aligned_blocks = []
        for block in blocks.values():
            read = [cache.get(run, declaration.predictions) for run in block]
            if any(p is None for p in read) or any(set(p.ids) != set(read[0].ids) for p in read):
                aligned_blocks = []
                break
            order = [reorder(read[0], p) for p in read]
            aligned_blocks.append(([p.probabilities[o] for p, o in zip(read, order)], read[0].labels, read[0].groups))
        if aligned_blocks:
            test = stats.bootstrap_variance(aligned_blocks, declaration.recompute, resamples=resamples, seed=seed)
            how = "bootstrap of the test studies"
    if not math.isfinite(test):
        widths = [run.intervals[metric] for run in runs if run.intervals.get(metric)]
        if widths:
            test = float(np.mean([((high - low) / (2 * Z95)) ** 2 for low, high in widths]))
            how = "the runs' 95% bootstrap intervals (normal approximation)"
    components = stats.variance_components([run.metrics[metric] for run in runs], [run.data_seed for run in runs], test)
    return components | {"test_from": how}


def recomputable(declaration: declared.Metric | None) -> bool:
    return declaration is not None and declaration.recompute is not None and declaration.predictions is not None


def by_data_seed(runs: list[Run]) -> dict[int, list[Run]]:
    blocks: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        blocks[run.data_seed].append(run)
    return dict(sorted(blocks.items()))


def reorder(reference: Predictions, other: Predictions) -> np.ndarray:
    position = {identifier: i for i, identifier in enumerate(other.ids)}
    return np.array([position[i] for i in reference.ids])


# -- degenerate runs ------------------------------------------------------------------------------------


def degenerate_run(run: Run, catalog: declared.Catalog, cache: PredictionCache) -> dict[str, Any] | None:
    """What makes a run degenerate, from its study-level predictions: a class it never predicts, and
    every headline metric (higher is better, recomputable from predictions) on which it does no better
    than an uninformative prediction: equal probabilities for every class, or always the same class
    (balanced accuracy 1/K, AUROC 0.5 ...). ``None`` when nothing is."""
    names: dict[str, list[str]] = defaultdict(list)
    for name in catalog.headline():
        metric = catalog.get(name)
        if recomputable(metric) and metric.higher_is_better is True:
            names[metric.predictions].append(name)
    issues: list[dict[str, Any]] = []
    for file, metrics in names.items():
        predictions = cache.get(run, file)
        if predictions is None or not len(predictions.labels):
            continue
        probabilities, labels = predictions.probabilities, predictions.labels
        k = probabilities.shape[1]
        classes = predictions.classes or [str(c) for c in range(k)]
        predicted = probabilities.argmax(1)
        never = [classes[c] for c in range(k) if not np.any(predicted == c)]
        if never:
            issues.append({"kind": "class never predicted", "classes": never, "source": file,
                           "text": f"never predicts {' or '.join(never)}"})
        ones = np.ones((1, len(labels)))
        uninformative = [("equal probabilities for every class", np.full_like(probabilities, 1.0 / k))]
        uninformative += [(f"always predicting {classes[c]}", np.tile(np.eye(k)[c], (len(labels), 1))) for c in range(k)]
        for name in metrics:
            recompute = catalog.get(name).recompute
            value = float(recompute(probabilities, labels, ones)[0])
            chance = [(float(recompute(p, labels, ones)[0]), how) for how, p in uninformative]
            chance = [(v, how) for v, how in chance if math.isfinite(v)]
            if not chance or not math.isfinite(value):
                continue
            best, how = max(chance, key=lambda item: item[0])
            if value <= best + 1e-9:
                issues.append({"kind": "no better than chance", "metric": name, "value": value, "chance": best, "source": file,
                               "text": f"{catalog.title(name)} {value:.3f}, no better than an uninformative prediction "
                                       f"({best:.3f}, {how})"})
    if not issues:
        return None
    return {"run": str(run.path), "seed": run.seed, "data_seed": run.data_seed, "seeds": run.seeds, "issues": issues}


def degenerate_text(entries: list[dict[str, Any]]) -> str:
    """``seed 2: never predicts atypical; balanced accuracy 0.250, ...``, one clause per degenerate run."""
    parts = [f"{entry['seeds']}: {'; '.join(issue['text'] for issue in entry['issues'])}" for entry in entries]
    return " | ".join(parts)


# -- paired differences --------------------------------------------------------------------------------


def paired_difference(arm: list[Run], baseline: list[Run], metric: str, resamples: int, seed: int,
                      declaration: declared.Metric | None = None, cache: PredictionCache | None = None) -> dict[str, Any]:
    """``arm - baseline`` on ``metric``, paired by what the runs share (see the module's docstring)."""
    cache = cache or PredictionCache()
    left_out = [f"{run.label} {run.seeds} ({'no' if metric not in run.metrics else 'a non-finite'} {metric})"
                for run in [*arm, *baseline] if not finite_metric(run, metric)]
    mine = {(r.data_seed, r.seed): r for r in arm if finite_metric(r, metric)}
    theirs = {(r.data_seed, r.seed): r for r in baseline if finite_metric(r, metric)}
    keys = sorted(mine.keys() & theirs.keys())
    if keys:  # trainings paired: the same data seed and training seed in both arms
        blocks = {d: ([mine[k] for k in keys if k[0] == d], [theirs[k] for k in keys if k[0] == d]) for d in sorted({k[0] for k in keys})}
        pairing = "seed"
    else:  # only the data draws in common: each draw's mean over its trainings
        shared = sorted({d for d, _ in mine} & {d for d, _ in theirs})
        blocks = {d: ([r for (e, _), r in mine.items() if e == d], [r for (e, _), r in theirs.items() if e == d]) for d in shared}
        pairing = "data seed"
    mean = lambda rs: float(np.mean([r.metrics[metric] for r in rs]))  # noqa: E731
    result: dict[str, Any] = {
        "arm": arm[0].label, "recipe": arm[0].recipe, "label_fraction": arm[0].label_fraction,
        "baseline": baseline[0].label, "pairing": pairing,
        "pairs": [list(k) for k in keys], "seeds": [t for _, t in keys], "data_seeds": list(blocks),
        "differences": [mine[k].metrics[metric] - theirs[k].metrics[metric] for k in keys],
        "left_out": left_out, "units": None, "unit_values": [],
        "by_seed": None, "by_study": None, "by_seed_missing": None, "by_study_missing": None, "variance": None,
    }
    if not blocks:
        result["by_seed_missing"] = result["by_study_missing"] = "no data seed in common with the baseline"
        return result
    if len(blocks) >= 2:
        result["units"] = "data seeds"
        result["unit_values"] = [mean(a) - mean(b) for a, b in blocks.values()]
    elif pairing == "seed" and len(keys) >= 2:
        result["units"] = "training seeds (one data draw)"
        result["unit_values"] = list(result["differences"])
    if len(result["unit_values"]) >= 2:
        result["by_seed"] = stats.paired_t(result["unit_values"]) | {"units": result["units"]}
    else:
        result["by_seed_missing"] = ("one data draw and no two trainings paired by seed" if pairing == "seed"
                                     else "one data draw in common, trainings not paired by seed")
    if not recomputable(declaration):
        result["by_study_missing"] = f"'{metric}' cannot be recomputed from predictions (its declaration gives no recompute)"
    else:
        matched = []
        for a_runs, b_runs in blocks.values():
            read = [(run, cache.get(run, declaration.predictions)) for run in [*a_runs, *b_runs]]
            missing = next((run for run, p in read if p is None), None)
            if missing is not None:
                result["by_study_missing"] = f"no {declaration.predictions} in {missing.predictions_path(declaration.predictions).parent}"
                break
            (first, reference), rest = read[0], read[1:]
            probabilities = [reference.probabilities] + [aligned(first, reference, run, p) for run, p in rest]
            matched.append((probabilities[:len(a_runs)], probabilities[len(a_runs):], reference.labels, reference.groups))
        else:
            result["by_study"] = stats.paired_bootstrap(matched, declaration.recompute, resamples=resamples, seed=seed)
    if pairing == "seed":
        test = result["by_study"]["test_variance"] if result["by_study"] else math.nan
        result["variance"] = stats.variance_components(result["differences"], [d for d, _ in keys], test) | {
            "test_from": "the paired bootstrap of the test studies" if result["by_study"] else None}
    return result


def aligned(a: Run, mine: Predictions, b: Run, theirs: Predictions) -> np.ndarray:
    """``theirs`` probabilities on ``mine``'s studies in ``mine``'s order; refuses other test sets."""
    if set(mine.ids) != set(theirs.ids) or len(mine.ids) != len(theirs.ids):
        only_a, only_b = len(set(mine.ids) - set(theirs.ids)), len(set(theirs.ids) - set(mine.ids))
        raise CorexError(
            f"cannot pair '{a.path}' with '{b.path}': their test studies differ ({only_a} only in the first, "
            f"{only_b} only in the second); runs with the same data seed must share the test split (same data and split settings)"
        )
    order = reorder(mine, theirs)
    if not np.array_equal(mine.labels, theirs.labels[order]):
        raise CorexError(f"cannot pair '{a.path}' with '{b.path}': the same test studies carry different labels")
    return theirs.probabilities[order]


def power(difference: dict[str, Any], alpha: float, comparisons: int) -> dict[str, Any] | None:
    """The paired t test's power at the observed mean and spread of the by-seed differences, and the
    seeds (units) it needs for :data:`POWER`, at Holm's first-step level ``alpha`` (0.05 / comparisons)."""
    test = difference["by_seed"]
    if not test or not math.isfinite(test.get("sd", math.nan)):
        return None
    n = int(test["n"])
    needed = stats.seeds_for_power(test["mean"], test["sd"], alpha, POWER)
    return {"alpha": alpha, "comparisons": comparisons, "n": n, "sd": test["sd"], "effect": test["mean"],
            "power_now": stats.t_power(test["mean"], test["sd"], n, alpha), "needed": needed, "target": POWER,
            "units": difference["units"]}


def conclusion(difference: dict[str, Any]) -> tuple[str, bool]:
    """The row's conclusion and whether the difference is detected: both tests must reject (an
    intersection-union test); otherwise the conclusion names each test that did not."""
    labels = {"by_seed": "by-seed", "by_study": "by-test-study"}
    tests = [(name, difference[name]) for name in labels if difference[name] and math.isfinite(difference[name]["p"])]
    degenerate = degenerate_clause(difference)
    if not tests:
        reasons = "; ".join(f"{labels[n]}: {difference[f'{n}_missing'] or 'its p-value is not a number'}" for n in labels)
        return f"not tested ({reasons}){degenerate}", False
    failed, passed = [], []
    for name, test in tests:
        m = test["comparisons"]
        if not (math.isfinite(test["low"]) and math.isfinite(test["high"])) or test["low"] <= 0.0 <= test["high"]:
            failed.append(f"the {labels[name]} interval contains 0")
        elif test["p_holm"] >= ALPHA:
            failed.append(f"the {labels[name]} Holm-adjusted p is {_p(test['p_holm'])} over {m} comparison{'s' if m != 1 else ''}")
        else:
            passed.append(f"the {labels[name]} test rejects (Holm p {_p(test['p_holm'])})")
    missing = [f"no {labels[n]} test ({difference[f'{n}_missing']})" for n in labels if not difference[n]]
    if failed:
        text = "not established: " + " and ".join(failed)
        if passed:
            text += f" ({'; '.join(passed)})"
        return text + degenerate, False
    mean = tests[0][1]["mean"]
    direction = "higher" if mean > 0 else "lower"
    both = "both tests reject" if len(tests) == 2 else f"the {labels[tests[0][0]]} test rejects"
    caveat = f"; {missing[0]}" if missing else ""
    return (f"{direction} than the baseline ({both} at {ALPHA} after Holm; detected only when every test rejects, "
            f"an intersection-union test{caveat}){degenerate}"), True


def degenerate_clause(difference: dict[str, Any]) -> str:
    found = difference.get("degenerate") or {}
    parts = []
    for who in ("arm", "baseline"):
        entries = found.get(who) or []
        if entries:
            parts.append(f"the {who} is degenerate in {len(entries)} run{'s' if len(entries) != 1 else ''} "
                         f"({', '.join(e['seeds'] for e in entries)})")
    return "; " + "; ".join(parts) if parts else ""


# -- writing ------------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _p(value: float) -> str:
    return "–" if math.isnan(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")


def _interval(test: dict[str, float] | None) -> str:
    if not test:
        return "–"
    return f"{_number(test['mean'], sign=True)} [{_number(test['low'], sign=True)}, {_number(test['high'], sign=True)}]"


def _test_p(test: dict[str, float] | None) -> str:
    if not test:
        return "–"
    m = test["comparisons"]
    return f"{_p(test['p'])} (Holm {_p(test['p_holm'])}, {m} comparison{'s' if m != 1 else ''})"


def _sd(variance: float | None) -> str:
    return "–" if variance is None or not math.isfinite(variance) else f"{math.sqrt(variance):.3f}"


def power_text(found: dict[str, Any] | None) -> str:
    if not found:
        return "–"
    now = f"power {found['power_now']:.2f} at {found['n']}"
    if found["needed"] is None:
        return f"– (mean {found['effect']:+.3f}: no power to gain); {now}"
    return f"{found['needed']} ({now})"


def paired_text(d: dict[str, Any]) -> str:
    if d["units"] == "data seeds":
        return f"{len(d['data_seeds'])} data seeds" + (f", {len(d['pairs'])} pairs" if len(d["pairs"]) != len(d["data_seeds"]) else "")
    if d["pairs"]:
        return f"{len(d['pairs'])} (1 data seed)" if len(d["pairs"]) > 1 else "1"
    return f"{len(d['data_seeds'])} data seed{'s' if len(d['data_seeds']) != 1 else ''}, trainings unpaired"


def arms_table(comparison: dict[str, Any]) -> str:
    metric, columns = comparison["metric"], comparison["columns"]
    header = ["arm", "label fraction", "seeds", f"test {metric} mean ± sd", "per seed [95% bootstrap CI]", *columns[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in comparison["arms"]:
        per_seed = []
        for value, interval in zip(arm["values"][metric], arm["intervals"][metric]):
            ci = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
            per_seed.append(f"{_number(value)}{ci}")
        mean_sd = f"{_number(arm['mean'][metric])} ± {_number(arm['sd'][metric])}"
        others = [_number(arm["mean"][m]) for m in columns[1:]]
        row = [arm["label"], f"{arm['label_fraction']:g}", str(len(arm["seeds"])), mean_sd, ", ".join(per_seed), *others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def differences_table(comparison: dict[str, Any]) -> str:
    header = ["arm", "label fraction", "paired", "by seed: mean [95% t CI]", "p", "by test study: [95% bootstrap CI]", "p",
              f"seeds for {POWER:.0%} power", "conclusion"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d in comparison["differences"]:
        study = _interval(d["by_study"]) if d["by_study"] else f"– ({d['by_study_missing']})"
        row = [d["arm"], f"{d['label_fraction']:g}", paired_text(d), _interval(d["by_seed"]), _test_p(d["by_seed"]),
               study, _test_p(d["by_study"]), power_text(d.get("power")), d["conclusion"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def variance_table(comparison: dict[str, Any]) -> str:
    header = ["arm", "label fraction", "runs", "data draws", "sd between data draws", "sd between trainings",
              "sd from test sampling", "total sd", "test sampling from"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(a["label"], a["label_fraction"], a["variance"]) for a in comparison["arms"]]
    rows += [(f"{d['arm']} − {d['baseline']}", d["label_fraction"], d["variance"]) for d in comparison["differences"] if d.get("variance")]
    for label, fraction, v in rows:
        notes = (["with trainings"] if v["data"] is None and v["data_and_training"] is not None else []) + (
            ["estimate below 0, set to 0"] if v["truncated"] else [])
        value = v["data"] if v["data"] is not None else v["data_and_training"]
        data = _sd(value) + (f" ({'; '.join(notes)})" if notes and value is not None else "")
        row = [label, f"{fraction:g}", f"{v['runs']:.0f}", f"{v['data_draws']:.0f}", data, _sd(v["training"]), _sd(v["test"]),
               _sd(v["total"]), v.get("test_from") or "–"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def degenerate_lines(comparison: dict[str, Any]) -> list[str]:
    return [f"{arm['label']} at label fraction {arm['label_fraction']:g} is degenerate in {len(arm['degenerate'])} of "
            f"{len(arm['seeds'])} runs: {degenerate_text(arm['degenerate'])}"
            for arm in comparison["arms"] if arm["degenerate"]]


def markdown(comparison: dict[str, Any]) -> str:
    metric = comparison["metric"]
    text = [
        f"# Comparison of test {metric}",
        "",
        ("Mean ± sd over runs; per run, its own 95% bootstrap interval over test studies. "
         "Other columns: means over runs."),
        "",
        arms_table(comparison),
    ]
    degenerate = degenerate_lines(comparison)
    if degenerate:
        text += ["", "## Degenerate runs", "",
                 "A run is degenerate when it never predicts a class, or does no better than an uninformative prediction "
                 "(equal probabilities, or always the same class) on a headline metric.", ""]
        text += [f"- {line}" for line in degenerate]
    if comparison["differences"]:
        first = comparison["differences"][0].get("power") or {}
        alpha = first.get("alpha", ALPHA)
        text += [
            "",
            f"## Paired differences in test {metric} against {comparison['baseline']} (same label fraction)",
            "",
            ("By seed: runs with the same data seed and training seed are paired; a Student-t 95% interval over the data "
             "seeds (each the mean difference over its trainings), or over the training seeds when there is one data draw. "
             f"By test study: a paired bootstrap over the test studies each data seed shares ({comparison['resamples']} "
             "resamples, patients together when known), averaged over the data seeds. p-values are two-sided; Holm's "
             "adjustment is over the comparisons of each kind (their number is given). A difference counts as detected only "
             f"when both tests reject at {ALPHA} after Holm (an intersection-union test); otherwise the conclusion names "
             f"the test that did not. Seeds for {POWER:.0%} power: the paired t test's sample size at the observed mean and "
             f"sd of the by-seed differences, at Holm's first-step level {alpha:.4g}."),
            "",
            differences_table(comparison),
        ]
    text += [
        "",
        "## Where the spread comes from",
        "",
        ("Variance components of each arm's metric and of each paired difference, as standard deviations: between data "
         "draws (phantom, split, test studies), between trainings on one data draw, and from the sampling of the test "
         "studies (method of moments; docs/study.md). 'with trainings': one training per data draw, so the two cannot "
         "be told apart."),
        "",
        variance_table(comparison),
    ]
    return "\n".join(text) + "\n"


def csv_text(comparison: dict[str, Any]) -> str:
    metric, columns = comparison["metric"], comparison["columns"]
    differences = {(d["arm"], d["label_fraction"]): d for d in comparison["differences"]}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    test_columns = [f"{kind}_{field}" for kind in ("by_seed", "by_study") for field in ("mean", "low", "high", "p", "p_holm", "comparisons")]
    writer.writerow(["arm", "recipe", "label_fraction", "seeds", "data_seeds", *(f"{m}_{s}" for m in columns for s in ("mean", "sd")),
                     f"{metric}_per_seed", "baseline", *test_columns, "power_now", "seeds_for_power", "degenerate_runs", "conclusion"])
    for arm in comparison["arms"]:
        d = differences.get((arm["label"], arm["label_fraction"]))
        tests = [(d or {}).get(kind) or {} for kind in ("by_seed", "by_study")]
        found = (d or {}).get("power") or {}
        writer.writerow([
            arm["label"], arm["recipe"], f"{arm['label_fraction']:g}", " ".join(map(str, arm["seeds"])), " ".join(map(str, arm["data_seeds"])),
            *(f"{arm[s][m]:.6g}" for m in columns for s in ("mean", "sd")),
            " ".join(f"{v:.6g}" for v in arm["values"][metric]),
            d["baseline"] if d else "",
            *(f"{t[f]:.6g}" if f in t else "" for t in tests for f in ("mean", "low", "high", "p", "p_holm", "comparisons")),
            f"{found['power_now']:.6g}" if found else "", (found.get("needed") or "") if found else "",
            len(arm["degenerate"]),
            d["conclusion"] if d else ("baseline" if arm["label"] == comparison["baseline"] else ""),
        ])
    return buffer.getvalue()


def plot(comparison: dict[str, Any], path: Path) -> None:
    """Per label fraction: each run's value (dots), the mean and its 95% t interval over runs."""
    from matplotlib.figure import Figure

    metric = comparison["metric"]
    fractions = sorted({arm["label_fraction"] for arm in comparison["arms"]}, reverse=True)
    labels = list(dict.fromkeys(arm["label"] for arm in comparison["arms"]))
    seeds = sorted({(d, s) for arm in comparison["arms"] for d, s in zip(arm["data_seeds"], arm["seeds"])})
    colours = {key: f"C{i % 10}" for i, key in enumerate(seeds)}
    name = {(d, s): f"seed {s}" if d == s else f"data {d}, seed {s}" for d, s in seeds}
    figure = Figure(figsize=(max(6.0, 1.2 * len(labels) * len(fractions) + 2), 5.2), layout="constrained")
    axes_row = figure.subplots(1, len(fractions), squeeze=False, sharey=True)[0]
    for axes, fraction in zip(axes_row, fractions):
        for x, label in enumerate(labels):
            arm = next((a for a in comparison["arms"] if a["label"] == label and a["label_fraction"] == fraction), None)
            if arm is None:
                continue
            values = np.array(arm["values"][metric], dtype=float)
            offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
            for offset, value, key in zip(offsets, values, zip(arm["data_seeds"], arm["seeds"])):
                axes.scatter(x + offset, value, color=colours[key], s=22, zorder=3, label=name[key])
            finite = values[~np.isnan(values)]
            if not finite.size:
                continue
            mean = float(finite.mean())
            interval = stats.paired_t(finite) if finite.size > 1 else None
            error = None
            if interval and not math.isnan(interval["low"]):
                error = [[mean - interval["low"]], [interval["high"] - mean]]
            axes.errorbar(x + 0.3, mean, yerr=error, fmt="D", color="black", capsize=4, zorder=4,
                          label="mean, 95% t interval over runs")
            if label == comparison["baseline"]:
                axes.axhline(mean, color="grey", linestyle="--", linewidth=1, label="baseline mean")
        axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        axes.set_title(f"label fraction {fraction:g}")
        axes.set_xlim(-0.6, len(labels) - 0.4)
        axes.grid(axis="y", alpha=0.3)
    values = [v for arm in comparison["arms"] for v in arm["values"][metric] if not math.isnan(v)]
    if values and 0.0 <= min(values) and max(values) <= 1.0:  # a score in [0, 1]: intervals past it mean nothing
        axes_row[0].set_ylim(max(0.0, min(values) - 0.1), min(1.0, max(values) + 0.1) + 0.01)
    axes_row[0].set_ylabel(f"test {metric}")
    handles, names = axes_row[0].get_legend_handles_labels()
    unique = dict(zip(names, handles))
    figure.legend(unique.values(), unique.keys(), loc="outside lower center", ncol=min(4, len(unique)), fontsize=8)
    figure.suptitle(f"Test {metric} per arm")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)


def write_comparison(comparison: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write compare.md, compare.csv, compare.png and compare.json into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"compare.{name}" for name in ("md", "csv", "png", "json")}
    atomic_write_text(files["md"], markdown(comparison))
    atomic_write_text(files["csv"], csv_text(comparison))
    write_json(files["json"], comparison)
    plot(comparison, files["png"])
    return files
