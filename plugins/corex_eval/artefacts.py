"""Small helpers shared by the evaluators: metric-safe names and atomic file writes.

Every artefact goes through :func:`corex.rundir.atomic_path`, so a reader (or a run that crashes
half-way) never sees a truncated file.
Figures are drawn on a bare :class:`matplotlib.figure.Figure`, which renders PNGs with the Agg
backend and never touches pyplot's global state or a display.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from corex.rundir import atomic_path


def slug(name: str) -> str:
    """Lower-case ``name`` with runs of other characters turned into ``_``:
    ``"Negative for Pneumonia"`` becomes ``"negative_for_pneumonia"``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


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
