"""``curves.png``: a run's training and validation curves per stage, the selected epoch marked."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from corex.rundir import atomic_path

LOSSES = ("train/loss", "val/loss")


def plot_curves(rows: list[dict[str, Any]], path: Path, *, selected: Mapping[str, tuple[str, int | None]] | None = None,
                metrics: Sequence[str] = ()) -> None:
    """Per stage, the losses above and the validation metrics below, by epoch.

    ``metrics`` are the validation metrics worth a line (``val/<name>``; the declared headline
    metrics in [0, 1], see :mod:`corex.metrics`); ``selected`` maps a stage to the metric its best
    epoch was chosen on and that epoch, which is marked with a vertical line and a star on that
    metric. Every series has its own colour, and legends sit below the panels so that they cover no data.
    """
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    if not stages:
        return
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    selected = dict(selected or {})
    present = {k for r in rows for k in r}
    chosen = [f"val/{metric}" for metric, _ in selected.values() if metric != "loss"]
    metric_keys = [k for k in dict.fromkeys([*(f"val/{m}" for m in metrics), *chosen]) if k in present]
    palette = colormaps["tab10"]
    colours = {key: palette(i % 10) for i, key in enumerate((*LOSSES, *metric_keys))}
    with_metrics = bool(metric_keys)
    figure = Figure(figsize=(5.2 * len(stages), 6.4 if with_metrics else 3.9), layout="constrained")
    grid = figure.subplots(2 if with_metrics else 1, len(stages), squeeze=False, sharex="col")
    for column, stage in enumerate(stages):
        stage_rows = [r for r in rows if r["stage"] == stage]
        epochs = [r["epoch"] for r in stage_rows]
        loss_axes = grid[0, column]
        panels = [(loss_axes, LOSSES)] + ([(grid[1, column], tuple(metric_keys))] if with_metrics else [])
        for axes, keys in panels:
            for key in keys:
                values = [r.get(key) for r in stage_rows]
                if any(v is not None for v in values):
                    values = [float("nan") if v is None else v for v in values]
                    style = "--" if key == "val/loss" else "-"
                    axes.plot(epochs, values, style, marker="o", markersize=3, color=colours[key], label=key)
        loss_axes.set(ylabel="loss", title=f"stage '{stage}'")
        if with_metrics:
            grid[1, column].set(ylabel="validation metric", ylim=(0, 1.02))
        grid[-1, column].set_xlabel("epoch")
        grid[-1, column].xaxis.set_major_locator(MaxNLocator(integer=True))
        best = best_epoch(stage_rows, *selected.get(stage, (None, None)))
        if best is not None:
            epoch, key, value, label = best
            for axes, keys in panels:
                axes.axvline(epoch, color="black", linestyle=":", linewidth=1.2, label=label if key in keys else None)
                if key in keys:
                    axes.plot([epoch], [value], marker="*", markersize=13, color="black", linestyle="none", clip_on=False, zorder=5)
        lowest = loss_axes
        for axes, _ in panels[1:]:
            if axes.get_legend_handles_labels()[0]:
                lowest = axes
            else:  # e.g. a pretrain stage: no validation
                axes.set_axis_off()
                axes.text(0.5, 0.5, "no validation metrics in this stage", ha="center", va="center",
                          transform=axes.transAxes, color="grey")
                loss_axes.tick_params(labelbottom=True)
                loss_axes.set_xlabel("epoch")
        for axes, _ in panels:
            if axes.get_legend_handles_labels()[0]:
                # Below the panel, clear of the epoch axis where this panel carries it.
                axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2 if axes is lowest else -0.08),
                            ncols=2, fontsize=7, frameon=False)
    figure.suptitle("Training curves")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")


def best_epoch(rows: list[dict[str, Any]], metric: str | None, epoch: int | None) -> tuple[int, str, float, str] | None:
    """The selected epoch of a stage as ``(epoch, key, value, legend label)``, from the metric it was
    selected on; None when nothing was selected (a pretrain stage, or no finite value)."""
    if metric is None or epoch is None:
        return None
    key = f"val/{metric}"
    value = next((r.get(key) for r in rows if r.get("epoch") == epoch), None)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return epoch, key, float(value), f"selected epoch {epoch}: {key} {value:.3f}"


__all__ = ["best_epoch", "plot_curves"]
