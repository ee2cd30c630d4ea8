"""A normal (non-editable) install ships the recipes: `corex recipes` lists them and they validate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_wheel_install_lists_and_validates_the_shipped_recipes(tmp_path):
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(wheels)],
                   check=True, cwd=tmp_path, capture_output=True, timeout=300)
    # The venv sees this environment's torch & co., but its own corex comes from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *map(str, wheels.glob("*.whl"))],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def corex(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-m", "corex.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    where = subprocess.run([str(python), "-c", "import corex; print(corex.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert str(venv) in where.stdout, where  # the installed copy, not this checkout
    listing = corex("recipes")
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert {"quickstart", "classification", "phantom/moco_multitask", "siim/multitask_scratch"} <= set(names), names
    for name in ("quickstart", "phantom/inpaint_multitask"):
        checked = corex("validate", name, "--no-build") if "--no-build" in corex("validate", "--help").stdout else corex("validate", name)
        assert checked.returncode == 0, checked.stderr
