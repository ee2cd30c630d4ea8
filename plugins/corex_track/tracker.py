"""The ``mlflow`` logger: one MLflow run per corex run, through ``mlflow.tracking.MlflowClient``.

* ``start``: the experiment (default: the recipe's name) is created when missing, then a run
  (named after the run directory, tagged ``corex.run_dir``) whose parameters are the resolved
  recipe, flattened (``stages.train.epochs``). Keys keep to MLflow's characters (letters, digits,
  ``_ - . space``; ``evaluators[0]`` becomes ``evaluators.0``, anything else ``_``) and length
  (250); values longer than the installed MLflow's limit (6000 characters in recent releases) are
  cut and end with ``...``; a list stays one value.
* ``log_metrics``: ``STAGE/KEY`` at the step count over all stages, the key's own slashes written
  as dots (``train/val.macro_f1``, ``train/train.loss.classification``): MLflow's file store keeps a
  metric as a file named after it, so ``test/auroc`` could not also be the folder of
  ``test/auroc/negative``.
* ``log_results``: ``STAGE/METRIC``, ``STAGE/METRIC.low``, ``STAGE/METRIC.high`` at the last step
  (``test/macro_f1``, ``test/macro_f1.low``, ``test/f1.typical``).
* ``log_artifact``: the file, into the run's artifacts.
* ``close``: the run ends ``FINISHED``, ``KILLED`` (interrupted) or ``FAILED``.

A resumed run (``loggers.json`` holds the run id) reopens the same MLflow run, marks it running
again and logs only the parameters it does not hold yet; a value that changed (an extended run's
``stages.train.epochs``) is kept as the tag ``resumed/KEY``, since MLflow never changes a
parameter. The default store is a folder, ``file:RUN/mlruns``; MLflow 3 asks for the environment
variable ``MLFLOW_ALLOW_FILE_STORE=true`` before it opens one, which this logger sets (unless it is
set already) when its tracking URI is a folder.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from corex.errors import CorexError
from corex.progress import log

from corex_track.common import local_path, make_folder, number, require, result_scalars, steps_so_far

DEFAULT_STORE = "mlruns"
KEY_LIMIT = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
TAG_VALUE_LIMIT = 8000  # MLflow's MAX_TAG_VAL_LENGTH
BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH (metrics may go 1000 at a time; 100 is enough)
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
SERVERS = ("http", "https")
_INDEX = re.compile(r"\[(\d+)\]")
_BAD = re.compile(r"[^\w./\- ]")  # what MLflow accepts in a key on every platform (Windows refuses ':')
_KEY = re.compile(r"^[\w./\- ]+$")


def mlflow_key(key: str, *, group: bool = False) -> str:
    """``key`` made acceptable to MLflow as a parameter, metric or tag name.

    ``a[0].b`` becomes ``a.0.b`` and other characters MLflow refuses ``_``. MLflow's file store keeps
    a metric ``test/auroc`` as the file ``metrics/test/auroc``, so it cannot also keep
    ``test/auroc/negative``: slashes become ``.``, except, with ``group``, the first one
    (``test/auroc.negative``), by which MLflow's UI groups its charts. At most 250 characters.
    """
    text = _BAD.sub("_", _INDEX.sub(r".\1", str(key)))
    head, slash, rest = text.partition("/")
    text = head + slash + rest.replace("/", ".") if group else text.replace("/", ".")
    parts = ["__" if part == ".." else part for part in text.split("/") if part not in ("", ".")]
    return ("/".join(parts) or "_")[:KEY_LIMIT].rstrip("/") or "_"


def parse_tracking_uri(tracking_uri: str | None, run_dir: Path) -> tuple[str, Path | None]:
    """``(uri, folder)``: the URI MLflow gets and, for a file store, its folder.

    A folder (``file:PATH`` or a plain path; relative to the run directory) becomes an absolute
    ``file://`` URI; ``http(s)://HOST``, ``databricks`` and database URIs pass as they are. Anything
    else is a ValueError, which corex reports as a recipe problem at the logger's path.
    """
    if tracking_uri is None:
        folder = local_path(DEFAULT_STORE, run_dir)
        return folder.as_uri(), folder
    text = tracking_uri.strip()
    if not text:
        raise ValueError("tracking_uri is empty; leave it out for a file store in RUN/mlruns")
    if text == "databricks" or text.startswith("databricks://"):
        return text, None
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in SERVERS:
        if not parts.netloc:
            raise ValueError(f"tracking_uri '{tracking_uri}' names no host; write it as {scheme}://HOST:PORT")
        return text, None
    if scheme.split("+")[0] in DATABASES:
        return text, None
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"tracking_uri '{tracking_uri}': a file: URI names a folder on this machine (file:/PATH or file:///PATH), "
                             f"not on host '{parts.netloc}'")
        path = unquote(parts.path)
        if not path:
            raise ValueError(f"tracking_uri '{tracking_uri}' names no folder")
    elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # a plain path (C:\... on Windows)
        path = text
    else:
        raise ValueError(f"tracking_uri '{tracking_uri}': unknown scheme '{parts.scheme}'; use a folder (file:PATH or a plain path) "
                         "for a file store, http(s)://HOST:PORT for a tracking server, databricks, or a database URI "
                         "(sqlite:///FILE.db, postgresql://...)")
    folder = local_path(path, run_dir)
    return folder.as_uri(), folder


def _check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, value in tags.items():
        if not _KEY.match(key) or len(key) > KEY_LIMIT or posixpath.normpath(key) != key or key in (".", ".."):
            raise ValueError(f"tags: '{key}' is not a valid MLflow tag name (letters, digits, _ - . / and spaces, at most "
                             f"{KEY_LIMIT} characters, no empty, '.' or '..' part between slashes)")
        if len(str(value)) > TAG_VALUE_LIMIT:
            raise ValueError(f"tags.{key}: {len(str(value))} characters; MLflow keeps at most {TAG_VALUE_LIMIT}")
        out[key] = str(value)
    return out


def _param_value(value: Any, limit: int) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MlflowLogger:
    """Logs one corex run as one MLflow run (see the module's docstring)."""

    def __init__(self, *, run_dir: Path, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None):
        self.run_dir = Path(run_dir)
        self.tracking_uri, self.store = parse_tracking_uri(tracking_uri, self.run_dir)
        if experiment is not None and not experiment.strip():
            raise ValueError("experiment is empty; leave it out to name the experiment after the recipe")
        if run_name is not None and not run_name.strip():
            raise ValueError("run_name is empty; leave it out to name the MLflow run after the run directory")
        self.experiment, self.run_name = experiment, run_name
        self.tags = _check_tags(tags or {})
        require("mlflow", "mlflow", "mlflow (mlflow-skinny is enough)")
        scheme = urlsplit(self.tracking_uri).scheme.split("+")[0].lower()
        if scheme in DATABASES and importlib.util.find_spec("sqlalchemy") is None:
            raise CorexError(f"loggers: mlflow tracking_uri '{self.tracking_uri}' is a database, which needs the full MLflow "
                             "(with SQLAlchemy), not only mlflow-skinny: pip install mlflow; or leave tracking_uri out "
                             "for a file store in RUN/mlruns")
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.step = 0
        self._client: Any = None
        self._keys: dict[str, dict[str, str]] = {"param": {}, "metric": {}}

    # -- talking to MLflow ----------------------------------------------------------------------
    @contextmanager
    def _talking(self, doing: str) -> Iterator[None]:
        """MLflow's and the file system's errors as a CorexError naming the tracking URI."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, OSError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            raise CorexError(f"loggers: mlflow ({self.tracking_uri}) could not {doing}: {message}") from exc

    @property
    def client(self) -> Any:
        if self._client is None:
            if self.store is not None:
                make_folder(self.store, "loggers: mlflow tracking_uri")
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
            from mlflow.tracking import MlflowClient

            with self._talking("open the tracking store"):
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def key(self, name: str, *, metric: bool = False) -> str:
        """The MLflow key for the parameter or metric ``name`` (see :func:`mlflow_key`; a metric keeps
        its stage's slash); two names that clean to one key get ``_2``, ``_3`` ..."""
        keys = self._keys["metric" if metric else "param"]
        if name not in keys:
            key, n, taken = mlflow_key(name, group=metric), 1, set(keys.values())
            base = key
            while key in taken:
                n += 1
                key = f"{base[: KEY_LIMIT - len(str(n)) - 1]}_{n}"
            keys[name] = key
        return keys[name]

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.tracking_uri}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run_id = state.get("run_id") or None
        self.experiment_id = state.get("experiment_id") or None

    # -- the run --------------------------------------------------------------------------------
    def start(self, params: Mapping[str, Any], resumed: bool) -> None:
        client = self.client
        run = self._reopen() if resumed and self.run_id else None
        if run is None:
            name = self.experiment or str(params.get("name") or self.run_dir.name)
            self.experiment_id = self._experiment(name)
            with self._talking(f"create a run in experiment '{name}'"):
                run = client.create_run(self.experiment_id, run_name=self.run_name or self.run_dir.name,
                                        tags={"corex.run_dir": str(self.run_dir.absolute()), **self.tags})
            self.run_id = run.info.run_id
        else:
            with self._talking(f"reopen run {self.run_id}"):
                client.update_run(self.run_id, status="RUNNING")
            self.experiment_id = run.info.experiment_id
            self.step = steps_so_far(self.run_dir)
        self._log_params(params, dict(run.data.params))

    def _reopen(self) -> Any:
        """The run of ``loggers.json`` when the store still has it, else None (a new run is started)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(self.run_id)
        except MlflowException as exc:
            log(f"loggers: the MLflow run {self.run_id} this run started is not in {self.tracking_uri} "
                f"({getattr(exc, 'message', exc)}); logging to a new MLflow run")
            return None
        if run.info.lifecycle_stage != "active":
            log(f"loggers: the MLflow run {self.run_id} this run started was deleted; logging to a new MLflow run")
            return None
        return run

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client
        with self._talking(f"find experiment '{name}'"):
            found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return client.create_experiment(name)
            except MlflowException:  # created meanwhile by another run
                with self._talking(f"create experiment '{name}'"):
                    found = client.get_experiment_by_name(name)
                    if found is None:
                        raise
        if found.lifecycle_stage != "active":
            raise CorexError(f"loggers: mlflow experiment '{name}' in {self.tracking_uri} is deleted; restore it "
                             "(mlflow experiments restore) or name another with the logger's experiment option")
        return found.experiment_id

    def _log_params(self, params: Mapping[str, Any], held: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils import validation

        limit = int(getattr(validation, "MAX_PARAM_VAL_LENGTH", 500))
        new, changed = [], []
        for name, value in params.items():
            key, text = self.key(name), _param_value(value, limit)
            if key not in held:
                new.append(Param(key, text))
            elif held[key] != text:
                changed.append(RunTag(f"resumed/{key}", text[:TAG_VALUE_LIMIT]))
        with self._talking("log the recipe's parameters"):
            for i in range(0, len(new), BATCH):
                self.client.log_batch(self.run_id, params=new[i:i + BATCH])
            for i in range(0, len(changed), BATCH):
                self.client.log_batch(self.run_id, tags=changed[i:i + BATCH])

    def _log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(self.key(name, metric=True), value, now, step) for name, value in scalars.items()]
        with self._talking("log metrics"):
            for i in range(0, len(metrics), BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def log_metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        self._log_scalars({f"{stage}/{key}": number(value) for key, value in metrics.items() if number(value) is not None}, step)
        self.step = step

    def log_results(self, stage: str, result: Mapping[str, Any]) -> None:
        self._log_scalars(result_scalars(stage, result), self.step)

    def log_artifact(self, path: Path) -> None:
        with self._talking(f"keep '{path}' as an artifact"):
            self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        """End the MLflow run: FINISHED after a whole run, KILLED after an interruption, FAILED after an error."""
        if self._client is None or self.run_id is None:
            return
        error = sys.exc_info()[0]  # close() runs while the run's own exception, if any, propagates
        status = ("FINISHED" if error is None else "KILLED" if issubclass(error, (KeyboardInterrupt, SystemExit)) else "FAILED")
        self._client.set_terminated(self.run_id, status=status)

    def __repr__(self) -> str:
        return f"MlflowLogger(tracking_uri={self.tracking_uri!r}, run_id={self.run_id!r})"


__all__ = ["MlflowLogger", "mlflow_key", "parse_tracking_uri"]
