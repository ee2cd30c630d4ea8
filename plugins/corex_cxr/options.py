"""Option types and constants shared by every source, in a module that imports nothing heavy.

``corex plugins`` and ``corex validate --no-build`` read the factories' annotations without
building anything, so the types those annotations name live here rather than in
:mod:`corex_cxr.source` (which imports torch through the cache).
"""

from __future__ import annotations

from typing import Literal

CLASS_NAMES = ("negative", "typical", "indeterminate", "atypical")
BadSamplePolicy = Literal["error", "skip"]
HardSubgroup = Literal["none", "ap_portable"]  # the phantom's planted harder subgroup
UncertainPolicy = Literal["ones", "zeros", "ignore"]  # CheXpert's -1.0 labels
Views = Literal["frontal", "lateral", "all"]  # CheXpert's Frontal/Lateral column

__all__ = ["CLASS_NAMES", "BadSamplePolicy", "HardSubgroup", "UncertainPolicy", "Views"]
