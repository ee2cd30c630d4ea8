"""corex_byol: the BYOL self-supervised objective (bootstrap your own latent).

Registered as the objective ``byol`` of a ``pretrain`` stage. Built on corex_ssl's momentum
networks and projection heads; see :class:`corex_byol.byol.BYOL` for the options and the paper's
defaults. This module imports no torch: the factory imports the implementation when a run builds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from corex import hookimpl
from corex.interfaces import Encoder, Objective
from corex.lazy import lazy_exports


def byol_objective(
    *,
    encoder: Encoder,
    channels: Sequence[int],
    total_steps: int,
    base_momentum: float = 0.996,
    projection_dim: int = 256,
    hidden_dim: int = 4096,
) -> Objective:
    """BYOL on ``encoder`` (see :class:`corex_byol.byol.BYOL` for what each option does)."""
    from corex_byol.byol import BYOL

    return BYOL(encoder=encoder, channels=channels, total_steps=total_steps, base_momentum=base_momentum,
                projection_dim=projection_dim, hidden_dim=hidden_dim)


@hookimpl
def corex_objectives():
    return {"byol": byol_objective}


__getattr__ = lazy_exports(__name__, {"BYOL": "corex_byol.byol", "byol_loss": "corex_byol.byol"})
__all__ = ["BYOL", "byol_loss", "byol_objective", "corex_objectives"]
