"""corex_ssl: building blocks that self-supervised objectives share (no components of its own).

* :class:`MomentumObjective`: the base of objectives with a network that follows another by a
  moving average (MoCo's key encoder, BYOL's target network). A subclass names its
  ``(online, target)`` pairs; the update, its parameter bookkeeping and its schedule are shared.
* :func:`cosine_momentum`: BYOL's schedule, the momentum rising from its base value to 1 on a cosine.
* :func:`projection_head`: an MLP on the pooled deepest feature map (MoCo v2's and BYOL's heads).

Imported by corex_moco and corex_byol through this package's public names; a third-party objective
uses it the same way (``from corex_ssl import MomentumObjective``). This module imports no torch.
"""

from __future__ import annotations

from corex.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "MomentumObjective": "corex_ssl.momentum",
    "cosine_momentum": "corex_ssl.momentum",
    "momentum_copy": "corex_ssl.momentum",
    "projection_head": "corex_ssl.momentum",
})
__all__ = ["MomentumObjective", "cosine_momentum", "momentum_copy", "projection_head"]
