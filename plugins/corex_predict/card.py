"""MODEL_CARD.md: what a model is for, what it learnt from and how well it did, written from metadata.

Never by hand: every section comes from a file of the run or the export's metadata (Mitchell et
al., "Model Cards for Model Reporting", FAT* 2019, for the sections):

* intended use: the heads' tasks, the classes, the input contract; a model trained on synthetic
  data says so first, and that it must not be used on patients;
* training data: the data source's name and options, its provenance and normalization
  (``data.json``), its counts per split;
* architecture: encoder and heads with their options, parameters, inputs and outputs;
* evaluation: each evaluate stage of this model (``results.json``): the headline metrics the plugins
  declare (``corex.metrics.catalog().headline()``) with their 95% intervals, subgroups where present,
  the input gate;
* limitations: the run's findings (``report.json`` when corex_study wrote it, else asked of the
  plugins through ``corex.metrics.findings``), and what the data cannot tell;
* provenance: corex version, recipe and its digest, stage, plugin versions, the exported files.

Written beside every export (:func:`write_export_card`) and into every run directory by the
``corex_run_end`` observer (:func:`write_run_card`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from corex import __version__, rundir
from corex.errors import CorexError

CARD = "MODEL_CARD.md"
MARKER = "<!-- corex-model-card "


def recipe_sha256(meta: Mapping[str, Any]) -> str:
    """The SHA-256 of the resolved recipe's text: which run a model came from, even where the recipe's
    digest cannot be computed (a plugin it names is not installed here)."""
    return hashlib.sha256(str(meta.get("recipe_yaml") or "").encode()).hexdigest()


def _identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {"recipe": meta.get("recipe"), "recipe_sha256": recipe_sha256(meta), "stage": meta.get("stage")}


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 2):
        return str(int(value))
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _share(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) and not math.isnan(value) else "n/a"


def _interval(value: Any) -> str:
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return ""


def _inline(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return "`" + text.replace("`", "'") + "`"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    clean = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", *("| " + " | ".join(r) + " |" for r in clean), ""]


def evaluations_of(meta: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The evaluate stages of ``results`` that evaluated the model of ``meta``'s stage: those after it
    in the recipe and before the next stage that trains."""
    try:
        stages = list((yaml.safe_load(meta.get("recipe_yaml") or "") or {}).get("stages") or {})
        kinds = {name: ((yaml.safe_load(meta["recipe_yaml"]) or {})["stages"][name] or {}).get("kind", "train") for name in stages}
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        stages, kinds = [], {}
    done = results.get("stages") or {}
    stage = meta.get("stage")
    if stage not in stages:  # the recipe cannot tell: every evaluate stage of the run
        return {n: r for n, r in done.items() if isinstance(r, Mapping) and r.get("kind") == "evaluate"}
    found = {}
    for name in stages[stages.index(stage) + 1:]:
        if kinds.get(name) != "evaluate":
            break
        if isinstance(done.get(name), Mapping):
            found[name] = done[name]
    return found


def _findings(run_dir: Path | None, evaluations: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The run's findings about these stages: report.json when it exists, else asked of the plugins."""
    if run_dir is None:
        return []
    report = run_dir / "report.json"
    if report.is_file():
        try:
            found = rundir.read_json(report).get("findings") or []
            return [f for f in found if isinstance(f, Mapping) and (not f.get("stage") or f.get("stage") in evaluations)]
        except (OSError, ValueError, AttributeError):
            pass
    try:
        from corex.metrics import findings

        return [f.to_dict() for stage, result in evaluations.items() for f in findings(run_dir, stage, result)]
    except Exception:  # noqa: BLE001 -- a plugin's broken finding must not cost the card
        return []


def model_card(meta: Mapping[str, Any], run_dir: Path | None, exports: Sequence[Mapping[str, Any]] = ()) -> str:
    """The card's Markdown for the model ``meta`` describes (``run_dir`` holds its results)."""
    run_dir = Path(run_dir) if run_dir is not None else None
    results = rundir.read_json(run_dir / "results.json") if run_dir is not None and (run_dir / "results.json").is_file() else {}
    evaluations = evaluations_of(meta, results if isinstance(results, Mapping) else {})
    data = meta.get("training_data") or {}
    classes = list(meta.get("class_names") or [])
    heads = meta.get("heads") or {}
    tasks = [h.get("factory") for h in heads.values() if isinstance(h, Mapping)]
    lines = [f"{MARKER}{json.dumps(_identity(meta))} -->",
             f"# Model card: {meta.get('recipe')} (stage {meta.get('stage')})", "",
             (f"Written by corex {__version__} from the model's metadata and the run's files (data.json, results.json, "
             "report.json); every export and every run rewrites it. Do not edit it by hand."), ""]
    if data.get("synthetic"):
        lines += [(f"> **This model was trained on synthetic data** ({data.get('synthetic_note') or data.get('source')}). "
                  "It exists to test software and methods. **It must not be used on patients**: its outputs on real "
                  "radiographs mean nothing."), ""]

    lines += ["## Intended use", ""]
    what = []
    if "classification" in tasks:
        what.append(f"study-level classification of a frontal chest radiograph into {len(classes)} classes: "
                    + ", ".join(f"`{c}`" for c in classes) + " (probabilities per image, averaged per study)")
    if "segmentation" in tasks:
        what.append("segmentation of lung opacities (a probability per pixel)")
    if not what:
        what.append("feature extraction (an encoder without task heads), for transfer to another task")
    lines += [f"- **Task**: {'; '.join(what)}.",
              (f"- **Input**: one frontal (PA/AP) chest radiograph (DICOM CR/DX, or PNG/JPEG), {meta.get('in_channels', 1)} channel, "
              f"decoded by corex_cxr and resized to {meta.get('image_size')} x {meta.get('image_size')}: {meta.get('intensity')}."),
              "- **Users**: researchers reproducing or extending the study with corex (`corex predict`, `corex evaluate`).",
              ("- **Not for**: diagnosis or triage of patients (this is not a medical device and has not been validated clinically); "
              "lateral views, other body parts, other modalities or pictures that are not radiographs (the input gate flags them "
              "where the run fitted one)."), ""]

    lines += ["## Training data", ""]
    lines.append(f"- **Source**: `{data.get('source', meta.get('data'))}`"
                 + (f" at `{data['location']}`" if data.get("location") else "")
                 + (f", options {_inline(data['options'])}" if data.get("options") else ""))
    lines.append(f"- **Synthetic**: {'yes' if data.get('synthetic') else 'no'}"
                 + (f": {data.get('synthetic_note')}" if data.get("synthetic") and data.get("synthetic_note") else ""))
    if data.get("provenance") is not None:
        lines.append(f"- **Provenance** (data.json): {_inline(data['provenance'])}")
    normalization = data.get("normalization", meta.get("normalization"))
    if isinstance(normalization, Mapping):
        lines.append("- **Normalization** (data.json):")
        lines += [f"  - {key}: {_inline(value) if not isinstance(value, str) else value}" for key, value in normalization.items()]
    elif normalization is not None:
        lines.append(f"- **Normalization** (data.json): {_inline(normalization)}")
    splits = data.get("splits") or {}
    if splits:
        lines += ["", *_table(["split", "studies", "images", "patients", "studies per class"],
                              [[name, info.get("studies", ""), info.get("images", ""), info.get("patients", ""),
                                ", ".join(f"{k} {v}" for k, v in (info.get("classes") or {}).items())] for name, info in splits.items()])]
    else:
        lines.append("")

    lines += ["## Architecture", "",
              f"- **Encoder**: `{meta.get('encoder', {}).get('name')}` ({meta.get('arch')}), options {_inline(meta.get('encoder', {}).get('options', {}))}",
              *(f"- **Head `{name}`**: `{h.get('factory')}`, options {_inline(h.get('options', {}))}, loss weight {h.get('weight', 1.0)}"
                for name, h in heads.items() if isinstance(h, Mapping)),
              f"- **Parameters**: {meta.get('parameters', 0):,}"]
    outputs = []
    if "classification" in tasks:
        outputs.append(f"class probabilities ({len(classes)}, in the order above)")
    if "segmentation" in tasks:
        outputs.append(f"opacity logits ({meta.get('image_size')} x {meta.get('image_size')}; sigmoid > 0.5 is opacity)")
    if isinstance(meta.get("input_gate"), Mapping):
        outputs.append("the input gate's out-of-distribution score")
    if outputs:
        lines.append("- **Outputs** (ONNX and TorchScript exports; see docs/export-formats.md): " + "; ".join(outputs))
    lines.append("")

    lines += ["## Evaluation", ""]
    if not evaluations:
        lines += ["No evaluate stage of the run evaluated this model; evaluate it with `corex evaluate`.", ""]
    try:
        from corex.metrics import catalog

        declared = catalog()
        headline = declared.headline()
    except Exception:  # noqa: BLE001 -- without the catalog, every metric without a slash
        declared, headline = None, []
    for name, result in evaluations.items():
        metrics, intervals = result.get("metrics") or {}, result.get("intervals") or {}
        names = [k for k in headline if isinstance(metrics.get(k), (int, float))] or [k for k in metrics if "/" not in k]
        lines += [f"### {name} ({result.get('split', name)} split)", ""]
        rows = [[(declared.title(k) if declared else k), f"`{k}`", _number(metrics[k]), _interval(intervals.get(k))] for k in names]
        if rows:
            lines += ["Headline metrics with their 95% bootstrap intervals (results.json):", "",
                      *_table(["metric", "name", "value", "95% interval"], rows)]
        subgroups = sorted(k for k in metrics if k.startswith("subgroup/") and not k.endswith("/difference"))
        if subgroups:
            sub_rows = []
            for key in subgroups:
                _, group, metric = key.split("/", 2)
                difference = metrics.get(f"{key}/difference")
                sub_rows.append([group, metric, _number(metrics[key]), _interval(intervals.get(key)),
                                 _number(difference) if difference is not None else ""])
            lines += [(f"Subgroups of the header metadata ({_number(metrics.get('subgroups/examined', len(sub_rows)))} examined, "
                      f"{_number(metrics.get('subgroups/worse', 0))} worse than the rest beyond chance):"), "",
                      *_table(["subgroup", "metric", "value", "95% interval", "difference to the rest"], sub_rows)]
        if "input_gate/flagged" in metrics:
            lines += [(f"Input gate on this split: {_share(metrics['input_gate/flagged'])} of the images flagged "
                      f"{_interval(intervals.get('input_gate/flagged'))} (out-of-distribution score alone: "
                      f"{_share(metrics.get('input_gate/flagged_ood'))}; the gate's false-alarm rate "
                      f"{_share(metrics.get('input_gate/false_alarm_rate'))})."), ""]

    lines += ["## Input gate", ""]
    gate = meta.get("input_gate")
    if isinstance(gate, Mapping):
        lines += ["- Header checks: Modality CR or DX, BodyPartExamined CHEST, ViewPosition not lateral (from the DICOM header).",
                  (f"- Out-of-distribution score: {gate.get('score')} distance of the {gate.get('feature')} "
                  f"({gate.get('dimension')} features) from the training split's ({gate.get('n_train')} images, {gate.get('covariance')})."),
                  (f"- Threshold {gate.get('threshold'):.4g}: the {1 - float(gate.get('false_alarm_rate', 0)):.0%} quantile of the "
                  f"{gate.get('calibration_split')} split's scores ({gate.get('n_calibration')} images), a stated false-alarm rate of "
                  f"{float(gate.get('false_alarm_rate', 0)):.0%}."), ""]
    else:
        lines += [("- Header checks only (Modality CR/DX, BodyPartExamined CHEST, ViewPosition not lateral); no image-based "
                  "out-of-distribution score was fitted (list the `input_gate` evaluator in an evaluate stage)."), ""]

    lines += ["## Limitations", ""]
    if data.get("synthetic"):
        lines.append("- Trained and evaluated on synthetic images only: nothing here measures performance on real radiographs.")
    found = _findings(run_dir, evaluations)
    for finding in sorted(found, key=lambda f: not f.get("verdict")):
        prefix = f"[{finding['stage']}] " if finding.get("stage") and len(evaluations) > 1 else ""
        lines.append(f"- {prefix}{finding.get('text')}")
    if not found:
        lines.append("- No findings about the evaluation were recorded (no report.json, and the plugins wrote none).")
    lines += [(f"- Evaluated on held-out studies of the same source (`{data.get('source', meta.get('data'))}`) only: other hospitals, "
              "scanners, populations and label definitions are untested."), ""]

    lines += ["## Provenance", "",
              f"- corex version: {meta.get('corex_version')} (this card: {__version__})",
              f"- recipe: `{meta.get('recipe')}`, digest `{meta.get('recipe_digest')}`, stage `{meta.get('stage')}`",
              f"- model metadata format: `{meta.get('format')}`",
              "- plugins: " + ", ".join(f"{k} {v}" for k, v in sorted((meta.get("plugins") or {}).items())),
              *([f"- run directory: `{run_dir}`"] if run_dir is not None else [])]
    for entry in exports:
        lines.append(f"- export `{entry.get('file')}` ({entry.get('file_format', 'pt')}), sha256 `{entry.get('sha256')}`")
    return "\n".join(lines) + "\n"


def _card_owner(path: Path) -> dict[str, Any] | None:
    try:
        first = path.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    match = re.match(re.escape(MARKER) + r"(\{.*\}) -->$", first)
    try:
        return json.loads(match.group(1)) if match else None
    except json.JSONDecodeError:
        return None


def write_export_card(output: Path, meta: Mapping[str, Any], run_dir: Path | None, kind: str) -> Path:
    """``MODEL_CARD.md`` beside ``output``, listing every export of this model in that folder; when
    the folder's card is another model's, ``<stem>.MODEL_CARD.md`` instead."""
    folder = Path(output).parent
    card = folder / CARD
    identity = _identity(meta)
    owner = _card_owner(card) if card.exists() else identity
    if owner != identity:
        card = folder / f"{Path(output).stem}.{CARD}"
    exports = []
    for sidecar in sorted(folder.glob("*.json")):
        try:
            entry = rundir.read_json(sidecar)
        except Exception:  # noqa: BLE001, S112 -- not every JSON file there is an export's
            continue
        if not isinstance(entry, Mapping) or not isinstance(entry.get("file"), str) or not (folder / entry["file"]).is_file():
            continue
        same = (entry.get("recipe_sha256") == identity["recipe_sha256"] and entry.get("stage") == meta.get("stage")
                and entry.get("recipe") == meta.get("recipe"))
        if same:
            exports.append({"file": entry["file"], "file_format": entry.get("file_format", "pt"),
                            "sha256": entry.get("sha256")})
    rundir.atomic_write_text(card, model_card(meta, run_dir, exports))
    return card


def write_run_card(run_dir: Path) -> Path | None:
    """``RUN/MODEL_CARD.md`` for the run's last model; ``None`` when no stage left one."""
    from corex_predict.model import _run_gate, run_model

    run_dir = Path(run_dir)
    try:
        meta, _ = run_model(run_dir, None)
    except CorexError:
        return None
    _run_gate(run_dir, meta)
    rundir.atomic_write_text(run_dir / CARD, model_card(meta, run_dir))
    return run_dir / CARD


__all__ = ["CARD", "evaluations_of", "model_card", "write_export_card", "write_run_card"]
