"""Resume, in one process (corex/training.py's _checkpoint and _restore): a run stopped at each fault
point and resumed gives the records of an uninterrupted run, with EMA and mid-epoch checkpoints.
(tests/core/test_faults.py does the same with real SIGKILLs, in subprocesses: slower.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import corex
from corex import rundir, training
from corex.testing import tiny_recipe_dict

TIMING = {"images_per_s", "train_time_s", "time_s"}


class Killed(BaseException):
    """What SIGKILL would do at a fault point, without leaving the process."""


def recipe() -> dict:
    r = tiny_recipe_dict()
    r["data"]["studies"] = 80
    r["stages"]["train"].update(epochs=2, ema=0.9, checkpoint_every=3)
    r["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 0}]
    return r


def records(out: Path) -> tuple[list[dict], dict]:
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    for stage in results["stages"].values():
        for key in TIMING:
            stage.pop(key, None)
    return rows, results


def run(out: Path, fault: str | None = None, monkeypatch=None, **kwargs) -> None:
    if fault is not None:
        def fault_point(point: str, stage: str, epoch=None) -> None:
            if fault == f"{point}:{stage}" + (f":{epoch}" if epoch is not None else ""):
                raise Killed(fault)

        monkeypatch.setattr(training, "fault_point", fault_point)
        monkeypatch.setattr(rundir, "fault_point", fault_point)
        with pytest.raises(Killed):
            corex.run(corex.load_recipe(recipe()), out=out, progress=False, **kwargs)
        monkeypatch.undo()
        return
    corex.run(corex.load_recipe(recipe()), out=out, progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from corex.plugins import get_plugin_manager, register, reset_plugin_manager
    from corex.testing import ToyPlugin

    reset_plugin_manager()
    register(get_plugin_manager(), ToyPlugin, name="corex-toy")
    out = tmp_path_factory.mktemp("reference") / "run"
    run(out)
    yield records(out)
    reset_plugin_manager()


# Between last.pt and its metrics row; after the row; after a mid-epoch checkpoint (epoch 2, step 3);
# after the stage's model.pt.
@pytest.mark.parametrize("fault", ["after_checkpoint:train:1", "after_row:train:1", "after_step_checkpoint:train:2:3", "after_model:train"])
def test_a_run_stopped_at_a_fault_point_resumes_to_the_records_of_an_uninterrupted_one(reference, tmp_path, monkeypatch, capsys, fault):
    out = tmp_path / "run"
    run(out, fault, monkeypatch)
    rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    assert len(rows) == {"after_checkpoint:train:1": 0, "after_row:train:1": 1, "after_step_checkpoint:train:2:3": 1, "after_model:train": 2}[fault]
    capsys.readouterr()
    run(out, resume=True)
    err = capsys.readouterr().err
    if fault == "after_step_checkpoint:train:2:3":
        assert "[train] resumed in epoch 2 after step 3" in err, err
    elif fault != "after_model:train":
        assert "[train] resumed after epoch 1" in err, err
    assert records(out) == reference


def test_a_checkpoint_from_another_number_of_processes_resumes_with_a_warning(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run(out, "after_row:train:1", monkeypatch)
    last = out / "checkpoints" / "train" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1 and state["within"] is None and state["world_size"] == 1
    assert state["row"] == json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(state) >= {"model", "optimizer", "schedule", "scaler", "ema", "best", "rng", "rng_ranks", "arch"}
    assert state["best"]["epoch"] == 1 and state["best"]["metrics"]
    state["world_size"] = 2
    torch.save(state, last)
    capsys.readouterr()
    run(out, resume=True)
    err = capsys.readouterr().err
    assert "warning: [train] '" in err and "was written by 2 process(es) and is resumed by 1" in err, err
    assert records(out) == reference  # the same samples in the same order; this rank's RNG state is the one saved


def test_a_mid_epoch_checkpoint_holds_the_step_and_the_running_sums(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, "after_step_checkpoint:train:2:3", monkeypatch)
    state = torch.load(out / "checkpoints" / "train" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["row"] is None
    within = state["within"]
    assert within["step"] == 3 and within["seen"] == 24 and within["elapsed"] > 0
    assert set(within["sums"]) >= {"train/loss"} and within["sums"]["train/loss"] > 0


@pytest.fixture(scope="module")
def stopped(reference, tmp_path_factory):
    """A run stopped after epoch 1 (its last.pt is edited by the tests below, each on a copy)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as patch:
        run(out, "after_row:train:1", patch)
    return out


def _damage(state: dict, how: str) -> None:
    if how == "no ema":
        del state["ema"]
    elif how == "ema of another model":
        state["ema"] = {"n_averaged": torch.tensor(1), "module.other.weight": torch.zeros(2)}
    elif how == "ema not a mapping":
        state["ema"] = None
    elif how == "optimizer of another model":
        state["optimizer"] = {"state": {}, "param_groups": []}
    elif how == "optimizer not a mapping":
        state["optimizer"] = [1, 2]
    elif how == "rng of another kind":
        state["rng_ranks"][0]["torch"] = torch.zeros(3, dtype=torch.uint8)
    elif how == "rng without python":
        del state["rng_ranks"][0]["python"]


@pytest.mark.parametrize("how, words", [
    ("no ema", "is not a corex checkpoint of this kind (it lacks ema)"),
    ("ema of another model", "does not fit this stage's EMA (Error(s) in loading state_dict for AveragedModel"),
    ("ema not a mapping", "does not fit this stage's EMA ("),
    ("optimizer of another model", "does not fit this stage's objective or optimizer (loaded state dict has a different number"),
    ("optimizer not a mapping", "does not fit this stage's objective or optimizer ("),
    ("rng of another kind", "does not fit this stage's objective or optimizer ("),
    ("rng without python", "does not fit this stage's objective or optimizer ('python')"),
])
def test_a_last_checkpoint_that_does_not_fit_the_stage_is_a_message(stopped, tmp_path, how, words):
    import shutil

    from corex.errors import CorexError

    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    last = out / "checkpoints" / "train" / "last.pt"
    state = torch.load(last, weights_only=True)
    _damage(state, how)
    torch.save(state, last)
    with pytest.raises(CorexError) as caught:
        run(out, resume=True)
    text = str(caught.value)
    assert text.startswith(f"--resume (stage 'train'): '{last}'") or text.startswith(f"resume=True (stage 'train'): '{last}'"), text
    assert words in text, text


def test_a_checkpoint_that_does_not_say_how_many_processes_wrote_it_was_written_by_one(stopped, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    last = out / "checkpoints" / "train" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["world_size"]  # as corex wrote it before distributed training
    torch.save(state, last)
    capsys.readouterr()
    run(out, resume=True)
    assert "warning" not in capsys.readouterr().err


class StopAfterPretrainEpoch1:
    @staticmethod
    @corex.hookimpl
    def corex_epoch_end(stage, epoch):
        if stage == "pretrain" and epoch == 1:
            raise Killed("after pretrain epoch 1")


def test_a_pretraining_checkpoint_without_its_objective_is_a_message(reference, tmp_path):
    from corex.errors import CorexError
    from corex.plugins import get_plugin_manager

    recipe = tiny_recipe_dict()
    recipe["data"]["studies"] = 40
    recipe["stages"] = {"pretrain": {"kind": "pretrain", "epochs": 2, "objective": {"name": "inpaint"}}}
    out = tmp_path / "run"
    pm = get_plugin_manager()
    pm.register(StopAfterPretrainEpoch1, name="stopper")
    try:
        with pytest.raises(Killed):
            corex.run(corex.load_recipe(recipe), out=out, progress=False)
    finally:
        pm.unregister(name="stopper")
    last = out / "checkpoints" / "pretrain" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["objective"] and any(k.startswith("decoder.") for k in state["objective"])  # the decoder is saved too
    del state["objective"]
    torch.save(state, last)
    with pytest.raises(CorexError, match=r"is not a corex checkpoint of this kind \(it lacks objective\)"):
        corex.run(corex.load_recipe(recipe), out=out, resume=True, progress=False)
