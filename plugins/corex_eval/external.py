"""External validation: an evaluate stage that reads another data source, set against the training data.

A stage with its own ``data:`` block scores the model on a source it was not trained on (another
hospital, another scanner, another population): the report must say how that source differs from
the training data before it says how the model fared there. ``data.json`` holds the recipe's data
under its split names and each such stage's source under ``stages.<stage>``, both as their
``describe()`` gave them; corex_cxr sources report per split ``subgroups`` (images per value of each
header field) and ``intensity`` (statistics of the decoded pixels).

Three findings, each only when its inputs are there:

* header shift: per metadata field, the total variation distance between the value shares of the
  training images and the external images (``""``, unknown, counts as a value: a source without the
  header is itself a shift), the fields that moved most with the value that moved most;
* intensity shift: mean, standard deviation and percentiles of the decoded pixels, and the
  standardised mean difference (external minus training mean, in training standard deviations);
* internal against external: every headline metric the external stage and an internal evaluate
  stage (one reading the training data) both computed, side by side with their intervals.

Light: plain JSON reading, no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from corex.metrics import Finding

SHIFT_SHOWN = 0.10  # total variation distance from which a field's shift is spelled out
MAX_FIELDS = 3


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def training_description(data: Mapping[str, Any], results: Mapping[str, Any], stage: str) -> tuple[dict[str, Any], str]:
    """The description of the data the evaluated model was trained on, and which: the own data of the last
    train stage before ``stage`` when it has some, else the recipe's data."""
    trained = None
    for name, entry in results.get("stages", {}).items():
        if name == stage:
            break
        if entry.get("kind") == "train":
            trained = name
    own = data.get("stages", {})
    if trained is not None and trained in own:
        return own[trained], f"stage {trained}'s data"
    return dict(data), "the recipe's data"


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {value: count / total for value, count in counts.items()} if total else {}


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Half the L1 distance between two distributions over values (0 same, 1 disjoint)."""
    return 0.5 * sum(abs(p.get(v, 0.0) - q.get(v, 0.0)) for v in set(p) | set(q))


def header_shift(train: Mapping[str, Mapping[str, int]], external: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
    """Per field present in both: ``{"distance", "value", "train", "external"}``, the value whose share moved most."""
    shifts = {}
    for field in train:
        if field not in external:
            continue
        p, q = shares(train[field]), shares(external[field])
        if not p or not q:
            continue
        # The value whose share moved most (on a tie, the one more common in the external data).
        value = max(set(p) | set(q), key=lambda v: (round(abs(p.get(v, 0.0) - q.get(v, 0.0)), 12), q.get(v, 0.0), v))
        shifts[field] = {"distance": total_variation(p, q), "value": value, "train": p.get(value, 0.0), "external": q.get(value, 0.0)}
    return shifts


def _value_name(value: str) -> str:
    return value if value else "unknown"


def external_findings(run_dir: Path, stage: str, result: Mapping[str, Any]) -> list[Finding]:
    run_dir = Path(run_dir)
    data = _read(run_dir / "data.json")
    own = data.get("stages", {})
    if stage not in own:
        return []
    results = _read(run_dir / "results.json")
    external, split = own[stage], result.get("split", stage)
    training, which = training_description(data, results, stage)
    where = f"the {split} split of stage {stage}'s own data"
    found = []

    subgroups_train = training.get("subgroups", {}).get("train", {})
    subgroups_external = external.get("subgroups", {}).get(split, {})
    shifts = header_shift(subgroups_train, subgroups_external)
    # What two samples of the training data differ by: its own train split against its split of the same name.
    reference = header_shift(subgroups_train, training.get("subgroups", {}).get(split, {}))
    if shifts:
        ordered = sorted(shifts.items(), key=lambda item: -item[1]["distance"])
        moved = [(f, s) for f, s in ordered if s["distance"] >= SHIFT_SHOWN][:MAX_FIELDS]
        field, shift = ordered[0]
        also = []
        if moved:
            parts = []
            for f, s in moved:
                chance = (f" against {reference[f]['distance']:.2f} between the training data's own train and {split} splits"
                          if f in reference else "")
                parts.append(f"{f} (total variation {s['distance']:.2f}{chance}; {_value_name(s['value'])} {100 * s['train']:.0f}% "
                             f"of training images against {100 * s['external']:.0f}%)")
                also += [{"metric": f"shift/{f}", "value": s["distance"], "source": "data.json"},
                         {"metric": f"share/train/{f}/{s['value']}", "value": s["train"], "source": "data.json"},
                         {"metric": f"share/{stage}/{f}/{s['value']}", "value": s["external"], "source": "data.json"}]
            similar = [f for f, s in ordered if s["distance"] < SHIFT_SHOWN]
            tail = f"; {', '.join(similar)} within {SHIFT_SHOWN:.2f}" if similar else ""
            text = (f"External data: the header metadata of {where} differ from the training images ({which}, train split) "
                    f"most in {'; '.join(parts)}{tail}.")
        else:
            text = (f"External data: the header metadata of {where} are close to the training images' ({which}, train split): "
                    f"every field within total variation {SHIFT_SHOWN:.2f}, the largest {field} at {shift['distance']:.2f}.")
        also = [a for a in also if a["metric"] != f"shift/{field}"]
        found.append(Finding(text, f"shift/{field}", shift["distance"], "data.json", stage, tuple(also)))

    intensity_train = training.get("intensity", {}).get("train", {})
    intensity_external = external.get("intensity", {}).get(split, {})
    if intensity_train.get("mean") is not None and intensity_external.get("mean") is not None:
        a, b = intensity_train, intensity_external
        sd = a.get("sd") or math.nan
        standardised = (b["mean"] - a["mean"]) / sd if sd and math.isfinite(sd) else math.nan
        text = (f"External data: decoded pixel intensities of {where} have mean {b['mean']:.2f} (sd {b['sd']:.2f}) against "
                f"{a['mean']:.2f} (sd {a['sd']:.2f}) for the training images")
        also = [{"metric": "intensity/train/mean", "value": a["mean"], "source": "data.json"},
                {"metric": f"intensity/{stage}/mean", "value": b["mean"], "source": "data.json"}]
        if all(k in a and k in b for k in ("p1", "p50", "p99")):
            text += (f"; median {b['p50']:.2f} against {a['p50']:.2f}, 1st to 99th percentile {b['p1']:.2f} to {b['p99']:.2f} "
                     f"against {a['p1']:.2f} to {a['p99']:.2f}")
        text += (f": the mean moved by {standardised:+.2f} training standard deviations." if math.isfinite(standardised) else ".")
        found.append(Finding(text, "intensity/standardised_difference", standardised, "data.json", stage, tuple(also)))

    internal = next((name for name, entry in results.get("stages", {}).items()
                     if entry.get("kind") == "evaluate" and name != stage and name not in own and entry.get("metrics")), None)
    if internal is not None:
        from corex_eval.declared import METRICS

        inside, outside = results["stages"][internal], result
        names = [m.name for m in METRICS if m.headline and "*" not in m.name
                 and isinstance(inside["metrics"].get(m.name), (int, float)) and isinstance(outside.get("metrics", {}).get(m.name), (int, float))]
        titles = {m.name: m.title for m in METRICS}
        if names:
            parts, also = [], []
            for name in names:
                here, there = outside["metrics"][name], inside["metrics"][name]
                interval_here, interval_there = outside.get("intervals", {}).get(name), inside.get("intervals", {}).get(name)
                span = (lambda i: f" ({i[0]:.2f} to {i[1]:.2f})" if i else "")
                parts.append(f"{titles.get(name, name)} {here:.2f}{span(interval_here)} against {there:.2f}{span(interval_there)}")
                also.append({"metric": name, "value": there, "source": "results.json", "stage": internal})
            first = names[0]
            text = (f"External against internal validation, {where} against stage {internal} ({inside.get('split', internal)} split "
                    f"of the training data), with 95% intervals: {'; '.join(parts)}.")
            found.append(Finding(text, first, outside["metrics"][first], "results.json", stage, tuple(also)))
    return found


__all__ = ["external_findings", "header_shift", "shares", "total_variation", "training_description"]
