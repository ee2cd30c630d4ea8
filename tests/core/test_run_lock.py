"""One process per run directory, for the whole run: a second `corex run` on a folder in use is
refused (exit 2, naming the folder) at every phase of the first, and leaves the first run's files
alone. The first run pauses at each phase through an observer plugin (COREX_PLUGINS) that signals
with a file and waits for the test's go-ahead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from corex.testing import tiny_recipe_dict

PAUSING_PLUGIN = '''
"""Pauses a run at the phases named in COREX_PAUSE_AT until COREX_PAUSE_DIR/PHASE.go exists."""
import os
import time
from pathlib import Path

from corex import hookimpl
from corex.testing import ToySource

PHASES = set(filter(None, os.environ.get("COREX_PAUSE_AT", "").split(",")))
FOLDER = Path(os.environ.get("COREX_PAUSE_DIR", "."))


def pause(phase):
    if phase not in PHASES:
        return
    (FOLDER / (phase + ".paused")).write_text(str(os.getpid()))
    deadline = time.monotonic() + 600
    while not (FOLDER / (phase + ".go")).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def paused_toy(*, image_size: int, seed: int, studies: int = 64, noise: float = 0.1):
    pause("building the data")
    return ToySource(image_size=image_size, seed=seed, studies=studies, noise=noise)


@hookimpl
def corex_datasets():
    return {"paused_toy": paused_toy}


@hookimpl
def corex_run_start(run):
    pause("run start")


@hookimpl
def corex_epoch_end(run, stage, epoch, metrics):
    pause(f"end of {stage} epoch {epoch}")


@hookimpl
def corex_stage_end(run, stage, results):
    pause(f"end of stage {stage}")


@hookimpl
def corex_run_end(run, results):
    pause("run end")
'''

# Every phase of a run, in order: right after the folder is opened (the data is built next), the
# run's start, between two epochs, between two stages, after the last stage, while the run ends.
PHASES = ["building the data", "run start", "end of train epoch 1", "end of stage train", "end of stage test", "run end"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COREX_FAULT_AT", "COREX_PAUSE_AT")}
    env.update({"COREX_PLUGINS": "corex_pausing_plugin", "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")])),
                "COREX_PROGRESS": "off", "COREX_PAUSE_DIR": str(tmp_path / "signals"), **extra})
    return env


def _wait_for(path: Path, first: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if first.poll() is not None:
            pytest.fail(f"the first run ended (exit {first.returncode}) before pausing at '{path.stem}':\n{first.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the first run never reached '{path.stem}'")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_is_refused_at_every_phase_of_the_first_and_leaves_it_alone(tmp_path):
    (tmp_path / "corex_pausing_plugin.py").write_text(PAUSING_PLUGIN)
    (tmp_path / "signals").mkdir()
    recipe = tiny_recipe_dict()
    recipe["data"] = {"name": "paused_toy", "image_size": 32, "batch_size": 8, "studies": 80}
    recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 0}]
    path, out = tmp_path / "tiny.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "corex.cli", "run", str(path), "--out", str(out)]
    first = subprocess.Popen(command, env=_env(tmp_path, COREX_PAUSE_AT=",".join(PHASES)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for index, phase in enumerate(PHASES):
            _wait_for(tmp_path / "signals" / f"{phase}.paused", first)
            before = sorted(p.relative_to(out) for p in out.rglob("*"))
            # --overwrite would delete the first run's files, --resume would train in them, and a plain
            # run would start another run in them: each must be refused because the folder is in use.
            flag = ["--overwrite", "--resume", None][index % 3]
            second = subprocess.run(command + ([flag] if flag else []), env=_env(tmp_path), capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, (phase, flag, second.stderr[-3000:])
            assert f"'{out}' is in use by corex process {first.pid}" in second.stderr, (phase, flag, second.stderr[-3000:])
            assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, (phase, flag)
            (tmp_path / "signals" / f"{phase}.go").write_text("")
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["stages"]) == {"train", "test"}
    # Once the first run is over, the folder is free again.
    again = subprocess.run(command + ["--resume"], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr[-3000:]
