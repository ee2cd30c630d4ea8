"""An observer plugin: every epoch's metrics and every stage's results as CSV in the run directory.

* ``epochs.csv``: one row per epoch of every train/pretrain stage (the ``metrics.jsonl`` row:
  ``stage``, ``epoch``, training losses, learning rate, images/s, ``val/...`` metrics), rewritten
  after each epoch;
* ``results.csv``: at the end of the run, one row per stage with its final metrics.

Columns are the union of the keys seen, in order of appearance (a pretrain stage logs other
metrics than a train stage; a cell is empty where a row has no value). Both files are written
whole through :func:`corex.rundir.atomic_path`, so a spreadsheet open on them never sees half a
row, and ``--resume`` works: the rows already in ``epochs.csv`` are read back and an epoch that
runs again replaces its row.

Not an entry point (an installed observer would run in every run of the environment); switch it
on for a run with::

    COREX_PLUGINS=corex_example.csv_logger corex run examples/corex-example-plugin/recipes/example.yaml
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from corex import hookimpl

EPOCHS = "epochs.csv"
RESULTS = "results.csv"


@hookimpl
def corex_epoch_end(run, stage: str, epoch: int, metrics: Mapping[str, Any]) -> None:
    path = Path(run.out) / EPOCHS
    rows = [row for row in read_rows(path) if (row.get("stage"), row.get("epoch")) != (stage, str(epoch))]
    rows.append({"stage": stage, "epoch": epoch, **metrics})
    write_rows(path, rows)


@hookimpl
def corex_run_end(run, results: Mapping[str, Any]) -> None:
    rows = []
    for stage, result in results.get("stages", {}).items():
        rows.append({"stage": stage, "kind": result.get("kind", ""), "split": result.get("split", ""), **result.get("metrics", {})})
    write_rows(Path(run.out) / RESULTS, rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    from corex.rundir import atomic_path  # imports torch: only when a run is under way

    rows = list(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
