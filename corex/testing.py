"""pytest fixtures for corex and for plugin authors (registered under the ``pytest11`` entry point).

Installing corex makes these fixtures available in every pytest run of the environment, with no
``conftest.py`` and no import:

``corex_pm``        a fresh process-wide plugin manager (:func:`corex.plugins.get_plugin_manager`
                    returns it for the whole test) with every *installed* plugin already loaded
                    from its ``corex`` entry point, ``COREX_PLUGINS`` applied, and the ``toy``
                    dataset added. Your installed plugin is therefore already there: do not
                    register it again (pluggy refuses a module registered twice, which corex
                    reports as a PluginError); look its components up with
                    ``corex.plugins.Registry(corex_pm)``.
``corex_plugin``    for a plugin that is *not* installed (a module or class defined in a test, a
                    development copy): ``pm = corex_plugin(my_module, name="mine")`` registers it
                    into ``corex_pm``, runs the hook-name check that plain
                    ``corex.plugins.register`` skips (:func:`corex.plugins.check`: a misspelt
                    hook such as ``corex_encoder`` fails here instead of being ignored), and
                    returns the manager. It is unregistered when the test ends.
``tiny_recipe``     a recipe mapping for a seconds-long multi-task run on the toy data with a tiny
                    ResNet; tweak it, then ``corex.load_recipe(tiny_recipe)``.
``corex_cli``       runs the ``corex`` command line in-process: ``code, out, err = corex_cli("validate", path)``.

Two checks of a plugin's shape, for its own tests:

``assert_light("my_plugin")``      importing the package, calling its registration and ``corex_cli``
                                   hooks and reading every factory's signature and annotations (what
                                   ``corex --help``, ``corex plugins`` and ``corex validate --no-build``
                                   do) imports no torch, numpy, kornia ... (checked in a fresh interpreter);
``assert_mirrors(factory, Class)``  a light factory takes exactly its implementation's options: the same
                                   names, kinds and defaults, so the two cannot drift apart.

It also registers the ``slow`` marker (``@pytest.mark.slow``, for end-to-end runs), so a plugin's
test suite can mark its runs without declaring the marker itself; ``-m "not slow"`` skips them.

The ``toy`` dataset (:class:`ToySource`) is learnable by construction: each class puts a bright
square in its own quadrant, and the square is the opacity mask.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from corex.hookspecs import hookimpl

TOY_CLASSES = ("negative", "typical", "indeterminate", "atypical")


class ToyDataset:
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class ToySource:
    """Class ``k`` draws a bright square in quadrant ``k`` on noise; the square is the mask."""

    class_names = TOY_CLASSES

    def __init__(self, *, image_size: int, seed: int, studies: int = 64, noise: float = 0.1):
        import torch

        if studies < 12:
            raise ValueError(f"studies must be at least 12 (4 classes in 3 splits), got {studies}")
        self.normalization = {"range": [0, 1], "source": "synthetic toy squares"}
        generator = torch.Generator().manual_seed(seed)
        size = image_size
        half, side = size // 2, size // 4
        items = []
        for i in range(studies):
            label = i % 4
            image = torch.rand(1, size, size, generator=generator) * noise
            mask = torch.zeros(1, size, size)
            top = (label // 2) * half + int(torch.randint(0, half - side, (1,), generator=generator))
            left = (label % 2) * half + int(torch.randint(0, half - side, (1,), generator=generator))
            mask[:, top:top + side, left:left + side] = 1.0
            image = (image + 0.8 * mask).clamp(0, 1)
            items.append({
                "image": image, "label": torch.tensor(label), "mask": mask, "has_mask": torch.tensor(True),
                "study_id": f"s{i}", "image_id": f"i{i}", "patient_id": f"p{i}",
            })
        # Every 5th study to val, every 5th+1 to test: all classes in all splits.
        self._splits = {
            "train": [it for i, it in enumerate(items) if i % 5 > 1],
            "val": [it for i, it in enumerate(items) if i % 5 == 0],
            "test": [it for i, it in enumerate(items) if i % 5 == 1],
        }

    def split(self, name: str, label_fraction: float = 1.0) -> ToyDataset:
        items = self._splits[name]
        if label_fraction < 1.0:
            keep = max(4, round(len(items) * label_fraction))
            items = items[:keep]
        return ToyDataset(items)

    def describe(self) -> dict[str, Any]:
        out = {}
        for name, items in self._splits.items():
            counts = {c: sum(1 for it in items if int(it["label"]) == k) for k, c in enumerate(TOY_CLASSES)}
            out[name] = {"images": len(items), "studies": len(items), "patients": len(items), "classes": counts}
        return out

    def skipped(self) -> list[dict[str, Any]]:
        return []


class ToyPlugin:
    """Registers the ``toy`` dataset."""

    __version__ = "test"

    @staticmethod
    @hookimpl
    def corex_datasets():
        return {"toy": ToySource}


def tiny_recipe_dict() -> dict[str, Any]:
    """A multi-task recipe that trains in a few seconds on the toy data."""
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"name": "toy", "image_size": 32, "batch_size": 8, "studies": 160},
        "model": {"encoder": {"name": "resnet18", "width": 8}},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "stages": {
            "train": {
                "kind": "train",
                "epochs": 2,
                "heads": {"classification": {"weight": 1.0}, "segmentation": {"weight": 0.5}},
                "evaluators": [{"name": "classification", "bootstrap": 0}, "segmentation"],
                "select": "macro_f1",
            },
            "test": {"kind": "evaluate", "split": "test", "evaluators": [{"name": "classification", "bootstrap": 50}, "segmentation"]},
        },
    }


# Modules that cost seconds to import and that no light command needs.
HEAVY = ("torch", "kornia", "torchmetrics", "numpy", "scipy", "matplotlib", "pydicom", "PIL", "keras", "keras_core")


def assert_light(package: str, heavy: Sequence[str] = HEAVY) -> None:
    """Fail unless loading ``package`` as ``corex --help`` and ``corex plugins`` do leaves ``heavy`` unimported."""
    code = textwrap.dedent(f"""
        import argparse, importlib, inspect, sys
        from corex.binding import type_hints
        from corex.kinds import KINDS

        module = importlib.import_module({package!r})
        for kind in KINDS.values():
            for factory in getattr(module, kind.hook, lambda: {{}})().values():
                inspect.signature(factory), type_hints(factory)
        if hasattr(module, "corex_cli"):
            parser = argparse.ArgumentParser()
            commands = parser.add_subparsers()
            data_commands = commands.add_parser("data").add_subparsers()
            offered = {{"commands": commands, "data_commands": data_commands}}
            module.corex_cli(**{{k: v for k, v in offered.items() if k in inspect.signature(module.corex_cli).parameters}})
        print(",".join(sorted(set({list(heavy)!r}) & set(sys.modules))))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"loading {package} failed:\n{result.stderr[-3000:]}")
    if result.stdout.strip():
        pytest.fail(f"loading {package} and reading its factories imported {result.stdout.strip()}: import them inside "
                    "the factories and hook bodies instead (docs/writing-a-plugin.md)")


def assert_mirrors(factory: Callable[..., Any], implementation: Callable[..., Any]) -> None:
    """Fail unless ``factory`` takes exactly ``implementation``'s options (names, kinds, defaults)."""

    def options(function: Callable[..., Any]) -> list[tuple[str, str, Any]]:
        return [(p.name, p.kind.description, p.default) for p in inspect.signature(function).parameters.values()]

    ours, theirs = options(factory), options(implementation)
    if ours != theirs:
        only_ours = [o for o in ours if o not in theirs]
        only_theirs = [o for o in theirs if o not in ours]
        pytest.fail(f"{factory.__qualname__} and {implementation.__qualname__} differ: the factory has {only_ours or 'nothing more'}, "
                    f"the implementation has {only_theirs or 'nothing more'}" + ("" if only_ours or only_theirs else " (in another order)"))


SLOW_MARKER = "slow: end-to-end runs (still seconds, tiny models); deselect with -m 'not slow'"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", SLOW_MARKER)


@pytest.fixture
def corex_pm():
    """The process-wide plugin manager, fresh for this test: installed plugins loaded, ``toy`` added."""
    from corex.plugins import get_plugin_manager, register, reset_plugin_manager

    reset_plugin_manager()
    pm = get_plugin_manager()
    register(pm, ToyPlugin, name="corex-toy")
    yield pm
    reset_plugin_manager()


@pytest.fixture
def corex_plugin(corex_pm) -> Callable[..., Any]:
    """``corex_plugin(plugin, name=None)``: register a plugin that is not installed, check its hook
    names, and return the plugin manager (the same one ``corex_cli`` and ``corex.run`` use)."""
    from corex.errors import PluginError
    from corex.plugins import check, register

    added: list[object] = []

    def add(plugin: object, name: str | None = None) -> Any:
        if corex_pm.is_registered(plugin):
            raise PluginError(
                f"plugin {corex_pm.get_name(plugin)!r} is already loaded (installed plugins come in through their entry "
                "point before the test starts): use the corex_pm fixture as it is, or uninstall the package to test "
                "a copy that is not installed"
            )
        register(corex_pm, plugin, name=name)
        added.append(plugin)
        try:
            check(corex_pm)
        except PluginError:
            corex_pm.unregister(plugin)
            added.remove(plugin)
            raise
        return corex_pm

    yield add
    for plugin in reversed(added):
        if corex_pm.is_registered(plugin):
            corex_pm.unregister(plugin)


@pytest.fixture
def tiny_recipe(corex_pm) -> dict[str, Any]:
    return tiny_recipe_dict()


@pytest.fixture
def corex_cli(corex_pm) -> Callable[..., tuple[int, str, str]]:
    from corex.cli import main

    def invoke(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    return invoke


__all__ = ["HEAVY", "TOY_CLASSES", "ToyPlugin", "ToySource", "assert_light", "assert_mirrors", "corex_cli", "corex_plugin", "corex_pm",
           "tiny_recipe", "tiny_recipe_dict"]
