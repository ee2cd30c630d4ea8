"""corex_optim: the built-in optimizers and learning-rate schedules.

Recipe keys ``optimizer`` and ``schedule`` (top level, or per stage) name one of these, or one a
plugin registers through ``corex_optimizers`` / ``corex_schedules`` (LARS, a one-cycle schedule ...).

* optimizers ``sgd`` (with momentum), ``adam``, ``adamw``: the core hands over ``param_groups``
  (weights with ``weight_decay``, biases and normalisation weights without: decay only fights
  their scale) and the recipe's ``lr``, ``weight_decay``, ``momentum`` and ``betas``;
* schedules ``cosine`` (linear warm-up, then cosine decay to ``min_lr_ratio`` of the learning rate)
  and ``constant`` (warm-up, then flat), stepped after every optimisation step; the core hands over
  the ``optimizer``, the stage's ``total_steps``, ``warmup_steps`` (``schedule.warmup_steps``, else
  ``warmup_epochs`` converted with the steps of a full epoch) and ``min_lr_ratio``.

torch is imported inside the factories, not here: ``corex --help`` and ``corex plugins`` load this
module to read the factories' signatures and build nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corex import hookimpl

if TYPE_CHECKING:
    import torch


def sgd(*, param_groups: list[dict[str, Any]], lr: float, momentum: float, nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum (and Nesterov's variant when ``nesterov`` and ``momentum > 0``)."""
    import torch

    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def adam(*, param_groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015); weight decay comes with each parameter group, as L2 in the gradient."""
    import torch

    return torch.optim.Adam(param_groups, lr=lr, betas=tuple(betas))


def adamw(*, param_groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): weight decay decoupled from the gradient step."""
    import torch

    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas))


def _warmup_then(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 after: Callable[[float], float]) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then ``after(progress)`` with progress going 0 -> 1 at ``total_steps``."""
    import torch

    total, warmup = max(1, total_steps), warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return after(min(1.0, (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine(*, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
           min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay from the learning rate to ``min_lr_ratio`` of it."""
    return _warmup_then(optimizer, total_steps, warmup_steps,
                        lambda progress: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def constant(*, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then the learning rate as it is."""
    return _warmup_then(optimizer, total_steps, warmup_steps, lambda progress: 1.0)


@hookimpl
def corex_optimizers():
    return {"sgd": sgd, "adam": adam, "adamw": adamw}


@hookimpl
def corex_schedules():
    return {"cosine": cosine, "constant": constant}


__all__ = ["adam", "adamw", "constant", "corex_optimizers", "corex_schedules", "cosine", "sgd"]
