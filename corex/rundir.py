"""The run directory: atomic writes, the metrics log, curves and a README for humans."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

RUN_README = """\
# corex run: {name}

Made by `corex run` from the recipe below (recipe.yaml holds it fully resolved).

| file | what it holds |
|---|---|
| recipe.yaml | the resolved recipe: every default filled in, overrides applied |
| plugins.json | every plugin with its version and the components it provides |
| data.json | images, studies and patients per split and class |
| metrics.jsonl | one JSON line per epoch of every train/pretrain stage |
| results.json | the final metrics of every stage (best checkpoint for train stages) |
| curves.png | training loss and validation metrics per epoch |
| checkpoints/STAGE/ | last.pt (resume), best.pt (best validation), model.pt (what later stages start from) |
| STAGE/ | what a stage's evaluators and objective wrote: plots, tables, predictions |

Resume an interrupted run with `corex run {recipe} --out {out} --resume`.
Export an encoder with `corex export {out} --stage STAGE encoder.pt`.
"""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Every file corex or a plugin writes into a run directory goes through this, so a crash (or
    a reader) never sees half a checkpoint, table or plot::

        with atomic_path(out / "table.csv") as tmp:
            tmp.write_text(text)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads as "not measurable"
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


class MetricsLog:
    """``metrics.jsonl``: appended once per epoch; rows after a resume point are dropped."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(_jsonable(row)) + "\n")

    def truncate(self, keep: Iterable[str], stage: str, last_epoch: int) -> None:
        """Keep the rows of finished stages ``keep`` and of ``stage`` up to ``last_epoch``."""
        keep = set(keep)
        rows = [
            r for r in self.rows()
            if r.get("stage") in keep or (r.get("stage") == stage and r.get("epoch", 0) <= last_epoch)
        ]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))


# Validation metrics worth a line on the curves, best first; counts and per-class values are not.
HEADLINE = ("val/macro_f1", "val/balanced_accuracy", "val/auroc", "val/dice")


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per stage: training loss, validation loss and the other validation metrics."""
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    if not stages:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        stage_rows = [r for r in rows if r["stage"] == stage]
        epochs = [r["epoch"] for r in stage_rows]
        for key, style in (("train/loss", "-"), ("val/loss", "--")):
            values = [r.get(key) for r in stage_rows]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(stage)
        present = {k for r in stage_rows for k in r if k.startswith("val/")}
        others = [k for k in HEADLINE if k in present]
        if others:
            twin = ax.twinx()
            for key in others:
                twin.plot(epochs, [r.get(key) for r in stage_rows], ":", marker=".", label=key)
            twin.set_ylabel("validation metric")
            twin.set_ylim(0, 1)
            twin.legend(loc="lower right", fontsize=7)
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    plt.close(fig)
