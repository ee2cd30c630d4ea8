"""corex_moco: the MoCo v2 self-supervised objective (momentum contrast).

Registered as the objective ``moco`` of a ``pretrain`` stage. The core passes the shared encoder
(the query encoder, which is what transfers), its ``channels`` and the global ``batch_size``.

See :class:`corex_moco.moco.MoCo` for the options, the paper's defaults and how batch-norm
leakage is handled on one device and across several.

This module imports no torch: ``corex --help`` and ``corex plugins`` load it to read the factory's
signature, and :func:`moco_objective` imports the implementation when a run builds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from corex import hookimpl
from corex.interfaces import Encoder, Objective
from corex.lazy import lazy_exports


def moco_objective(
    *,
    encoder: Encoder,
    channels: Sequence[int],
    batch_size: int,
    key_momentum: float = 0.999,
    temperature: float = 0.2,
    queue_size: int = 65536,
    projection_dim: int = 128,
    hidden_dim: int | None = None,
    shuffle_bn: bool = True,
    bn_splits: int = 2,
    dataset_size: int | None = None,
) -> Objective:
    """MoCo v2 on ``encoder`` (see :class:`corex_moco.moco.MoCo` for what each option does)."""
    from corex_moco.moco import MoCo

    return MoCo(encoder=encoder, channels=channels, batch_size=batch_size, key_momentum=key_momentum, temperature=temperature,
                queue_size=queue_size, projection_dim=projection_dim, hidden_dim=hidden_dim, shuffle_bn=shuffle_bn,
                bn_splits=bn_splits, dataset_size=dataset_size)


@hookimpl
def corex_objectives():
    return {"moco": moco_objective}


__getattr__ = lazy_exports(__name__, {"MoCo": "corex_moco.moco", "projection_head": "corex_moco.moco"})
__all__ = ["MoCo", "moco_objective", "projection_head"]
