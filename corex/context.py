"""What lifecycle observers are handed: the run as it is happening.

Its own module, importing nothing heavy at run time, so that :mod:`corex.hookspecs` can name it in
the observer hooks' signatures without an import circle (hookspecs -> engine -> plugins -> hookspecs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import torch

    from corex.plugins import Registry
    from corex.recipe import Recipe


@attrs.define
class RunContext:
    """What observers see: the resolved recipe, the run directory and the device."""

    recipe: Recipe
    out: Path
    device: torch.device
    registry: Registry


__all__ = ["RunContext"]
