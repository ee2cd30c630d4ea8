"""The public surface: built-in plugins use only what the core offers a third party, and one another
only through each package's public names."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import corex

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists())
EXAMPLE = ROOT / "examples" / "corex-example-plugin" / "src" / "corex_example"


def imports(package: Path):
    """``(file, line, module, name)`` for every ``from X import name`` and ``import X`` in a package."""
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    yield path, node.lineno, node.module, alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, node.lineno, alias.name, None


def public_names(module: str) -> set[str]:
    return set(getattr(importlib.import_module(module), "__all__", ()))


def problems_of(package: Path) -> list[str]:
    own = package.name
    found = []
    for path, line, module, name in imports(package):
        where = f"{path.relative_to(package.parent)}:{line}"
        top = module.split(".")[0]
        if top == "corex":
            if name is None:  # import corex / import corex.x
                if module not in ("corex", *corex.PUBLIC_MODULES):
                    found.append(f"{where}: import {module} (not a public core module)")
            elif module == "corex":
                if name not in corex.__all__ and f"corex.{name}" not in corex.PUBLIC_MODULES:
                    found.append(f"{where}: from corex import {name} (not in corex.__all__)")
            elif module not in corex.PUBLIC_MODULES:
                found.append(f"{where}: from {module} import {name} (not a public core module)")
            elif name not in public_names(module):
                found.append(f"{where}: from {module} import {name} (not in {module}.__all__)")
        elif top.startswith("corex_") and top != own:
            if module != top:
                found.append(f"{where}: from {module} import {name} (another plugin's private module; import from {top})")
            elif name is not None and name not in public_names(top):
                found.append(f"{where}: from {top} import {name} (not in {top}.__all__)")
    return found


@pytest.mark.parametrize("package", [*PLUGINS, EXAMPLE], ids=lambda p: p.name)
def test_a_plugin_imports_only_public_names(package):
    assert problems_of(package) == []


def test_the_check_finds_a_private_import(tmp_path):
    fake = tmp_path / "corex_fake"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "from corex.engine import Runner\nfrom corex.rundir import _jsonable\nfrom corex_eval.artefacts import slug\nfrom corex import hookimpl\n"
    )
    found = problems_of(fake)
    assert any("corex.engine" in p for p in found)
    assert any("_jsonable" in p for p in found)
    assert any("corex_eval.artefacts" in p for p in found)
    assert not any("hookimpl" in p for p in found)


@pytest.mark.parametrize("module", corex.PUBLIC_MODULES)
def test_every_public_module_declares_its_names_and_they_exist(module):
    names = public_names(module)
    assert names, f"{module} has no __all__"
    loaded = importlib.import_module(module)
    assert all(hasattr(loaded, name) for name in names)


def test_the_top_level_names_resolve():
    for name in corex.__all__:
        assert getattr(corex, name) is not None, name


def test_the_python_api_page_names_every_public_module():
    text = (ROOT / "docs" / "python-api.md").read_text()
    for module in corex.PUBLIC_MODULES:
        assert f"`{module}`" in text, module
