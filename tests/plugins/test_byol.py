"""corex_byol and corex_ssl: BYOL's step against a reference written here, the cosine momentum
schedule, the checkpointed step count, and a pretrain -> fine-tune run and a study arm through corex."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import corex
import corex_byol
from corex.interfaces import Objective
from corex.testing import assert_mirrors, tiny_recipe_dict
from corex_byol import BYOL
from corex_ssl import cosine_momentum


class TinyEncoder(nn.Module):
    arch, in_channels, channels, strides = "tiny", 1, (8, 16), (2, 4)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x: Tensor) -> list[Tensor]:
        a = self.stem(x)
        return [a, self.down(a)]


def make_byol(total_steps: int = 10, base_momentum: float = 0.9) -> BYOL:
    encoder = TinyEncoder()
    return BYOL(encoder=encoder, channels=encoder.channels, total_steps=total_steps, base_momentum=base_momentum,
                projection_dim=8, hidden_dim=16)


def flip_every_other_call():
    """A deterministic augmentation: the first view as is, the second flipped."""
    calls = []

    def augment(batch: dict) -> dict:
        calls.append(1)
        image = batch["image"] if len(calls) % 2 else batch["image"].flip(-1)
        return {**batch, "image": image}

    return augment


def test_the_factory_mirrors_the_implementation_and_builds_an_objective():
    assert_mirrors(corex_byol.byol_objective, BYOL)
    encoder = TinyEncoder()
    objective = corex_byol.byol_objective(encoder=encoder, channels=encoder.channels, total_steps=5, hidden_dim=16, projection_dim=8)
    assert isinstance(objective, Objective) and objective.encoder is encoder


def test_cosine_momentum_rises_from_its_base_to_one():
    assert cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 250, 100) == pytest.approx(1.0)  # past the end: stays at 1
    values = [cosine_momentum(0.9, k, 20) for k in range(21)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_one_step_equals_a_reference_written_from_the_paper():
    torch.manual_seed(0)
    byol = make_byol(total_steps=4, base_momentum=0.9)
    with torch.no_grad():  # the online network has moved away from the target, as after some steps
        for p in byol.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    online = copy.deepcopy([byol.encoder, byol.projector, byol.predictor])
    target = copy.deepcopy([byol.target_encoder, byol.target_projector])
    batch = {"image": torch.rand(6, 1, 16, 16)}
    out = byol(batch, flip_every_other_call())

    # Reference: the momentum of step 0 is the base; the target moves before it is used.
    m = 0.9
    with torch.no_grad():
        for t_module, o_module in ((target[0], online[0]), (target[1], online[1])):
            for t, o in zip(t_module.parameters(), o_module.parameters(), strict=True):
                t.copy_(m * t + (1 - m) * o)
    views = [batch["image"], batch["image"].flip(-1)]
    encoder, projector, predictor = online
    for module in (*online, *target):
        module.train()
    p = [predictor(projector(encoder(v)[-1])) for v in views]
    with torch.no_grad():
        z = [target[1](target[0](v)[-1]) for v in views]

    def distance(a: Tensor, b: Tensor) -> Tensor:  # || a/|a| - b/|b| ||^2, eq. 2 of Grill et al.
        return ((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).sum(1)

    expected = (distance(p[0], z[1]) + distance(p[1], z[0])).mean()
    torch.testing.assert_close(out["loss"], expected)
    assert float(out["momentum"]) == pytest.approx(m)
    for ours, theirs in zip(byol.target_encoder.parameters(), target[0].parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)
    assert not any(p.requires_grad for p in byol.target_encoder.parameters())
    out["loss"].backward()
    assert byol.encoder.stem[0].weight.grad is not None and byol.target_encoder.stem[0].weight.grad is None


def test_the_step_count_is_checkpointed_so_a_resume_continues_the_schedule():
    byol = make_byol(total_steps=10, base_momentum=0.5)
    augment = flip_every_other_call()
    for _ in range(3):
        byol({"image": torch.rand(4, 1, 16, 16)}, augment)
    assert int(byol.step) == 3
    again = make_byol(total_steps=10, base_momentum=0.5)
    again.load_state_dict(byol.state_dict())
    assert int(again.step) == 3 and again.momentum == pytest.approx(cosine_momentum(0.5, 3, 10))
    byol.eval()
    byol({"image": torch.rand(4, 1, 16, 16)}, augment)
    assert int(byol.step) == 3  # evaluation moves neither the target nor the schedule


def test_total_steps_comes_from_the_core(corex_pm, tmp_path):
    seen = {}

    class Spy:
        @staticmethod
        @corex.hookimpl
        def corex_objectives():
            def spy(*, encoder, channels, total_steps: int) -> BYOL:
                seen["total_steps"] = total_steps
                return BYOL(encoder=encoder, channels=channels, total_steps=total_steps, hidden_dim=16, projection_dim=8)

            return {"byol_spy": spy}

    corex_pm.register(Spy, name="spy")
    recipe = tiny_recipe_dict()
    recipe["stages"] = {"pretrain": {"kind": "pretrain", "epochs": 3, "objective": "byol_spy", "max_steps_per_epoch": 2}}
    corex.run(corex.load_recipe(recipe), out=tmp_path / "run", progress=False)
    assert seen["total_steps"] == 3 * 2  # epochs x steps per epoch


@pytest.mark.slow
def test_byol_pretrains_and_transfers_through_corex(corex_pm, tmp_path):
    recipe = tiny_recipe_dict()
    recipe["stages"] = {
        "pretrain": {"kind": "pretrain", "epochs": 2, "augment": "moco_cxr",
                     "objective": {"name": "byol", "hidden_dim": 32, "projection_dim": 16, "base_momentum": 0.99}},
        **recipe["stages"],
    }
    recipe["stages"]["train"]["encoder_from"] = "pretrain"
    results = corex.run(corex.load_recipe(recipe), out=tmp_path / "run", progress=False)
    pretrain = results["stages"]["pretrain"]["metrics"]
    assert math.isfinite(pretrain["loss"]) and 0.99 <= pretrain["momentum"] <= 1.0
    assert results["stages"]["test"]["metrics"]["macro_f1"] > 0.5  # the toy task, learnt on the transferred encoder
    assert (Path(tmp_path) / "run" / "checkpoints" / "pretrain" / "model.pt").exists()
