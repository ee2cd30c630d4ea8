"""corex_predict: from a trained run to predictions on new radiographs.

Commands (through the ``corex_cli`` hook):

* ``corex export RUN_DIR OUT.pt|OUT.onnx|OUT.ts [--format pt|onnx|torchscript] [--stage NAME] [--encoder-only]``:
  the whole model in one file (a weights-only torch file, an ONNX graph or a TorchScript graph) plus
  ``OUT.json`` and ``MODEL_CARD.md`` (:mod:`corex_predict.export`, :mod:`corex_predict.deploy`);
* ``corex predict MODEL FILES_OR_DIRS... --out DIR [--gate warn|strict|off]``: per-image and per-study
  predictions for DICOM, PNG and JPEG files, decoded as in training, each input checked by the
  input gate (:mod:`corex_predict.prediction`, :mod:`corex_predict.gate`);
* ``corex evaluate RUN_DIR_OR_EXPORT [--split test] [--tta hflip,scale]``: a finished run evaluated
  again into a new folder (:mod:`corex_predict.evaluation`).

Components and observers:

* the ``input_gate`` evaluator: fits the input gate (Mahalanobis distance of pooled encoder
  features, threshold at a stated false-alarm rate on the validation split) in an evaluate stage;
* ``corex_run_end`` (after the other observers): ``MODEL_CARD.md`` in every run directory (:mod:`corex_predict.card`).

A run directory and an exported file are interchangeable wherever a model is expected. In Python::

    from corex_predict import load_model, predict
    model = load_model("runs/quickstart")            # or "model.pt", "model.onnx", "model.ts"
    records = predict(model, ["a.dcm", "b.png"])      # list of dicts, as in predictions.json

This module imports no torch: ``corex --help`` builds the commands' parsers from it
(:mod:`corex_predict.cli`), each command imports its implementation when it runs, and the Python
names below are imported on first use.
"""

from __future__ import annotations

import sys

from corex import hookimpl
from corex.interfaces import Evaluator
from corex.lazy import lazy_exports
from corex_predict.cli import add_commands


def input_gate_evaluator(*, false_alarm_rate: float = 0.05, level: int = -1) -> Evaluator:
    """The input gate, fitted on the training split's pooled encoder features (pyramid ``level``)
    with its threshold at ``false_alarm_rate`` on the validation split (see
    :class:`corex_predict.gate.GateEvaluator`)."""
    from corex_predict.gate import GateEvaluator

    return GateEvaluator(false_alarm_rate=false_alarm_rate, level=level)


@hookimpl
def corex_cli(commands):
    add_commands(commands)


@hookimpl
def corex_evaluators():
    return {"input_gate": input_gate_evaluator}


@hookimpl
def corex_metrics():
    from corex.metrics import Metric

    return [
        Metric("input_gate/flagged", "inputs flagged by the input gate", higher_is_better=None,
               description="share of the split's images with a flag (header checks or out-of-distribution score)"),
        Metric("input_gate/flagged_ood", "inputs above the out-of-distribution threshold", higher_is_better=None,
               description="about the false-alarm rate on data like the training data; more on data unlike it"),
        Metric("input_gate/flagged_header", "inputs flagged by their header", higher_is_better=None),
        Metric("input_gate/threshold", "out-of-distribution threshold", higher_is_better=None, bounds=None),
        Metric("input_gate/false_alarm_rate", "the gate's stated false-alarm rate", higher_is_better=None),
        Metric("input_gate/n", "images scored by the input gate", higher_is_better=None, bounds=None),
    ]


@hookimpl
def corex_artefacts():
    return {
        "input_gate.csv": "The input gate on the {split} split: each image's out-of-distribution score and flags.",
        "input_gate.json": "The fitted input gate: feature level, threshold, false-alarm rate, training and calibration sizes.",
        "input_gate.pt": "The fitted input gate (weights-only torch file: mean, precision matrix, threshold), carried into exports.",
    }


@hookimpl
def corex_findings(run_dir, stage, result):
    from corex.metrics import Finding

    metrics = result.get("metrics") or {}
    flagged, rate = metrics.get("input_gate/flagged_ood"), metrics.get("input_gate/false_alarm_rate")
    if not isinstance(flagged, (int, float)) or not isinstance(rate, (int, float)):
        return []
    interval = (result.get("intervals") or {}).get("input_gate/flagged_ood")
    text = (f"The input gate flagged {flagged:.1%} of the {result.get('split', stage)} images as out of distribution, "
            f"against a stated false-alarm rate of {rate:.0%}")
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and interval[0] is not None:
        shown = f" (95% interval {interval[0]:.1%} to {interval[1]:.1%})"
        if interval[0] > rate:
            text += (f"{shown}: more than that beyond chance, so this split differs from the training data as the encoder "
                     "sees it, or the validation split that set the threshold was too small")
        else:
            text += f"{shown}: consistent with images like the training data"
    text += "."
    return [Finding(text, "input_gate/flagged_ood", float(flagged), stage=stage,
                    also=({"metric": "input_gate/false_alarm_rate", "value": float(rate), "source": "results.json"},))]


@hookimpl(trylast=True)
def corex_run_end(run, results):
    """MODEL_CARD.md for the run's last model, after corex_study's report (read when it exists)."""
    try:
        from corex_predict.card import write_run_card

        write_run_card(run.out)
    except Exception as exc:  # noqa: BLE001 -- the run itself succeeded; a card problem must not hide that
        print(f"corex_predict: MODEL_CARD.md not written ({type(exc).__name__}: {exc}); retry with: python -c "
              f"\"from corex_predict.card import write_run_card; write_run_card('{run.out}')\"", file=sys.stderr)


__getattr__ = lazy_exports(__name__, {
    "evaluate": "corex_predict.evaluation",
    "export_model": "corex_predict.export",
    "GateEvaluator": "corex_predict.gate",
    "InputGate": "corex_predict.gate",
    "header_flags": "corex_predict.gate",
    "LoadedModel": "corex_predict.model",
    "load_model": "corex_predict.model",
    "read_torch_file": "corex_predict.model",
    "model_card": "corex_predict.card",
    "write_run_card": "corex_predict.card",
    "Predictions": "corex_predict.prediction",
    "predict": "corex_predict.prediction",
    "write_predictions": "corex_predict.prediction",
    "TTAModel": "corex_predict.tta",
    "parse_tta": "corex_predict.tta",
})
__all__ = [
    "GateEvaluator",
    "InputGate",
    "LoadedModel",
    "Predictions",
    "TTAModel",
    "corex_artefacts",
    "corex_cli",
    "corex_evaluators",
    "corex_findings",
    "corex_metrics",
    "corex_run_end",
    "evaluate",
    "export_model",
    "header_flags",
    "input_gate_evaluator",
    "load_model",
    "model_card",
    "parse_tta",
    "predict",
    "read_torch_file",
    "write_predictions",
    "write_run_card",
]
