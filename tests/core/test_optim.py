"""Optimizers and schedules are components: built-ins from corex_optim, more from any plugin."""

from __future__ import annotations

import math

import pytest
import torch

import corex
from corex import hookimpl
from corex.errors import RecipeError
from corex.plugins import register


def signed_sgd(param_groups: list, lr: float, scale: float = 1.0) -> torch.optim.Optimizer:
    """A plugin's optimizer with an option of its own (``scale``)."""
    return torch.optim.SGD(param_groups, lr=lr * scale)


def step_decay(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, every_epochs: int = 1, gamma: float = 0.5):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch * every_epochs, gamma=gamma)


class MoreOptim:
    @staticmethod
    @hookimpl
    def corex_optimizers():
        return {"scaled_sgd": signed_sgd}

    @staticmethod
    @hookimpl
    def corex_schedules():
        return {"step_decay": step_decay}


def test_a_plugins_optimizer_and_schedule_train_a_stage_with_their_own_options(corex_pm, tiny_recipe, tmp_path):
    register(corex_pm, MoreOptim, name="more-optim")
    tiny_recipe["data"]["studies"] = 80
    tiny_recipe["optimizer"] = {"name": "scaled_sgd", "lr": 0.01, "scale": 2.0}
    tiny_recipe["schedule"] = {"name": "step_decay", "gamma": 0.1}
    tiny_recipe["stages"]["train"]["epochs"] = 2
    tiny_recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 0}]
    corex.run(corex.load_recipe(tiny_recipe), out=tmp_path / "run", progress=False)
    rows = [__import__("json").loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # lr 0.01 x scale 2 = 0.02, divided by 10 after each epoch of 6 steps (read after the epoch's last step)
    assert [r["lr"] for r in rows] == pytest.approx([0.002, 0.0002])


def test_unknown_names_and_options_are_recipe_problems(corex_pm, tiny_recipe):
    register(corex_pm, MoreOptim, name="more-optim")
    tiny_recipe["optimizer"] = {"name": "scaled_sdg", "lr": 0.01}
    tiny_recipe["schedule"] = {"name": "step_decay", "gama": 0.1}
    with pytest.raises(RecipeError) as raised:
        corex.load_recipe(tiny_recipe)
    text = str(raised.value)
    assert "optimizer.name: optimizer 'scaled_sdg' is not registered; did you mean 'scaled_sgd'?" in text
    assert "schedule.gama: unknown option; did you mean 'gamma'?" in text


def test_the_built_in_cosine_schedule_warms_up_then_decays_to_its_floor():
    from corex_optim import cosine

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine(optimizer=optimizer, total_steps=30, warmup_steps=10, min_lr_ratio=0.1)
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert rates[10] == pytest.approx(1.0)  # the decay starts at the full rate
    assert rates[20] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the floor after the last step


def test_the_built_in_optimizers_pass_their_options_to_torch():
    import corex_optim

    groups = lambda: [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.01}]
    sgd = corex_optim.sgd(param_groups=groups(), lr=0.1, momentum=0.9, nesterov=True)
    assert type(sgd) is torch.optim.SGD and (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["nesterov"]) == (0.1, 0.9, True)
    assert corex_optim.sgd(param_groups=groups(), lr=0.1, momentum=0.0, nesterov=True).defaults["nesterov"] is False
    for name, kind in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        built = getattr(corex_optim, name)(param_groups=groups(), lr=0.002, betas=[0.8, 0.95])
        assert type(built) is kind and built.defaults["betas"] == (0.8, 0.95)
        assert built.param_groups[0]["weight_decay"] == 0.01


def test_the_constant_schedule_warms_up_then_stays_flat():
    from corex_optim import constant

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule = constant(optimizer=optimizer, total_steps=8, warmup_steps=2)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])


