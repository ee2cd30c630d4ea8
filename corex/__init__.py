"""corex: a plugin-based framework for chest X-ray deep-learning studies.

The Python API mirrors the command line::

    import corex

    recipe = corex.load_recipe("recipes/quickstart.yaml", overrides=["stages.train.epochs=1"])
    results = corex.run(recipe, out="runs/try")          # same as `corex run`

and exposes the building blocks for custom studies::

    source = corex.build_data(recipe)                     # the DataSource: splits, class names
    model = corex.build_model(recipe, len(source.class_names))
    loader = corex.make_loader(source.split("test"), batch_size=16, shuffle=False)
    metrics, intervals = corex.evaluate(model, loader, ["classification"], source.class_names)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from corex.hookspecs import hookimpl

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset

    from corex.engine import CorexModel
    from corex.recipe import Recipe

__version__ = "0.1.0"


def load_recipe(source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load and validate a recipe file or mapping; raises ``RecipeError`` listing every problem."""
    from corex.recipe import load_recipe as _load

    return _load(source, overrides)


def run(recipe: Recipe | str | Path, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
        progress: bool | None = None) -> dict[str, Any]:
    """Run every stage of ``recipe`` into ``out``; returns the content of ``results.json``.

    ``resume`` continues the run in ``out`` (or extends it when a stage's ``epochs`` grew);
    ``overwrite`` deletes what ``out`` holds first; ``progress=False`` shows none.
    """
    from corex.engine import run as _run

    if not hasattr(recipe, "stages"):
        recipe = load_recipe(recipe)
    return _run(recipe, out, resume=resume, overwrite=overwrite, progress=progress)


def build_data(recipe: Recipe):
    """The recipe's DataSource (see :class:`corex.interfaces.DataSource`)."""
    from corex.engine import build_data as _build

    return _build(recipe)


def build_model(recipe: Recipe, num_classes: int) -> CorexModel:
    """The recipe's encoder and heads, freshly initialised (load a checkpoint's ``model`` to restore)."""
    from corex.engine import build_model as _build

    return _build(recipe, num_classes)


def make_loader(dataset: Dataset, batch_size: int = 16, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader that batches corex items the way the engine does."""
    import torch

    from corex.engine import make_loader as _make

    return _make(dataset, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers, device=torch.device("cpu"))


def evaluate(model: CorexModel, loader: DataLoader, heads: list[str], class_names: list[str], evaluators: list[str | dict[str, Any]] | None = None,
             out: str | Path | None = None, device: str = "auto") -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Run registered evaluators (default: one per head name) over ``loader``; returns (metrics, intervals)."""
    from corex.engine import evaluate_model

    return evaluate_model(model, loader, heads, class_names, evaluators, out=out, device=device)


__all__ = ["__version__", "build_data", "build_model", "evaluate", "hookimpl", "load_recipe", "make_loader", "run"]
