"""A run killed with SIGKILL at the worst moments resumes to the records of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from corex.testing import tiny_recipe_dict

TOY_MODULE = "from corex.testing import ToyPlugin\ncorex_datasets = ToyPlugin.corex_datasets\n"
# Fields that measure time, and so differ between any two runs.
TIMING = {"images_per_s", "train_time_s", "time_s"}


def _recipe(tmp_path: Path) -> Path:
    recipe = tiny_recipe_dict()
    recipe["data"]["studies"] = 80
    recipe["stages"]["train"]["epochs"] = 3
    recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 20}]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    (tmp_path / "corex_toy_plugin.py").write_text(TOY_MODULE)
    return path


def _corex(tmp_path: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COREX_PLUGINS": "corex_toy_plugin", "PYTHONPATH": str(tmp_path), "COREX_PROGRESS": "off"}
    env.pop("COREX_FAULT_AT", None)
    if fault:
        env["COREX_FAULT_AT"] = fault
    return subprocess.run([sys.executable, "-m", "corex.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def _records(out: Path) -> tuple[list[dict], dict]:
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    for stage in results["stages"].values():
        for key in TIMING:
            stage.pop(key, None)
    return rows, results


@pytest.mark.slow
def test_sigkill_at_each_fault_point_then_resume_equals_an_uninterrupted_run(tmp_path):
    recipe = _recipe(tmp_path)
    reference = tmp_path / "reference"
    done = _corex(tmp_path, "run", str(recipe), "--out", str(reference))
    assert done.returncode == 0, done.stderr
    expected = _records(reference)
    # Between last.pt and the metrics row; between model.pt and results.json; before the evaluation's results.
    for fault in ("after_checkpoint:train:2", "after_model:train", "before_results:test"):
        out = tmp_path / fault.replace(":", "-")
        killed = _corex(tmp_path, "run", str(recipe), "--out", str(out), fault=fault)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr)
        resumed = _corex(tmp_path, "run", str(recipe), "--out", str(out), "--resume")
        assert resumed.returncode == 0, (fault, resumed.stderr)
        assert _records(out) == expected, fault
        results = json.loads((out / "results.json").read_text())
        assert results["stages"]["train"]["images_per_s"] > 0, fault
