"""Small helpers shared by the evaluators: metric-safe names and atomic file writes.

Every artefact is written to a temporary file in the target directory and moved into place with
``os.replace``, so a reader (or a run that crashes half-way) never sees a truncated file.
Figures are drawn on a bare :class:`matplotlib.figure.Figure`, which renders PNGs with the Agg
backend and never touches pyplot's global state or a display.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def slug(name: str) -> str:
    """Lower-case ``name`` with runs of other characters turned into ``_``:
    ``"Negative for Pneumonia"`` becomes ``"negative_for_pneumonia"``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV table atomically."""
    with atomic_path(path) as temporary, temporary.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def save_figure(figure: Figure, path: Path) -> None:
    """Render ``figure`` to a PNG file atomically."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)


def number(value: float) -> str:
    """Format a float for a CSV cell: six significant digits, ``nan`` for missing values."""
    return f"{value:.6g}"
