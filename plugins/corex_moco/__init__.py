"""corex_moco: the MoCo v2 self-supervised objective (momentum contrast).

Registered as the objective ``moco`` of a ``pretrain`` stage. The core passes the shared encoder
(the query encoder, which is what transfers), its ``channels`` and the global ``batch_size``.

See :class:`corex_moco.moco.MoCo` for the options, the paper's defaults and how batch-norm
leakage is handled on one device and across several.
"""

from __future__ import annotations

from corex import hookimpl
from corex_moco.moco import MoCo, projection_head


@hookimpl
def corex_objectives():
    return {"moco": MoCo}


__all__ = ["MoCo", "projection_head"]
