"""Real multi-process training: two gloo processes started by torchrun, against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from corex.testing import tiny_recipe_dict

from .test_faults import TIMING, TOY_MODULE


def _rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "metrics.jsonl").read_text().splitlines()]


def _corex(tmp_path, *args, fault=None):
    env = {**os.environ, "COREX_PLUGINS": "corex_toy_plugin", "PYTHONPATH": str(tmp_path), "COREX_PROGRESS": "off"}
    env.pop("COREX_FAULT_AT", None)
    if fault:
        env["COREX_FAULT_AT"] = fault
    return subprocess.run([sys.executable, "-m", "corex", *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch_and_a_killed_run_resumes(tmp_path):
    (tmp_path / "corex_toy_plugin.py").write_text(TOY_MODULE)
    recipe = tiny_recipe_dict()
    recipe["data"]["studies"] = 80  # 48 training images: 6 global batches of 8 per epoch
    # A linear probe: the encoder's batch norm uses running statistics, so per-rank batches of 4
    # compute exactly what one batch of 8 does, and any difference is in the gradient averaging.
    recipe["stages"]["train"].update(epochs=3, freeze=True, heads={"classification": {}},
                                     evaluators=[{"name": "classification", "bootstrap": 0}])
    recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 20}]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    one = _corex(tmp_path, "run", path, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _corex(tmp_path, "run", path, "--out", tmp_path / "two", "--nproc", "2")
    assert two.returncode == 0, two.stderr
    assert "[rank 0/2]" in two.stderr
    single, double = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["epoch"] for r in double] == [1, 2, 3]  # one row per epoch, written by rank 0 alone
    assert all(r["processes"] == 2 and r["global_batch"] == 8 and r["images"] == 48 for r in double)
    # Stated tolerance: 1e-4 relative; what remains is float summation order across the two ranks.
    for a, b in zip(single, double):
        for key in ("train/loss", "val/loss", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a[key], b[key])
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert results[1]["stages"]["test"]["metrics"]["n"] == results[0]["stages"]["test"]["metrics"]["n"] == 16  # every test study once
    # Each rank predicted its share of the test split; rank 0 gathered and scored them all.
    for key in ("loss", "accuracy", "macro_f1", "auroc", "study_map", "brier"):
        assert results[1]["stages"]["test"]["metrics"][key] == pytest.approx(results[0]["stages"]["test"]["metrics"][key], rel=1e-4), key

    killed = _corex(tmp_path, "run", path, "--out", tmp_path / "killed", "--nproc", "2", fault="after_checkpoint:train:2")
    assert killed.returncode != 0
    resumed = _corex(tmp_path, "run", path, "--out", tmp_path / "killed", "--nproc", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "after epoch 2 of 3" in resumed.stderr
    assert _rows(tmp_path / "killed") == double  # every rank's RNG state is in the checkpoint: an exact resume

    # Another number of processes: accepted, with a warning saying what is no longer exact.
    again = _corex(tmp_path, "run", path, "--out", tmp_path / "fewer", "--nproc", "2", fault="after_checkpoint:train:2")
    assert again.returncode != 0
    alone = _corex(tmp_path, "run", path, "--out", tmp_path / "fewer", "--resume")
    assert alone.returncode == 0, alone.stderr
    assert "written by 2 process(es) and is resumed by 1" in alone.stderr
    assert [r["epoch"] for r in _rows(tmp_path / "fewer")] == [1, 2, 3]


def test_sync_batchnorm_on_the_cpu_is_refused_with_the_reason(tiny_recipe, tmp_path):
    import corex
    from corex.errors import CorexError

    tiny_recipe["model"]["sync_batchnorm"] = True
    tiny_recipe["device"] = "cpu"
    with pytest.raises(CorexError, match="model.sync_batchnorm: torch's SyncBatchNorm runs only on CUDA devices"):
        corex.run(corex.load_recipe(tiny_recipe), out=tmp_path / "run", progress=False)


@pytest.mark.slow
def test_two_processes_pretrain_on_a_stage_of_its_own_data(tmp_path):
    from .test_stage_data import _recipe, _unlabelled_folder

    _unlabelled_folder(tmp_path / "corpus")
    path = tmp_path / "external.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path), sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "corex", "run", str(path), "--out", str(tmp_path / "run"), "--nproc", "2"],
                          env={**os.environ, "COREX_PROGRESS": "off"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["stages"]["pretrain"]["train"]["images"] == 40
    assert [json.loads(line)["processes"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [2, 2]
