"""The release: the distribution's own name, one version, artefacts that build, check and install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import corex

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "corex-cxr"
TEXT_FILES = [p for p in ROOT.rglob("*") if p.suffix in {".md", ".toml", ".py", ".txt", ".yaml", ".cfg"} and p.is_file()
              and not any(part in {"build", ".git", "runs"} or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_no_project_file_asks_pip_for_the_unrelated_corex():
    """`corex` on the package index is another author's project: every requirement names corex-cxr."""
    found = []
    for path in ROOT.rglob("pyproject.toml"):
        if "build" in path.relative_to(ROOT).parts:
            continue
        project = tomllib.loads(path.read_text()).get("project", {})
        requirements = [*project.get("dependencies", []), *(r for extra in project.get("optional-dependencies", {}).values() for r in extra)]
        found += [f"{path.relative_to(ROOT)}: {r}" for r in requirements if requirement_name(r) == "corex"]
    for path in TEXT_FILES:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for command in re.findall(r"pip install ([^`#\n&;|]*)", line):
                words = [w.strip("'\"") for w in command.split() if not w.startswith("-")]
                found += [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for w in words if requirement_name(w) == "corex"]
    assert found == []


def test_the_version_has_one_source_and_the_command_reports_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION and "version" in project["dynamic"]
    done = subprocess.run([sys.executable, "-m", "corex", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"corex {corex.__version__}"
    from importlib.metadata import version

    assert version(DISTRIBUTION) == corex.__version__
    assert f"## {corex.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_every_extra_keeps_the_pinned_cpu_torch():
    """No extra may ask for another torch: a CPU machine would download a multi-GB CUDA build."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"keras", "onnx", "tracking", "ray", "test"} <= set(extras)
    for name, requirements in extras.items():
        assert not [r for r in requirements if requirement_name(r) in {"torch", "torchvision", "timm"}], name


@pytest.mark.slow
def test_the_built_wheel_installs_in_a_fresh_environment_with_an_extra(tmp_path):
    """Build the wheel and sdist with the standard frontend, check their metadata, install the wheel (not
    editable) with the tracking extra into a new virtual environment, and use it."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)], check=True, capture_output=True)
    wheel, = dist.glob("*.whl")
    sdist, = dist.glob("*.tar.gz")
    assert wheel.name == f"corex_cxr-{corex.__version__}-py3-none-any.whl"
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0", f"{wheel}[tracking]"], check=True, capture_output=True)
    clean = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "COREX_PLUGINS"}} | {"COREX_CACHE": str(tmp_path / "cache")}
    corex_command = [str(env / "bin" / "corex")]
    version = subprocess.run([*corex_command, "--version"], capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert version.stdout.strip() == f"corex {corex.__version__}", version.stderr
    plugins = subprocess.run([*corex_command, "plugins"], capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert plugins.returncode == 0 and f"entry point of {DISTRIBUTION}" in plugins.stdout and "tensorboard" in plugins.stdout
    located = subprocess.run([str(python), "-c", "import corex; print(corex.__file__)"], capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert str(env) in located.stdout  # the installed wheel, not this checkout
    run = subprocess.run(
        [*corex_command, "--progress", "off", "run", "quickstart", "--out", str(tmp_path / "run"), "--set", "data.studies=60",
         "--set", "data.image_size=32", "--set", "stages.train.epochs=1", "--set", "stages.train.max_steps_per_epoch=1",
         "--set", "model.encoder.width=4", "--set", "loggers=[tensorboard]"],
        capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").exists() and any((tmp_path / "run" / "tensorboard").iterdir())
    provenance = (tmp_path / "run" / "provenance.json").read_text()
    assert f'"corex": "{corex.__version__}"' in provenance
