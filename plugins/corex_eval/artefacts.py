"""Small helpers shared by the evaluators: metric-safe names and atomic file writes.

Every artefact goes through :func:`corex.rundir.atomic_path`, so a reader (or a run that crashes
half-way) never sees a truncated file.
Figures are drawn on a bare :class:`matplotlib.figure.Figure`, which renders PNGs with the Agg
backend and never touches pyplot's global state or a display.
"""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from corex.metrics import slug  # noqa: F401 -- the convention of metric and column names, re-exported
from corex.rundir import atomic_path


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


def save_gallery(
    path: Path,
    examples: Sequence[dict[str, Any]],
    draw: Callable[[Any, dict[str, Any]], str],
    title: str,
    *,
    legend: Sequence[Any] = (),
    note: str | None = None,
    colorbar: tuple[str, str] | None = None,
) -> None:
    """A grid of example radiographs, four a row, written atomically.

    Each panel shows ``example["image"]`` in grey; ``draw(axes, example)`` adds the overlays and
    returns the caption shown under the image id. ``legend`` (matplotlib artists with labels) and
    ``note`` (a sentence on how to read the panels) go below the grid, outside every image;
    ``colorbar`` ``(colormap, label)`` adds a colour scale for overlays drawn on ``[0, 1]``.
    """
    columns = min(4, len(examples))
    rows = math.ceil(len(examples) / columns)
    extra = 0.3 * bool(legend) + 0.3 * bool(note)
    figure = Figure(figsize=(3 * columns + 0.8 * bool(colorbar), 3.3 * rows + 0.4 + extra), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat:
        axes.set_axis_off()
    for axes, example in zip(grid.flat, examples):
        axes.imshow(example["image"], cmap="gray", vmin=0, vmax=1)
        caption = draw(axes, example)
        axes.set_title(f"{short_id(example['image_id'])}\n{caption}", fontsize=8)
    if colorbar:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        cmap, label = colorbar
        figure.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=grid, label=label, shrink=0.8, location="right")
    # The note is the legend's title so that the layout keeps the two apart.
    note = textwrap.fill(note, 40 * columns) if note else None
    if legend:
        figure.legend(handles=list(legend), loc="outside lower center", ncols=len(legend), fontsize=8,
                      frameon=False, title=note, title_fontsize=8)
    elif note:
        figure.supxlabel(note, fontsize=8)
    figure.suptitle(title)
    save_figure(figure, path)
