"""The plugin contract, checked by code: a plugin's mistakes are reported at `corex validate`,
one message each, naming the plugin and the recipe path."""

from __future__ import annotations

import torch
import yaml
from torch import nn

from corex import hookimpl
from corex.plugins import register


class WrongStrideEncoder(nn.Module):
    """Declares strides (4, 8) but its second level is at stride 4 too."""

    arch, in_channels, channels, strides = "wrong", 1, (4, 8), (4, 8)

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, stride=4, padding=1)
        self.b = nn.Conv2d(4, 8, 3, stride=1, padding=1)

    def forward(self, x):
        first = self.a(x)
        return [first, self.b(first)]


class NoArchEncoder(nn.Module):
    in_channels, channels, strides = 1, (4,), (4,)

    def forward(self, x):
        return [x[:, :, ::4, ::4].repeat(1, 4, 1, 1)]


class HeadWithoutLoss(nn.Module):
    task = "classification"

    def forward(self, features):
        return features[-1].mean((2, 3))


class ObjectiveThatDropsTheEncoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # keeps no reference to ``encoder``

    def forward(self, batch, augment):
        return {"loss": self.weight.sum()}


class EvaluatorWithoutReset:
    def update(self, batch, outputs):
        pass

    def compute(self):
        return {}


def wrong_stride() -> nn.Module:
    return WrongStrideEncoder()


def no_arch() -> nn.Module:
    return NoArchEncoder()


def loose_head(channels: tuple, **options) -> nn.Module:
    return HeadWithoutLoss()


def dropping_objective(encoder: nn.Module) -> nn.Module:
    return ObjectiveThatDropsTheEncoder(encoder)


def evaluator_misspelt(class_name: list) -> EvaluatorWithoutReset:
    return EvaluatorWithoutReset()


def evaluator_untyped(class_names: list, level=1) -> EvaluatorWithoutReset:
    return EvaluatorWithoutReset()


class Careless:
    """A third-party plugin with one mistake of each kind."""

    @staticmethod
    @hookimpl
    def corex_encoders():
        return {"wrong_stride": wrong_stride, "no_arch": no_arch}

    @staticmethod
    @hookimpl
    def corex_heads():
        return {"loose": loose_head}

    @staticmethod
    @hookimpl
    def corex_objectives():
        return {"dropping": dropping_objective}

    @staticmethod
    @hookimpl
    def corex_evaluators():
        return {"misspelt": evaluator_misspelt, "untyped": evaluator_untyped}


def _recipe(tmp_path, tiny_recipe, encoder: str) -> str:
    recipe = dict(tiny_recipe)
    recipe["model"] = {"encoder": encoder}
    recipe["stages"] = {
        "pretrain": {"kind": "pretrain", "epochs": 1, "objective": "dropping"},
        "train": {"kind": "train", "epochs": 1, "heads": {"loose": {}}, "evaluators": ["untyped"]},
        "test": {"kind": "evaluate", "evaluators": [{"name": "misspelt", "class_name": ["a"]}]},
    }
    path = tmp_path / f"{encoder}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def test_each_mistake_of_a_plugin_is_one_message_at_validate(corex_pm, corex_cli, tiny_recipe, tmp_path):
    register(corex_pm, Careless, name="careless-plugin")
    code, _, err = corex_cli("validate", _recipe(tmp_path, tiny_recipe, "wrong_stride"))
    assert code == 2 and "Traceback" not in err, err
    expected = [
        "model.encoder: encoder 'wrong_stride' (plugin 'careless-plugin') level 1: declared 8 channels at stride 8",
        "stages.train.heads.loose: head 'loose' (plugin 'careless-plugin')'s factory takes **options",
        "stages.train.heads.loose: head 'loose' (plugin 'careless-plugin') lacks loss()",
        "stages.train.evaluators[0]: evaluator 'untyped' (plugin 'careless-plugin')'s factory option 'level' has no type annotation",
        "stages.train.evaluators[0]: evaluator 'untyped' (plugin 'careless-plugin') lacks reset()",
        "stages.pretrain.objective: objective 'dropping' (plugin 'careless-plugin') does not hold the encoder it was given",
        "stages.test.evaluators[0]: evaluator 'misspelt' (plugin 'careless-plugin')'s factory requires 'class_name'; did you mean 'class_names'?",
    ]
    for message in expected:
        assert message in err, f"missing: {message}\n{err}"


def test_a_broken_encoder_does_not_hide_the_other_components_problems(corex_pm, corex_cli, tiny_recipe, tmp_path):
    register(corex_pm, Careless, name="careless-plugin")
    code, _, err = corex_cli("validate", _recipe(tmp_path, tiny_recipe, "no_arch"))
    assert code == 2 and "Traceback" not in err, err
    assert "model.encoder: encoder 'no_arch' (plugin 'careless-plugin') lacks arch" in err
    assert "does not hold the encoder it was given" in err and "lacks loss()" in err


def test_schema_only_validation_skips_the_build(corex_pm, corex_cli, tiny_recipe, tmp_path):
    register(corex_pm, Careless, name="careless-plugin")
    recipe = dict(tiny_recipe)
    recipe["model"] = {"encoder": "wrong_stride"}
    recipe["stages"] = {"train": {"kind": "train", "epochs": 1, "heads": {"classification": {}}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, out, err = corex_cli("validate", path, "--no-build")
    assert code == 0 and "schema only" in out, err
    code, _, err = corex_cli("validate", path)
    assert code == 2 and "declared 8 channels at stride 8" in err


def test_the_python_api_type_checks_evaluator_options_like_a_recipe(tiny_recipe):
    import pytest

    import corex
    from corex.errors import RecipeError

    recipe = corex.load_recipe(tiny_recipe)
    source = corex.build_data(recipe)
    model = corex.build_model(recipe, len(source.class_names))
    loader = corex.make_loader(source.split("test"), batch_size=8)
    with pytest.raises(RecipeError, match=r"evaluators\[0\].bootstrap: expected an integer, got 'many'"):
        corex.evaluate(model, loader, ["classification"], list(source.class_names), evaluators=[{"name": "classification", "bootstrap": "many"}])
    metrics, _ = corex.evaluate(model, loader, ["classification"], list(source.class_names), evaluators=[{"name": "classification", "bootstrap": 0}])
    assert 0 <= metrics["accuracy"] <= 1
