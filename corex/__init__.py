"""corex: a plugin-based framework for chest X-ray deep-learning studies.

The Python API mirrors the command line::

    import corex

    recipe = corex.load_recipe("recipes/quickstart.yaml", overrides=["stages.train.epochs=1"])
    results = corex.run(recipe, out="runs/try")          # same as `corex run`

and exposes the building blocks for custom studies and for plugins::

    source = corex.build_data(recipe)                     # the DataSource: splits, class names
    model = corex.build_model(recipe, len(source.class_names))
    loader = corex.make_loader(source.split("test"), batch_size=16, shuffle=False)
    metrics, intervals = corex.evaluate(model, loader, ["classification"], source.class_names)

What a plugin may import from the core is this package's ``__all__`` and the ``__all__`` of the
modules in :data:`PUBLIC_MODULES` (docs/python-api.md); everything else is private and may change.
The names below are imported on first use, so ``import corex`` imports no torch.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corex.hookspecs import hookimpl

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset

    from corex.model import CorexModel
    from corex.schema import Recipe

__version__ = "0.2.0"

# The core modules a plugin may import from, each through its __all__.
PUBLIC_MODULES = ("corex.binding", "corex.checkpoints", "corex.contract", "corex.errors", "corex.hookspecs", "corex.interfaces", "corex.kinds",
                  "corex.lazy", "corex.metrics", "corex.plugins", "corex.progress", "corex.recipe", "corex.rundir", "corex.testing")

# Building blocks, by the module that defines them (read on first use).
_LAZY = {
    "CorexError": "corex.errors", "RecipeError": "corex.errors", "RunFailure": "corex.errors",
    "Component": "corex.schema", "Recipe": "corex.schema", "Stage": "corex.schema", "Data": "corex.schema",
    "find_recipe": "corex.recipe",
    "CorexModel": "corex.model", "encoder_state": "corex.model", "load_encoder_file": "corex.model",
    "assemble_model": "corex.build", "build_component": "corex.build", "build_evaluators": "corex.build",
    "evaluate_split": "corex.evaluation", "evaluate_loader": "corex.evaluation",
    "resolve_device": "corex.loaders", "steps_per_epoch": "corex.loaders",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        return getattr(import_module(module), name)
    try:  # a submodule not imported yet (corex.recipe ...), as after `import corex.recipe`
        return import_module(f"corex.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'corex' has no attribute {name!r}") from None


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


def build_data(recipe: Recipe, registry: Any = None, stage: Any = None):
    """The recipe's DataSource (see :class:`corex.interfaces.DataSource`), or ``stage``'s own."""
    from corex.build import build_data as _build

    return _build(recipe, registry, stage)


def build_model(recipe: Recipe, num_classes: int, registry: Any = None) -> CorexModel:
    """The recipe's encoder and heads, freshly initialised (load a checkpoint's ``model`` to restore)."""
    from corex.build import build_model as _build

    return _build(recipe, num_classes, registry)


def make_loader(dataset: Dataset, batch_size: int = 16, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader that batches corex items the way the engine does."""
    import torch

    from corex.loaders import make_loader as _make

    return _make(dataset, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers, device=torch.device("cpu"))


def evaluate(model: CorexModel, loader: DataLoader, heads: list[str], class_names: list[str], evaluators: list[str | dict[str, Any]] | None = None,
             out: str | Path | None = None, device: str = "auto") -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Run registered evaluators (default: one per head name) over ``loader``; returns (metrics, intervals)."""
    from corex.evaluation import evaluate_model

    return evaluate_model(model, loader, heads, class_names, evaluators, out=out, device=device)


__all__ = ["PUBLIC_MODULES", "__version__", "build_data", "build_model", "evaluate", "hookimpl", "load_recipe", "make_loader", "run",
           *sorted(_LAZY)]
