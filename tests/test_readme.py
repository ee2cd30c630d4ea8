"""README's promises: CI runs its test command, and the documents it links exist."""

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
        assert (ROOT / link).exists(), link
