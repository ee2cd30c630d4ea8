"""Small helpers shared by the evaluators: metric-safe names and atomic file writes.

Every artefact goes through :func:`corex.rundir.atomic_path`, so a reader (or a run that crashes
half-way) never sees a truncated file.
Figures are drawn on a bare :class:`matplotlib.figure.Figure`, which renders PNGs with the Agg
backend and never touches pyplot's global state or a display.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Sequence
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


def short_id(identifier: object) -> str:
    """An image id short enough for a panel title (DICOM UIDs run to 64 characters)."""
    name = str(identifier)
    return name if len(name) <= 20 else "…" + name[-19:]


def save_gallery(path: Path, examples: Sequence[dict[str, Any]], draw: Callable[[Any, dict[str, Any]], str], title: str) -> None:
    """A grid of example radiographs, four a row, written atomically.

    Each panel shows ``example["image"]`` in grey; ``draw(axes, example)`` adds the overlays and
    returns the caption shown under the image id.
    """
    columns = min(4, len(examples))
    rows = math.ceil(len(examples) / columns)
    figure = Figure(figsize=(3 * columns, 3.3 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat:
        axes.set_axis_off()
    for axes, example in zip(grid.flat, examples):
        axes.imshow(example["image"], cmap="gray", vmin=0, vmax=1)
        caption = draw(axes, example)
        axes.set_title(f"{short_id(example['image_id'])}\n{caption}", fontsize=8)
    figure.suptitle(title)
    save_figure(figure, path)
