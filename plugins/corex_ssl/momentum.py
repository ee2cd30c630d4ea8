"""Momentum (moving-average) networks and projection heads, shared by MoCo and BYOL.

He et al. 2020 (MoCo, eq. 2) and Grill et al. 2020 (BYOL, section 3.1) both keep a second network
whose parameters follow the trained one: ``theta_target <- m * theta_target + (1 - m) * theta_online``,
with ``m`` the weight kept by the OLD target parameters (0.999 in MoCo; in BYOL rising from 0.996 to
1 with :func:`cosine_momentum`). Some libraries store the weight of the new value instead, 1 - m
(PyTorch's BatchNorm ``momentum``): 0.999 here is 0.001 there. Only parameters are averaged;
buffers such as batch-norm running statistics are the target's own, as in both references.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that takes no gradients: a target (or key) network to start from.
    Make it after loading any initial weights into ``module``."""
    return copy.deepcopy(module).requires_grad_(False)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's target momentum at ``step`` of ``total_steps``: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``,
    i.e. ``base`` at the first step rising to 1 at the last (Grill et al. 2020, section 3.2)."""
    if total_steps <= 0:
        return base
    progress = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def projection_head(in_features: int, hidden_dim: int, out_dim: int, *, batch_norm: bool = False, pool: bool = True) -> nn.Sequential:
    """An MLP head: (global average pool ->) Linear -> (BatchNorm ->) ReLU -> Linear.

    MoCo v2 (Chen et al. 2020): "a 2-layer MLP head (hidden layer 2048-d, with ReLU)", no batch norm.
    BYOL (Grill et al. 2020): "a linear layer with output size 4096 followed by batch normalization,
    rectified linear units (ReLU), and a final linear layer with output dimension 256"; its predictor
    is the same MLP on the projection (``pool=False``).
    """
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pool else []
    layers.append(nn.Linear(in_features, hidden_dim))
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


class MomentumObjective(nn.Module):
    """An objective with target networks that follow online ones by a moving average.

    A subclass returns its ``(online, target)`` module pairs from :meth:`momentum_pairs` and calls
    :meth:`momentum_update` with the momentum of the step. The parameter lists are looked up once
    (and again after ``.to()`` or any ``Module._apply``, which may replace the parameter objects) and
    updated with foreach ops, all at once.
    """

    def momentum_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError(f"{type(self).__name__} must name its (online, target) module pairs")

    def _momentum_parameters(self) -> tuple[list[Tensor], list[Tensor]]:
        """(target, online) parameters in matching order."""
        cached = getattr(self, "_momentum_lists", None)
        if cached is None:
            pairs = self.momentum_pairs()
            cached = ([p for _, target in pairs for p in target.parameters()], [p for online, _ in pairs for p in online.parameters()])
            if len(cached[0]) != len(cached[1]):
                raise ValueError(f"{type(self).__name__}: a target network has {len(cached[0])} parameters and its online one "
                                 f"{len(cached[1])}; make targets with momentum_copy(online)")
            self._momentum_lists = cached  # a plain attribute: not in the state dict
        return cached

    def _apply(self, fn, recurse=True):
        self._momentum_lists = None
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """theta_target <- momentum * theta_target + (1 - momentum) * theta_online, for every pair."""
        targets, onlines = self._momentum_parameters()
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, onlines, alpha=1.0 - momentum)


__all__ = ["MomentumObjective", "cosine_momentum", "momentum_copy", "projection_head"]
