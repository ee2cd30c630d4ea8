"""BYOL: bootstrap your own latent.

Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot, Kavukcuoglu,
Munos, Valko, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020.

Two augmented views of each image. The online network (the shared encoder, which is what
transfers, a projector and a predictor) predicts the target network's projection of the other
view; the target network (encoder and projector) is a moving average of the online one and takes
no gradient. No negatives, so no queue and no batch-norm leak to guard against. Per image, with
``p`` the online prediction of one view and ``z'`` the target projection of the other (eq. 2):

    L = || p / ||p|| - z' / ||z'|| ||^2 = 2 - 2 cos(p, z'),

symmetrised over the two orders of the views and averaged over the batch.

Reference settings: ResNet-50, LARS with batch 4096 for 1000 epochs on ImageNet; projector and
predictor 4096-256 MLPs with batch norm; the target momentum rises from 0.996 to 1 on a cosine
over training (section 3.2), here over the stage's ``total_steps``, which the core supplies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corex.interfaces import Batch
from corex_ssl import MomentumObjective, cosine_momentum, momentum_copy, projection_head


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """``2 - 2 cos(prediction, target)`` per row (Grill et al., eq. 2), target detached."""
    return 2.0 - 2.0 * F.cosine_similarity(prediction, target.detach(), dim=-1)


class BYOL(MomentumObjective):
    """BYOL around the shared (online) encoder.

    Options (defaults are the paper's): ``base_momentum`` (0.996), the target momentum at the first
    step, rising to 1 at ``total_steps``; ``projection_dim`` (256) and ``hidden_dim`` (4096) of the
    projector and predictor MLPs. The momentum update runs at the start of each training step, on the
    weights the previous optimisation step left, which is the reference's order (update after each
    step). The step count is a buffer, so a resumed run continues the schedule where it stopped.
    """

    def __init__(self, *, encoder: nn.Module, channels: Sequence[int], total_steps: int, base_momentum: float = 0.996,
                 projection_dim: int = 256, hidden_dim: int = 4096) -> None:
        super().__init__()
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"base_momentum must be in [0, 1] (the weight of the old target parameters; 0.996 in BYOL), got {base_momentum}.")
        if projection_dim < 1 or hidden_dim < 1:
            raise ValueError(f"projection_dim and hidden_dim must be at least 1, got {projection_dim} and {hidden_dim}.")
        self.base_momentum, self.total_steps = base_momentum, total_steps
        self.encoder = encoder
        self.projector = projection_head(channels[-1], hidden_dim, projection_dim, batch_norm=True)
        self.predictor = projection_head(projection_dim, hidden_dim, projection_dim, batch_norm=True, pool=False)
        self.target_encoder = momentum_copy(encoder)
        self.target_projector = momentum_copy(self.projector)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    @property
    def momentum(self) -> float:
        return cosine_momentum(self.base_momentum, int(self.step), self.total_steps)

    def forward(self, batch: Batch, augment: Callable[[Batch], Batch]) -> Mapping[str, Tensor]:
        images = {key: value for key, value in batch.items() if key != "mask"}
        with torch.no_grad():
            views = augment(images)["image"], augment(images)["image"]
        momentum = self.momentum
        if self.training:
            self.momentum_update(momentum)
            self.step += 1
        predictions = [self.predictor(self.projector(self.encoder(view)[-1])) for view in views]
        with torch.no_grad():
            targets = [self.target_projector(self.target_encoder(view)[-1]) for view in views]
        loss = (byol_loss(predictions[0], targets[1]) + byol_loss(predictions[1], targets[0])).mean()
        return {"loss": loss, "momentum": torch.tensor(momentum), "cosine": 1.0 - loss.detach() / 4.0}
