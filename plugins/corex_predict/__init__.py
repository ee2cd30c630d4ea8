"""corex_predict: from a trained run to predictions on new radiographs.

Commands (through the ``corex_cli`` hook):

* ``corex export RUN_DIR OUT.pt [--stage NAME] [--encoder-only]``: the whole model in one file that
  ``torch.load(..., weights_only=True)`` reads, plus ``OUT.json`` (:mod:`corex_predict.export`);
* ``corex predict MODEL FILES_OR_DIRS... --out DIR``: per-image and per-study predictions for
  DICOM, PNG and JPEG files, decoded as in training (:mod:`corex_predict.prediction`);
* ``corex evaluate RUN_DIR_OR_EXPORT [--split test] [--tta hflip,scale]``: a finished run evaluated
  again into a new folder (:mod:`corex_predict.evaluation`).

A run directory and an exported file are interchangeable wherever a model is expected. In Python::

    from corex_predict import load_model, predict
    model = load_model("runs/quickstart")            # or "model.pt"
    records = predict(model, ["a.dcm", "b.png"])      # list of dicts, as in predictions.json

This module imports no torch: ``corex --help`` builds the commands' parsers from it
(:mod:`corex_predict.cli`), each command imports its implementation when it runs, and the Python
names below are imported on first use.
"""

from __future__ import annotations

from corex import hookimpl
from corex.lazy import lazy_exports
from corex_predict.cli import add_commands


@hookimpl
def corex_cli(commands):
    add_commands(commands)


__getattr__ = lazy_exports(__name__, {
    "evaluate": "corex_predict.evaluation",
    "export_model": "corex_predict.export",
    "LoadedModel": "corex_predict.model",
    "load_model": "corex_predict.model",
    "read_torch_file": "corex_predict.model",
    "Predictions": "corex_predict.prediction",
    "predict": "corex_predict.prediction",
    "write_predictions": "corex_predict.prediction",
    "TTAModel": "corex_predict.tta",
    "parse_tta": "corex_predict.tta",
})
__all__ = [
    "LoadedModel",
    "Predictions",
    "TTAModel",
    "corex_cli",
    "evaluate",
    "export_model",
    "load_model",
    "parse_tta",
    "predict",
    "read_torch_file",
    "write_predictions",
]
