"""Public names of a plugin package that are imported on first use.

``corex --help``, ``corex plugins``, ``corex recipes`` and ``corex validate --no-build`` load every
plugin but build nothing, so a plugin's ``__init__`` must not import torch. Its factories are light
functions that import their implementation when called, and the building blocks it exports (a
``UNetDecoder``, a ``study_map``) are resolved by name when first read::

    __getattr__ = lazy_exports(__name__, {"UNetDecoder": "corex_heads.unet", "study_map": "corex_eval.average_precision"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``names[attr]`` (a module path) when ``attr`` is first read."""

    def __getattr__(attr: str) -> Any:
        module = names.get(attr)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        return getattr(importlib.import_module(module), attr)

    return __getattr__


__all__ = ["lazy_exports"]
