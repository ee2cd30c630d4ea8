"""corex_track: experiment trackers, the loggers ``tensorboard`` and ``mlflow``.

A recipe lists them at its top level::

    loggers:
      - {name: tensorboard}                        # RUN/tensorboard/
      - {name: mlflow}                             # file store RUN/mlruns, experiment = the recipe's name
      - {name: mlflow, tracking_uri: http://tracking:5000, experiment: covid-mtl, tags: {site: A}}

The engine feeds them on rank 0 (each is a :class:`corex.interfaces.Logger`): the resolved recipe when the run
starts, every epoch's metrics (``STAGE/KEY`` at the step count over all stages), every stage's
results with their 95% intervals (``test/macro_f1``, ``test/macro_f1/low``, ``test/macro_f1/high``)
and, at the end, the report and results files. A resumed run continues the same TensorBoard folder
and the same MLflow run. See docs/tracking.md.

Both need the optional packages: ``pip install "corex-cxr[tracking]"`` (``tensorboard`` and
``mlflow-skinny``). This module imports neither, nor torch: the factories import the loggers when a
run builds them, and a missing package is then a :class:`corex.errors.CorexError` that says what to
install.
"""

from __future__ import annotations

from pathlib import Path

from corex import hookimpl
from corex.interfaces import Logger
from corex.lazy import lazy_exports


def tensorboard_logger(*, run_dir: Path, log_dir: Path | None = None) -> Logger:
    """TensorBoard event files in ``log_dir`` (default ``RUN/tensorboard``; a relative path is taken
    from the run directory). See :class:`corex_track.board.TensorBoardLogger`."""
    from corex_track.board import TensorBoardLogger

    return TensorBoardLogger(run_dir=run_dir, log_dir=log_dir)


def mlflow_logger(
    *,
    run_dir: Path,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Logger:
    """One MLflow run per corex run: ``tracking_uri`` (default ``file:`` + ``RUN/mlruns``; a relative
    folder is taken from the run directory), ``experiment`` (default the recipe's name), ``run_name``
    (default the run directory's name) and extra ``tags``. See :class:`corex_track.tracker.MlflowLogger`."""
    from corex_track.tracker import MlflowLogger

    return MlflowLogger(run_dir=run_dir, tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, tags=tags)


@hookimpl
def corex_loggers():
    return {"tensorboard": tensorboard_logger, "mlflow": mlflow_logger}


__getattr__ = lazy_exports(__name__, {
    "TensorBoardLogger": "corex_track.board",
    "MlflowLogger": "corex_track.tracker",
    "mlflow_key": "corex_track.tracker",
    "INSTALL": "corex_track.common",
})
__all__ = ["INSTALL", "MlflowLogger", "TensorBoardLogger", "mlflow_key", "mlflow_logger", "tensorboard_logger"]
