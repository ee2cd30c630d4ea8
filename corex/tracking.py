"""The recipe's loggers (``loggers: [tensorboard, mlflow]``), fed through the observer hooks on rank 0.

Each logger is a component of the ``loggers`` kind (:class:`corex.interfaces.Logger`). While a run
is under way, :func:`attached_loggers` registers a small plugin that forwards ``corex_epoch_end``,
``corex_stage_end`` and ``corex_run_end`` to them, the same door every observer uses; each
logger's ``state_dict()`` is kept in ``loggers.json`` so that a resumed run continues the same
tracked run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from corex import rundir
from corex.build import DEFAULT_CACHE, build_component
from corex.checks import culprit_of
from corex.errors import CorexError, PluginError
from corex.hookspecs import hookimpl
from corex.lifecycle import flatten
from corex.session import Session

STATE_FILE = "loggers.json"
# Files of a finished run worth keeping with the tracked run, when they exist.
ARTIFACTS = ("results.json", "report.html", "report.md", "MODEL_CARD.md", "curves.png", "recipe.yaml")


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def _call(path: str, logger: Any, method: str, *args: Any) -> None:
    """``logger.method(*args)``; a failure is a PluginError naming the logger, its plugin and its recipe key."""
    try:
        getattr(logger, method)(*args)
    except CorexError:
        raise
    except Exception as exc:
        label = culprit_of(logger, path, "logger").label
        raise PluginError(f"{path}: {label} raised {type(exc).__name__}: {exc} in {method}() (see docs/contract.md#logger)") from exc


class _Feed:
    """Forwards the observer hooks to the loggers."""

    def __init__(self, loggers: list[tuple[str, Any]], session: Session):
        self.loggers, self.session = loggers, session

    def _each(self, method: str, *args: Any) -> None:
        for path, logger in self.loggers:
            _call(path, logger, method, *args)

    @hookimpl
    def corex_epoch_end(self, stage: str, metrics: Mapping[str, Any]) -> None:
        step = sum(int(row.get("steps", 0)) for row in self.session.metrics.rows())
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch",)}
        self._each("log_metrics", stage, step, numbers)

    @hookimpl
    def corex_stage_end(self, stage: str, results: Mapping[str, Any]) -> None:
        self._each("log_results", stage, results)

    @hookimpl(trylast=True)  # after the report and the model card are written
    def corex_run_end(self) -> None:
        for name in ARTIFACTS:
            if (self.session.out / name).is_file():
                self._each("log_artifact", self.session.out / name)


@contextlib.contextmanager
def attached_loggers(session: Session, resumed: bool) -> Iterator[None]:
    """Build, restore and start the recipe's loggers (rank 0), feed them while the run lasts, close them."""
    components = session.recipe.components.get("loggers", [])
    if not components or not session.main:
        yield
        return
    loggers = [(f"loggers[{i}]", build_component(session.registry, "loggers", component, f"loggers[{i}]", run_dir=session.out))
               for i, component in enumerate(components)]
    state_path = session.out / STATE_FILE
    saved = rundir.read_json(state_path) if resumed and state_path.is_file() else {}
    feed = _Feed(loggers, session)
    params = {key: _plain(value) for key, value in flatten(session.recipe.resolved(DEFAULT_CACHE)).items()}
    pm = session.registry.pm
    try:
        for path, logger in loggers:
            if path in saved:
                _call(path, logger, "load_state_dict", saved[path])
        feed._each("start", params, resumed)
        rundir.write_json(state_path, {path: logger.state_dict() for path, logger in loggers})
        pm.register(feed, name="corex-loggers")
        yield
    finally:
        if pm.is_registered(feed):
            pm.unregister(feed)
        for _, logger in loggers:
            with contextlib.suppress(Exception):  # closing must not hide the run's own error
                logger.close()


__all__ = ["attached_loggers"]
