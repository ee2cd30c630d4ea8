"""Where the model looked, as PNGs a reader understands.

Grad-CAM (Selvaraju et al., ICCV 2017) of the *predicted* class, computed by the evaluators' own
:meth:`corex_eval.localization.LocalizationEvaluator.grad_cam`, over the radiograph in grey with a
colour bar; and, when the model has a segmentation head, the predicted opacity probability with
its 0.5 outline. Only the image region is drawn (the air padding of the working square is cut).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from corex_eval import LocalizationEvaluator, save_figure
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from corex.errors import CorexError

MIN_MAP_SIDE = 8  # a coarser Grad-CAM map says little more than "somewhere in this half"


def default_level(strides: list[int], image_size: int) -> int:
    """The deepest pyramid level whose map has at least :data:`MIN_MAP_SIDE` pixels a side (as the
    quickstart's ``localization`` evaluator uses ``level: -2`` at 128 px), else the finest."""
    for level in range(-1, -len(strides) - 1, -1):
        if image_size // strides[level] >= MIN_MAP_SIDE:
            return level
    return -len(strides)


def grad_cam(model: Any, head: str, class_names: list[str], images: Tensor, classes: Tensor, level: int | None = None) -> Tensor:
    """Grad-CAM maps ``(B, 1, H, W)`` in ``[0, 1]`` of the logits of ``classes`` at pyramid
    ``level`` (default: :func:`default_level`)."""
    if level is None:
        level = default_level(list(model.encoder.strides), images.shape[-1])
    explainer = LocalizationEvaluator(class_names=class_names, head=head, level=level, bootstrap=0, max_examples=0)
    try:
        return explainer.grad_cam(model, images, classes)
    except ValueError as exc:
        raise CorexError(f"--saliency: {exc}") from None


def overlay_name(index: int, file: str) -> str:
    """A unique, readable PNG name for the ``index``-th input file."""
    stem = re.sub(r"[^0-9A-Za-z._-]+", "_", Path(file).stem)[:60] or "image"
    return f"{index:05d}-{stem}.png"


def save_overlay(
    path: Path,
    image: np.ndarray,
    *,
    title: str,
    cam: np.ndarray | None,
    cam_title: str,
    opacity: np.ndarray | None = None,
    opacity_title: str = "",
) -> None:
    """One PNG: the Grad-CAM panel and, given ``opacity``, the opacity panel, each with a colour bar."""
    panels = [(cam, cam_title, "jet", "Grad-CAM (relative)")] if cam is not None else []
    if opacity is not None:
        panels.append((opacity, opacity_title, "magma", "opacity probability"))
    figure = Figure(figsize=(4.2 * max(1, len(panels)), 4.6), layout="constrained")
    axes_row = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for axes, (values, panel_title, cmap, label) in zip(axes_row, panels):
        axes.imshow(image, cmap="gray", vmin=0, vmax=1)
        axes.imshow(values, cmap=cmap, vmin=0, vmax=1, alpha=0.45)
        if label == "opacity probability" and (values > 0.5).any():
            axes.contour(values, levels=[0.5], colors="cyan", linewidths=1)
        # The bar shows the colour scale itself, not its blend with the radiograph.
        scale = ScalarMappable(norm=Normalize(0, 1), cmap=cmap)
        figure.colorbar(scale, ax=axes, fraction=0.046, pad=0.02, label=label)
        axes.set_title(panel_title, fontsize=9)
        axes.set_axis_off()
    figure.suptitle(title, fontsize=9)
    save_figure(figure, path)


def crop(values: Tensor, region: tuple[slice, slice]) -> np.ndarray:
    return values.detach().float().cpu().numpy()[region].copy()


__all__ = ["crop", "default_level", "grad_cam", "overlay_name", "save_overlay"]
