"""Documentation promises: CI runs the README's test command, linked documents exist, references are complete."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command.strip() in [line.strip() for line in ci]


def test_the_readme_quickstart_runs_the_shipped_quickstart_recipe():
    readme = (ROOT / "README.md").read_text()
    assert "corex run recipes/quickstart.yaml" in readme
    assert (ROOT / "recipes" / "quickstart.yaml").exists()


def test_linked_documents_exist():
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(((?:docs)/[^)]+)\)", readme):
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), link
        if anchor:  # a GitHub heading anchor: lower case, spaces as hyphens, punctuation dropped
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), flags=re.MULTILINE)
            anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
            assert anchor in anchors, link


def test_every_hook_is_in_the_hook_reference():
    from corex import hookspecs

    text = (ROOT / "docs" / "hooks.md").read_text()
    for name in dir(hookspecs):
        if name.startswith("corex_"):
            assert f"`{name}" in text, name


def test_every_recipe_key_is_in_the_recipe_reference():
    import attrs

    from corex.recipe import Data, Recipe, Stage

    from corex.kinds import run_level

    text = (ROOT / "docs" / "recipes.md").read_text()
    for kind in run_level():  # top-level component lists, e.g. loggers
        assert f"\n{kind.name}:" in text, kind.name
    for cls in (Recipe, Data, Stage):
        for field in attrs.fields(cls):
            if field.name not in {"source", "options", "name", "components"}:
                assert f"`{field.name}`" in text or f"\n  {field.name}:" in text or f"\n{field.name}:" in text, f"{cls.__name__}.{field.name}"


def test_every_protocol_has_its_section_in_the_contract_page():
    import inspect
    from typing import Protocol

    from corex import interfaces

    text = (ROOT / "docs" / "contract.md").read_text()
    headings = set(re.findall(r"^## (\w+)", text, flags=re.MULTILINE))
    for name, value in vars(interfaces).items():
        if inspect.isclass(value) and issubclass(value, Protocol) and value is not Protocol and value.__module__ == interfaces.__name__:
            assert name in headings or f"**{name}**" in text, name
    assert "Batch" in text
