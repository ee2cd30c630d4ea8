"""``corex compare``: the headline test metrics across arms, and paired differences to a baseline.

An *arm* is a recipe name at one label fraction; its runs differ by seed. Every other arm is
compared with the baseline arm at the same label fraction, paired two ways:

* by seed: the same seed's two runs (same phantom, splits and initialisation); the mean
  difference over seeds with a Student-t 95% interval;
* by test study: a paired bootstrap over the test studies (patients drawn together when
  predictions.csv has ``patient_id``), both arms scored on the same resamples
  (:func:`corex_study.stats.paired_bootstrap`); possible for the metrics that can be recomputed
  from study-level predictions.

Each family of tests is corrected with Holm over the comparisons made; a difference is reported as
detected only when every available paired interval excludes 0 and its Holm-adjusted p < 0.05.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from corex import metrics as declared
from corex.errors import CorexError, did_you_mean
from corex.rundir import atomic_path, atomic_write_text, write_json
from corex_study import stats
from corex_study.runs import Run, find_runs, read_predictions

ALPHA = 0.05
NO_DIFFERENCE = "no detectable difference at this size"


def compare_runs(paths: list[Path], *, baseline: str | None = None, metric: str = "macro_f1",
                 resamples: int = 2000, seed: int = 0, catalog: declared.Catalog | None = None) -> dict[str, Any]:
    """The comparison of every run found under ``paths`` as plain data (see :func:`write_comparison`).

    The table's columns are the metrics the plugins declare as headline (:mod:`corex.metrics`);
    a metric is compared by test study when its declaration says how to recompute it from predictions.
    """
    catalog = catalog or declared.catalog()
    runs = find_runs(paths)
    if not any(metric in run.metrics for run in runs):
        available = sorted({k for run in runs for k in run.metrics})
        raise CorexError(f"--metric: no run has the test metric '{metric}'{did_you_mean(metric, available)}; available: {', '.join(available)}")
    recipes = list(dict.fromkeys(run.recipe for run in runs))
    baseline = baseline or recipes[0]
    if baseline not in recipes:
        raise CorexError(f"--baseline: no run of recipe '{baseline}'{did_you_mean(baseline, recipes)}; the runs are of {', '.join(recipes)}")
    arms = group_arms(runs)
    columns = [metric] + [m for m in catalog.headline() if m != metric and any(m in run.metrics for run in runs)]
    declaration = catalog.get(metric)
    differences = [paired_difference(arm_runs, arms[(baseline, fraction)], metric, resamples, seed, declaration)
                   for (recipe, fraction), arm_runs in arms.items()
                   if recipe != baseline and (baseline, fraction) in arms]
    for test in ("by_seed", "by_study"):
        adjusted = stats.holm([d[test]["p"] if d[test] else math.nan for d in differences])
        m = sum(not math.isnan(p) for p in adjusted)
        for difference, p in zip(differences, adjusted):
            if difference[test]:
                difference[test].update({"p_holm": p, "comparisons": m})
    for difference in differences:
        difference["conclusion"] = conclusion(difference)
    return {
        "metric": metric,
        "baseline": baseline,
        "columns": columns,
        "arms": [summarise_arm(recipe, fraction, arm_runs, columns) for (recipe, fraction), arm_runs in arms.items()],
        "differences": differences,
        "resamples": resamples,
        "higher_is_better": catalog.higher_is_better(metric),
    }


def group_arms(runs: list[Run]) -> dict[tuple[str, float], list[Run]]:
    arms: dict[tuple[str, float], list[Run]] = defaultdict(list)
    for run in runs:
        twin = next((other for other in arms[(run.recipe, run.label_fraction)] if other.seed == run.seed), None)
        if twin is not None:
            raise CorexError(f"two runs of {run.arm} with seed {run.seed}: '{twin.path}' and '{run.path}'; compare one of them")
        arms[(run.recipe, run.label_fraction)].append(run)
    return dict(sorted(arms.items(), key=lambda item: (-item[0][1], item[0][0])))


def summarise_arm(recipe: str, fraction: float, runs: list[Run], columns: list[str]) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r.seed)
    values = {m: [run.metrics.get(m, math.nan) for run in runs] for m in columns}
    summary = {m: stats.mean_sd([v for v in values[m] if not math.isnan(v)]) for m in columns}
    return {
        "arm": runs[0].arm, "recipe": recipe, "label_fraction": fraction,
        "seeds": [run.seed for run in runs], "runs": [str(run.path) for run in runs],
        "values": values,
        "intervals": {m: [run.intervals.get(m) for run in runs] for m in columns},
        "mean": {m: s[0] for m, s in summary.items()}, "sd": {m: s[1] for m, s in summary.items()},
        "time_s": [run.time_s for run in runs],
    }


def paired_difference(arm: list[Run], baseline: list[Run], metric: str, resamples: int, seed: int,
                      declaration: declared.Metric | None = None) -> dict[str, Any]:
    """``arm - baseline`` on ``metric``, paired by seed and by test study (when the metric's declaration
    says how to recompute it from study-level predictions, see :class:`corex.metrics.Metric`)."""
    by_seed = {run.seed: run for run in baseline}
    pairs = [(run, by_seed[run.seed]) for run in sorted(arm, key=lambda r: r.seed) if run.seed in by_seed]
    pairs = [(a, b) for a, b in pairs if metric in a.metrics and metric in b.metrics]
    result: dict[str, Any] = {
        "arm": arm[0].arm, "recipe": arm[0].recipe, "label_fraction": arm[0].label_fraction,
        "baseline": baseline[0].arm, "seeds": [a.seed for a, _ in pairs],
        "differences": [a.metrics[metric] - b.metrics[metric] for a, b in pairs],
        "by_seed": None, "by_study": None, "by_study_missing": None,
    }
    if not pairs:
        result["by_study_missing"] = "no seed in common with the baseline"
        return result
    if len(pairs) >= 2:
        result["by_seed"] = stats.paired_t(result["differences"])
    if declaration is None or declaration.recompute is None or declaration.predictions is None:
        result["by_study_missing"] = f"'{metric}' cannot be recomputed from predictions (its declaration gives no recompute)"
        return result
    matched = []
    for a, b in pairs:
        mine, theirs = read_predictions(a, declaration.predictions), read_predictions(b, declaration.predictions)
        if mine is None or theirs is None:
            missing = (a if mine is None else b).predictions_path(declaration.predictions)
            result["by_study_missing"] = f"no {declaration.predictions} in {missing.parent}"
            return result
        matched.append(aligned(a, mine, b, theirs))
    result["by_study"] = stats.paired_bootstrap(matched, declaration.recompute, resamples=resamples, seed=seed)
    return result


def aligned(a: Run, mine, b: Run, theirs) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Both runs' probabilities on the same studies in the same order; refuses other test sets."""
    if set(mine.ids) != set(theirs.ids) or len(mine.ids) != len(theirs.ids):
        only_a, only_b = len(set(mine.ids) - set(theirs.ids)), len(set(theirs.ids) - set(mine.ids))
        raise CorexError(
            f"cannot pair '{a.path}' with '{b.path}': their test studies differ ({only_a} only in the first, "
            f"{only_b} only in the second); paired comparisons need the same test split (same data, seed and split settings)"
        )
    position = {identifier: i for i, identifier in enumerate(theirs.ids)}
    order = np.array([position[i] for i in mine.ids])
    if not np.array_equal(mine.labels, theirs.labels[order]):
        raise CorexError(f"cannot pair '{a.path}' with '{b.path}': the same test studies carry different labels")
    return mine.probabilities, theirs.probabilities[order], mine.labels, mine.groups


def conclusion(difference: dict[str, Any]) -> str:
    tests = [difference[t] for t in ("by_seed", "by_study") if difference[t]]
    if not tests:
        return "not tested (fewer than two paired seeds and no predictions to resample)"
    if any(t["low"] <= 0.0 <= t["high"] for t in tests):
        return NO_DIFFERENCE
    if any(t["p_holm"] >= ALPHA for t in tests):
        return f"{NO_DIFFERENCE} after correcting for {max(t['comparisons'] for t in tests)} comparisons"
    direction = "higher" if tests[0]["mean"] > 0 else "lower"
    caveat = "" if len(difference["seeds"]) > 1 else "; one seed, so the variation between trainings is not measured"
    return f"{direction} than the baseline (every paired 95% interval excludes 0, Holm p < {ALPHA}{caveat})"


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
        row = [arm["recipe"], f"{arm['label_fraction']:g}", str(len(arm["seeds"])), mean_sd, ", ".join(per_seed), *others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def differences_table(comparison: dict[str, Any]) -> str:
    header = ["arm", "label fraction", "paired seeds", "by seed: mean [95% t CI]", "p", "by test study: [95% bootstrap CI]", "p", "conclusion"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d in comparison["differences"]:
        study = _interval(d["by_study"]) if d["by_study"] else f"– ({d['by_study_missing']})"
        row = [d["recipe"], f"{d['label_fraction']:g}", str(len(d["seeds"])), _interval(d["by_seed"]), _test_p(d["by_seed"]),
               study, _test_p(d["by_study"]), d["conclusion"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(comparison: dict[str, Any]) -> str:
    metric = comparison["metric"]
    text = [
        f"# Comparison of test {metric}",
        "",
        ("Mean ± sd over seeds; per seed, the run's own 95% bootstrap interval over test studies. "
         "Other columns: means over seeds."),
        "",
        arms_table(comparison),
    ]
    if comparison["differences"]:
        text += [
            "",
            f"## Paired differences in test {metric} against {comparison['baseline']} (same label fraction)",
            "",
            ("By seed: the same seed's runs, mean difference with a Student-t 95% interval. By test study: "
             f"a paired bootstrap over the same test studies ({comparison['resamples']} resamples, patients together "
             "when known), averaged over the paired seeds. p-values are two-sided; Holm's adjustment is over the "
             "comparisons of each kind (their number is given). A difference counts as detected only when every "
             f"paired interval excludes 0 and its Holm-adjusted p < {ALPHA}; otherwise: {NO_DIFFERENCE}."),
            "",
            differences_table(comparison),
        ]
    return "\n".join(text) + "\n"


def csv_text(comparison: dict[str, Any]) -> str:
    metric, columns = comparison["metric"], comparison["columns"]
    differences = {(d["recipe"], d["label_fraction"]): d for d in comparison["differences"]}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    test_columns = [f"{kind}_{field}" for kind in ("by_seed", "by_study") for field in ("mean", "low", "high", "p", "p_holm", "comparisons")]
    writer.writerow(["recipe", "label_fraction", "seeds", *(f"{m}_{s}" for m in columns for s in ("mean", "sd")),
                     f"{metric}_per_seed", "baseline", *test_columns, "conclusion"])
    for arm in comparison["arms"]:
        d = differences.get((arm["recipe"], arm["label_fraction"]))
        tests = [(d or {}).get(kind) or {} for kind in ("by_seed", "by_study")]
        writer.writerow([
            arm["recipe"], f"{arm['label_fraction']:g}", " ".join(map(str, arm["seeds"])),
            *(f"{arm[s][m]:.6g}" for m in columns for s in ("mean", "sd")),
            " ".join(f"{v:.6g}" for v in arm["values"][metric]),
            d["baseline"] if d else "",
            *(f"{t[f]:.6g}" if f in t else "" for t in tests for f in ("mean", "low", "high", "p", "p_holm", "comparisons")),
            d["conclusion"] if d else ("baseline" if arm["recipe"] == comparison["baseline"] else ""),
        ])
    return buffer.getvalue()


def plot(comparison: dict[str, Any], path: Path) -> None:
    """Per label fraction: each seed's value (dots), the mean and its 95% t interval over seeds."""
    from matplotlib.figure import Figure

    metric = comparison["metric"]
    fractions = sorted({arm["label_fraction"] for arm in comparison["arms"]}, reverse=True)
    recipes = list(dict.fromkeys(arm["recipe"] for arm in comparison["arms"]))
    seeds = sorted({s for arm in comparison["arms"] for s in arm["seeds"]})
    colours = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    figure = Figure(figsize=(max(6.0, 1.2 * len(recipes) * len(fractions) + 2), 5.2), layout="constrained")
    axes_row = figure.subplots(1, len(fractions), squeeze=False, sharey=True)[0]
    for axes, fraction in zip(axes_row, fractions):
        for x, recipe in enumerate(recipes):
            arm = next((a for a in comparison["arms"] if a["recipe"] == recipe and a["label_fraction"] == fraction), None)
            if arm is None:
                continue
            values = np.array(arm["values"][metric], dtype=float)
            offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
            for offset, value, s in zip(offsets, values, arm["seeds"]):
                axes.scatter(x + offset, value, color=colours[s], s=22, zorder=3, label=f"seed {s}")
            mean = float(np.nanmean(values))
            interval = stats.paired_t(values[~np.isnan(values)]) if len(values) > 1 else None
            error = None
            if interval and not math.isnan(interval["low"]):
                error = [[mean - interval["low"]], [interval["high"] - mean]]
            axes.errorbar(x + 0.3, mean, yerr=error, fmt="D", color="black", capsize=4, zorder=4,
                          label="mean, 95% t interval over seeds")
            if recipe == comparison["baseline"]:
                axes.axhline(mean, color="grey", linestyle="--", linewidth=1, label="baseline mean")
        axes.set_xticks(range(len(recipes)), recipes, rotation=30, ha="right", fontsize=8)
        axes.set_title(f"label fraction {fraction:g}")
        axes.set_xlim(-0.6, len(recipes) - 0.4)
        axes.grid(axis="y", alpha=0.3)
    values = [v for arm in comparison["arms"] for v in arm["values"][metric] if not math.isnan(v)]
    if values and 0.0 <= min(values) and max(values) <= 1.0:  # a score in [0, 1]: intervals past it mean nothing
        axes_row[0].set_ylim(max(0.0, min(values) - 0.1), min(1.0, max(values) + 0.1) + 0.01)
    axes_row[0].set_ylabel(f"test {metric}")
    handles, labels = axes_row[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
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
