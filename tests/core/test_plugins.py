"""Plugin discovery, registration errors, blocking, and `corex plugins`."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

import corex
from corex.errors import PluginError
from corex.plugins import KINDS, Registry, create_plugin_manager, describe_plugins, register
from corex.testing import assert_light, assert_mirrors

BUILT_IN = {
    "encoders": {"resnet18", "resnet34", "resnet50", "densenet121"},
    "heads": {"classification", "segmentation"},
    "evaluators": {"classification", "segmentation"},
    "datasets": {"phantom", "siim", "folder"},
    "objectives": {"moco", "inpaint", "byol"},
    "augmentations": {"cxr_light", "moco_cxr", "mocov2", "kornia", "none"},
}


def test_built_in_plugins_arrive_through_entry_points(corex_pm):
    registry = Registry(corex_pm)
    for kind, names in BUILT_IN.items():
        assert names <= set(registry.components(kind)), kind
    assert registry.get("encoders", "resnet18").plugin == "encoders"  # the entry-point name


THIRD_PARTY = textwrap.dedent('''
    import torch
    from torch import nn
    from corex import hookimpl

    class Blob(nn.Module):
        arch = "blob"

        def __init__(self, *, in_channels: int = 1, width: int = 4):
            super().__init__()
            self.in_channels = in_channels
            self.channels = (width, width)
            self.strides = (16, 32)
            self.a = nn.Conv2d(in_channels, width, 3, stride=16, padding=1)
            self.b = nn.Conv2d(width, width, 3, stride=2, padding=1)

        def forward(self, x):
            a = torch.relu(self.a(x))
            return [a, torch.relu(self.b(a))]

    @hookimpl
    def corex_encoders():
        return {"blob": Blob}
''')


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    (tmp_path / "corex_blob_plugin.py").write_text(THIRD_PARTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("COREX_PLUGINS", "corex_blob_plugin")
    yield "corex_blob_plugin"
    sys.modules.pop("corex_blob_plugin", None)


def test_third_party_module_adds_an_encoder_that_a_recipe_uses(third_party, corex_pm, tiny_recipe, tmp_path):
    registry = Registry(corex_pm)
    assert registry.get("encoders", "blob").plugin == "corex_blob_plugin"
    tiny_recipe["model"]["encoder"] = {"name": "blob", "width": 6}
    tiny_recipe["stages"]["train"]["epochs"] = 1
    recipe = corex.load_recipe(tiny_recipe)
    results = corex.run(recipe, out=tmp_path / "run", progress=False)
    assert results["stages"]["test"]["metrics"]["n"] == 32
    listed = {row["name"]: row for row in describe_plugins(corex_pm)}
    assert listed["corex_blob_plugin"]["origin"] == "COREX_PLUGINS"
    assert listed["corex_blob_plugin"]["components"] == {"encoders": ["blob"]}


def test_a_misspelled_third_party_option_is_reported(third_party, corex_pm, tiny_recipe):
    tiny_recipe["model"]["encoder"] = {"name": "blob", "widht": 6}
    with pytest.raises(corex.recipe.RecipeError) as info:
        corex.load_recipe(tiny_recipe)
    assert "model.encoder.widht: unknown option; did you mean 'width'?" in str(info.value)


class Duplicate:
    @staticmethod
    @corex.hookimpl
    def corex_encoders():
        return {"resnet18": lambda: None}


def test_two_plugins_claiming_one_name_is_an_error_naming_both(corex_pm):
    register(corex_pm, Duplicate, name="my-resnets")
    with pytest.raises(PluginError) as info:
        Registry(corex_pm).components("encoders")
    message = str(info.value)
    assert "encoder 'resnet18' is registered twice" in message
    assert "'encoders'" in message and "'my-resnets'" in message


def test_unknown_name_suggests_the_closest_and_lists_providers(corex_pm):
    with pytest.raises(KeyError) as info:
        Registry(corex_pm).get("encoders", "resnet05")
    message = info.value.args[0]
    assert "encoder 'resnet05' is not registered; did you mean 'resnet50'?" in message
    assert "densenet121 (encoders)" in message


class Misspelled:
    @staticmethod
    @corex.hookimpl
    def corex_encoder():  # the hook is corex_encoders
        return {}


def test_an_implementation_of_no_known_hook_is_rejected(corex_pm):
    register(corex_pm, Misspelled, name="typo")
    from corex.plugins import check

    with pytest.raises(PluginError, match="unknown hook 'corex_encoder'.*did you mean 'corex_encoders'"):
        check(corex_pm)


def test_an_implementation_with_arguments_the_hook_does_not_have_is_rejected():
    class BadArgs:
        @staticmethod
        @corex.hookimpl
        def corex_epoch_end(run, stage, loss):
            pass

    pm = create_plugin_manager(autoload=False)
    with pytest.raises(PluginError, match="loss"):
        register(pm, BadArgs, name="bad-args")


def test_blocking_one_plugin_and_all_autoloading(monkeypatch):
    monkeypatch.setenv("COREX_DISABLE_PLUGINS", "corex_moco")
    registry = Registry(create_plugin_manager())
    assert "moco" not in registry.components("objectives")
    assert "inpaint" in registry.components("objectives")
    monkeypatch.setenv("COREX_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = Registry(create_plugin_manager())
    assert all(not registry.components(kind) for kind in KINDS)


def test_an_unimportable_corex_plugins_module_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("COREX_PLUGINS", "no_such_corex_plugin")
    with pytest.raises(PluginError, match="COREX_PLUGINS names 'no_such_corex_plugin'"):
        create_plugin_manager()


def test_plugins_json_lists_every_component_by_kind_and_provider(corex_cli):
    code, out, _ = corex_cli("plugins", "--json")
    assert code == 0
    listing = json.loads(out)
    assert set(listing["components"]) == set(KINDS)
    for kind, names in BUILT_IN.items():
        assert names <= set(listing["components"][kind])
    assert listing["components"]["objectives"]["moco"] == "moco"
    assert listing["components"]["datasets"]["toy"] == "corex-toy"
    versions = {row["name"]: row["version"] for row in listing["plugins"]}
    assert versions["encoders"] == corex.__version__


def test_every_hook_is_documented_and_typed():
    import inspect

    from corex import hookspecs

    hooks = [f for name, f in vars(hookspecs).items() if name.startswith("corex_") and callable(f)]
    assert len(hooks) >= 11
    for hook in hooks:
        doc = inspect.getdoc(hook) or ""
        assert len(doc) > 40, f"{hook.__name__} needs a docstring saying when it is called and what it returns"
        assert "return" in inspect.get_annotations(hook), f"{hook.__name__} needs a return annotation"


# -- plugins that fail to load are messages naming the plugin, not tracebacks ----------------------

BROKEN_MODULES = {
    "raises": ("import os\nraise RuntimeError('the licence server is down')\n", "RuntimeError: the licence server is down"),
    "syntax": ("def corex_encoders(:\n    return {}\n", "SyntaxError"),
    "imports_missing": ("import no_such_dependency_of_a_plugin\n", "No module named 'no_such_dependency_of_a_plugin'"),
}


@pytest.fixture
def broken_module(tmp_path, monkeypatch, request):
    """A module ``corex_broken_<kind>`` on sys.path whose import fails."""
    kind = request.param
    name = f"corex_broken_{kind}"
    source, expected = BROKEN_MODULES[kind]
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, expected, tmp_path / f"{name}.py"
    sys.modules.pop(name, None)


def cli_exit(capsys, *args) -> tuple[int, str]:
    from corex.cli import main
    from corex.plugins import reset_plugin_manager

    reset_plugin_manager()
    try:
        code = main([str(a) for a in args])
    finally:
        reset_plugin_manager()
    return code, capsys.readouterr().err


@pytest.mark.parametrize("broken_module", list(BROKEN_MODULES), indirect=True)
def test_a_corex_plugins_module_that_fails_to_import_is_named(broken_module, monkeypatch, capsys):
    name, expected, path = broken_module
    monkeypatch.setenv("COREX_PLUGINS", name)
    with pytest.raises(PluginError) as info:
        create_plugin_manager(autoload=False)
    message = str(info.value)
    assert f"'{name}'" in message and expected in message and str(path) in message
    code, err = cli_exit(capsys, "plugins")
    assert code == 2 and "Traceback" not in err and f"'{name}'" in err and expected in err


def install_entry_point(site: Path, plugin_name: str, module: str) -> None:
    """A distribution on ``site`` (a sys.path entry) declaring a corex entry point."""
    info = site / "corex_fake_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: corex-fake-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[corex]\n{plugin_name} = {module}\n")


@pytest.mark.parametrize("broken_module", list(BROKEN_MODULES), indirect=True)
def test_an_entry_point_plugin_that_fails_to_import_is_named(broken_module, capsys):
    name, expected, path = broken_module
    install_entry_point(path.parent, "fake", name)
    with pytest.raises(PluginError) as info:
        create_plugin_manager()
    message = str(info.value)
    assert "plugin 'fake'" in message and "corex-fake-plugin" in message and expected in message
    code, err = cli_exit(capsys, "plugins")
    assert code == 2 and "Traceback" not in err and "plugin 'fake'" in err and expected in err


def test_a_working_entry_point_plugin_is_loaded_beside_the_built_in_ones(tmp_path, monkeypatch):
    (tmp_path / "corex_fine_plugin.py").write_text(THIRD_PARTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    install_entry_point(tmp_path, "fine", "corex_fine_plugin")
    try:
        pm = create_plugin_manager()
        registry = Registry(pm)
        assert registry.get("encoders", "blob").plugin == "fine"
        assert registry.get("encoders", "resnet18").plugin == "encoders"
        rows = {row["name"]: row for row in describe_plugins(pm)}
        assert rows["fine"]["version"] == "1.0" and rows["fine"]["origin"] == "entry point of corex-fake-plugin"
    finally:
        sys.modules.pop("corex_fine_plugin", None)


class RaisingHook:
    @staticmethod
    @corex.hookimpl
    def corex_heads():
        raise KeyError("cfg")


def test_a_registration_hook_that_raises_is_named(corex_pm, tiny_recipe):
    register(corex_pm, RaisingHook, name="flaky-heads")
    with pytest.raises(PluginError) as info:
        Registry(corex_pm).components("heads")
    message = str(info.value)
    assert "plugin 'flaky-heads'" in message and "corex_heads()" in message and "KeyError: 'cfg'" in message
    with pytest.raises(PluginError, match="flaky-heads"):  # and so does a recipe that needs heads
        corex.load_recipe(tiny_recipe)


class RaisingCli:
    @staticmethod
    @corex.hookimpl
    def corex_cli(commands):
        commands.add_parser("broken")
        raise AttributeError("'NoneType' object has no attribute 'add_argument'")


def test_call_each_names_the_plugin_whose_setup_hook_raises(corex_pm):
    import argparse

    from corex.plugins import call_each

    register(corex_pm, RaisingCli, name="broken-cli")
    commands = argparse.ArgumentParser().add_subparsers()
    with pytest.raises(PluginError, match=r"plugin 'broken-cli': corex_cli\(\) raised AttributeError: 'NoneType'"):
        call_each(corex_pm, "corex_cli", commands=commands, data_commands=commands)


class TypeErrorFactory:
    @staticmethod
    @corex.hookimpl
    def corex_encoders():
        def picky(*, width: int = 4):
            raise TypeError(f"width {width} does not suit this encoder")

        return {"picky": picky}


def test_a_factory_raising_type_error_is_reported_like_value_error(corex_pm, tiny_recipe):
    register(corex_pm, TypeErrorFactory, name="picky-plugin")
    tiny_recipe["model"]["encoder"] = {"name": "picky", "width": 3}
    recipe = corex.load_recipe(tiny_recipe)  # the options bind; only building finds the problem
    with pytest.raises(corex.recipe.RecipeError, match=r"model.encoder: encoder 'picky' \(plugin 'picky-plugin'\): width 3 does not suit this encoder"):
        corex.build_model(recipe, num_classes=4)


# -- light plugins: what `corex --help` loads -------------------------------------------------------

BUILT_IN_PACKAGES = ["corex_encoders", "corex_heads", "corex_eval", "corex_cxr", "corex_kornia", "corex_moco",
                     "corex_inpaint", "corex_keras", "corex_predict", "corex_study", "corex_optim", "corex_byol", "corex_track",
                     "corex_ssl"]


def test_every_built_in_package_is_checked_for_lightness():
    """Every plugin corex's own distribution registers is in the list above (a new one cannot slip past)."""
    from importlib.metadata import distribution

    from corex.plugins import _own_distribution

    registered = {ep.value for ep in distribution(_own_distribution()).entry_points if ep.group == "corex"}
    assert registered and registered <= set(BUILT_IN_PACKAGES), registered - set(BUILT_IN_PACKAGES)


@pytest.mark.parametrize("package", BUILT_IN_PACKAGES)
def test_each_built_in_plugin_loads_without_torch(package):
    """Importing the package, calling its hooks and reading its factories' signatures imports nothing heavy."""
    assert_light(package)


def test_assert_light_names_what_a_heavy_plugin_imports(tmp_path, monkeypatch):
    (tmp_path / "corex_heavy_plugin.py").write_text("import numpy\n\ndef corex_encoders():\n    return {}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="imported numpy: import them inside the factories"):
        assert_light("corex_heavy_plugin")


def test_assert_mirrors_names_the_option_that_drifted():
    def implementation(*, width: int = 64, depth: int = 4): ...

    def factory(*, width: int = 32, depth: int = 4): ...

    assert_mirrors(implementation, implementation)
    with pytest.raises(pytest.fail.Exception, match=r"the factory has \[\('width', 'keyword-only', 32\)\]"):
        assert_mirrors(factory, implementation)
