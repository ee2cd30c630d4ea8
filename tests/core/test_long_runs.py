"""Long epochs and smoothed weights: mid-epoch checkpoints that resume exactly, and EMA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import corex
from corex.testing import tiny_recipe_dict

from .test_faults import TIMING, TOY_MODULE


def _rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_at_that_step_to_the_uninterrupted_result(tmp_path):
    recipe = tiny_recipe_dict()
    recipe["data"]["studies"] = 80  # 48 training images: 6 steps of 8 per epoch
    recipe["stages"]["train"].update(epochs=2, checkpoint_every=2)
    recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 20}]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    (tmp_path / "corex_toy_plugin.py").write_text(TOY_MODULE)
    env = {**os.environ, "COREX_PLUGINS": "corex_toy_plugin", "PYTHONPATH": str(tmp_path), "COREX_PROGRESS": "off"}

    def corex_cli(out, *extra, fault=None):
        run_env = {**env, **({"COREX_FAULT_AT": fault} if fault else {})}
        return subprocess.run([sys.executable, "-m", "corex.cli", "run", str(path), "--out", str(out), *extra],
                              env=run_env, capture_output=True, text=True, timeout=300)

    done = corex_cli(tmp_path / "whole")
    assert done.returncode == 0, done.stderr
    killed = corex_cli(tmp_path / "killed", fault="after_step_checkpoint:train:2:4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(_rows(tmp_path / "killed")) == 1  # epoch 1 finished, epoch 2 stopped after step 4 of 6
    resumed = corex_cli(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed in epoch 2 after step 4" in resumed.stderr
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    again = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert again["stages"]["test"]["metrics"] == whole["stages"]["test"]["metrics"]


def test_ema_weights_are_validated_and_become_the_stage_model(tiny_recipe, tmp_path):
    tiny_recipe["data"]["studies"] = 80
    tiny_recipe["stages"]["train"].update(epochs=2, ema=0.9)
    tiny_recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 0}]
    recipe = corex.load_recipe(tiny_recipe)
    results = corex.run(recipe, out=tmp_path / "run", progress=False)
    last = torch.load(tmp_path / "run" / "checkpoints" / "train" / "last.pt", weights_only=True)
    final = torch.load(tmp_path / "run" / "checkpoints" / "train" / "model.pt", weights_only=True)["model"]
    best = torch.load(tmp_path / "run" / "checkpoints" / "train" / "best.pt", weights_only=True)["model"]
    averaged = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    key = "encoder.conv1.weight"
    assert not torch.equal(averaged[key], last["model"][key])  # the average is not the raw weights
    assert torch.equal(final[key], best[key])  # the stage's model is the best epoch's EMA weights
    if results["stages"]["train"]["best_epoch"] == 2:
        assert torch.equal(final[key], averaged[key])
    with pytest.raises(corex.errors.RecipeError if hasattr(corex, "errors") else Exception, match="stages.train.ema"):
        tiny_recipe["stages"]["train"]["ema"] = 1.5
        corex.load_recipe(tiny_recipe)
