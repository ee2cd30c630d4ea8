"""corex_predict: from a trained run to predictions on new radiographs.

Commands (through the ``corex_cli`` hook):

* ``corex export RUN_DIR OUT.pt [--stage NAME] [--encoder-only]``: the whole model in one file that
  ``torch.load(..., weights_only=True)`` reads, plus ``OUT.json`` (:mod:`corex_predict.export`);
* ``corex predict MODEL FILES_OR_DIRS... --out DIR``: per-image and per-study predictions for
  DICOM, PNG and JPEG files, decoded as in training (:mod:`corex_predict.predict`);
* ``corex evaluate RUN_DIR_OR_EXPORT [--split test] [--tta hflip,scale]``: a finished run evaluated
  again into a new folder (:mod:`corex_predict.evaluate`).

A run directory and an exported file are interchangeable wherever a model is expected. In Python::

    from corex_predict import load_model, predict
    model = load_model("runs/quickstart")            # or "model.pt"
    records = predict(model, ["a.dcm", "b.png"])      # list of dicts, as in predictions.json
"""

from __future__ import annotations

from corex import hookimpl
from corex_predict.cli import add_commands
from corex_predict.evaluate import evaluate
from corex_predict.export import export_model
from corex_predict.model import LoadedModel, load_model, read_torch_file
from corex_predict.predict import Predictions, predict, write_predictions
from corex_predict.tta import TTAModel, parse_tta


@hookimpl
def corex_cli(commands):
    add_commands(commands)


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
