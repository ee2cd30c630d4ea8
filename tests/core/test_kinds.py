"""corex.kinds: each kind declared once, and everything that derives from the declaration."""

from __future__ import annotations

from pathlib import Path

import pytest

from corex import hookspecs, interfaces
from corex.build import build_component
from corex.contract import built_problems
from corex.kinds import KINDS, hook_doc, hooks_table, protocol_members
from corex.plugins import Registry
from corex.recipe import iter_components, load_recipe
from corex.schema import Component
from corex.testing import tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[2]


def test_the_hook_reference_table_is_the_one_the_declarations_give():
    text = (ROOT / "docs" / "hooks.md").read_text()
    assert hooks_table() in text, "docs/hooks.md's registration table is stale: paste corex.kinds.hooks_table() into it"


@pytest.mark.parametrize("kind", KINDS.values(), ids=lambda k: k.name)
def test_each_kind_has_its_registration_hook_with_the_derived_docstring(kind):
    spec = getattr(hookspecs, kind.hook)
    assert spec.__doc__ == hook_doc(kind)
    for name in kind.injected:
        assert f"``{name}``" in spec.__doc__


@pytest.mark.parametrize("kind", KINDS.values(), ids=lambda k: k.name)
def test_each_kind_builds_a_protocol_of_corex_interfaces(kind):
    assert getattr(interfaces, kind.protocol.__name__) is kind.protocol
    assert kind.members()  # the contract has something to check


def test_the_contract_checks_what_the_protocol_declares():
    members = protocol_members(interfaces.Encoder, module=True)
    assert members == {"arch": "str", "in_channels": "int", "channels": "sequence", "strides": "sequence", "forward": "method",
                       "state_dict": "method", "load_state_dict": "method"}
    assert protocol_members(interfaces.Evaluator) == {"update": "method", "compute": "method", "reset": "method"}

    class HalfAnEvaluator:
        def update(self, batch, outputs): ...

    problems = built_problems("evaluators", HalfAnEvaluator(), "evaluator 'half' (plugin 'mine')", "stages.test.evaluators[0]")
    assert problems == ["stages.test.evaluators[0]: evaluator 'half' (plugin 'mine') lacks compute(), reset() "
                        "(see corex.interfaces.Evaluator)"]


def test_every_component_of_a_recipe_is_found_where_its_kind_says(corex_pm):
    recipe = load_recipe(tiny_recipe_dict())
    found = {(kind, path) for kind, path, _ in iter_components(recipe)}
    assert ("encoders", "model.encoder") in found and ("datasets", "data") in found
    assert ("heads", "stages.train.heads.segmentation") in found and ("evaluators", "stages.test.evaluators[1]") in found
    assert ("optimizers", "optimizer") in found and ("schedules", "schedule") in found
    assert {kind for kind, _ in found} <= set(KINDS)


def test_a_builder_must_hand_a_factory_exactly_the_declared_arguments(corex_pm):
    registry = Registry(corex_pm)
    with pytest.raises(TypeError, match="corex.kinds declares"):
        build_component(registry, "heads", Component("classification"), "stages.train.heads.classification", channels=(8,), strides=(32,))
    head = build_component(registry, "heads", Component("classification"), "stages.train.heads.classification",
                           channels=(8, 16), strides=(2, 4), num_classes=3)
    assert head.task == "classification"
