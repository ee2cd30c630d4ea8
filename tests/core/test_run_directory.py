"""What a user sees while a run works, and how a run directory survives resumes, kills and bad files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

import corex
from corex import rundir
from corex.errors import CorexError


def _write(recipe: dict, tmp_path: Path, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def quick_recipe(tiny_recipe):
    tiny_recipe["data"]["studies"] = 80
    tiny_recipe["stages"]["train"]["epochs"] = 2
    tiny_recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 20}]
    return tiny_recipe


def test_a_run_on_a_log_names_its_directory_first_shows_plain_progress_and_ends_with_a_table(corex_cli, quick_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("COREX_PROGRESS_EVERY", "2")
    out = tmp_path / "run"
    code, stdout, err = corex_cli("--progress", "lines", "run", _write(quick_recipe, tmp_path), "--out", out)
    assert code == 0, err
    first = err.splitlines()[:2]
    assert any(str(out) in line for line in first), first
    assert "\r" not in err
    progress_lines = [line for line in err.splitlines() if line.startswith("[train] epoch 1/2:")]
    assert progress_lines and "steps (" in progress_lines[0] and "eta" in progress_lines[0], err
    assert "run eta" in err
    assert "{" not in stdout  # no JSON without --json
    results = json.loads((out / "results.json").read_text())
    f1 = results["stages"]["test"]["metrics"]["macro_f1"]
    table = [line.split() for line in stdout.splitlines()]
    assert ["macro_f1", f"{f1:.3f}"] == table[2][:2], stdout
    assert f"results:  {out / 'results.json'}" in stdout
    code, stdout, err = corex_cli("run", _write(quick_recipe, tmp_path), "--out", out, "--resume", "--json")
    assert code == 0 and json.loads(stdout) == results
    assert "already complete" in err


def test_counts_print_as_integers(corex_cli, quick_recipe, tmp_path):
    code, _, err = corex_cli("--progress", "off", "run", _write(quick_recipe, tmp_path), "--out", tmp_path / "run")
    assert code == 0, err
    line = next(line for line in err.splitlines() if line.startswith("[test] test:"))
    assert " n 16 " in line + " " and "n 16.0" not in line, line


def test_resume_with_a_changed_learning_rate_names_the_key_and_both_values(corex_cli, quick_recipe, tmp_path):
    path, out = _write(quick_recipe, tmp_path), tmp_path / "run"
    assert corex_cli("--progress", "off", "run", path, "--out", out)[0] == 0
    code, _, err = corex_cli("run", path, "--out", out, "--resume", "--set", "optimizer.lr=0.01")
    assert code == 2 and "Traceback" not in err
    assert "optimizer.lr: 0.003 in the run, 0.01 now" in err, err


def test_overwrite_starts_afresh_and_a_longer_stage_extends_a_finished_run(corex_cli, quick_recipe, tmp_path):
    path, out = _write(quick_recipe, tmp_path), tmp_path / "run"
    assert corex_cli("--progress", "off", "run", path, "--out", out)[0] == 0
    code, _, err = corex_cli("run", path, "--out", out)
    assert code == 2 and "--overwrite" in err and "--resume" in err
    code, _, err = corex_cli("--progress", "off", "run", path, "--out", out, "--resume", "--set", "stages.train.epochs=3")
    assert code == 0, err
    assert "extending stage 'train' from 2 to 3 epochs" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"]["train"]["epochs"] == 3
    (out / "marker.txt").write_text("old")
    code, _, err = corex_cli("--progress", "off", "run", path, "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "marker.txt").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_run_directory_in_use_is_refused_and_stale_temporaries_are_removed(corex_cli, quick_recipe, tmp_path):
    path, out = _write(quick_recipe, tmp_path), tmp_path / "run"
    assert corex_cli("--progress", "off", "run", path, "--out", out)[0] == 0
    lock = rundir.RunLock(out)
    lock.acquire()
    try:
        code, _, err = corex_cli("run", path, "--out", out, "--resume")
        assert code == 2 and "is in use by corex process" in err and str(os.getpid()) in err
    finally:
        lock.release()
    stale = out / "checkpoints" / "train" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    code, _, err = corex_cli("run", path, "--out", out, "--resume")
    assert code == 0 and not stale.exists() and "removed 1 temporary file" in err


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "pickled"])
def test_a_damaged_last_checkpoint_is_a_message_not_a_traceback(corex_cli, quick_recipe, tmp_path, damage):
    path, out = _write(quick_recipe, tmp_path), tmp_path / "run"
    assert corex_cli("--progress", "off", "run", path, "--out", out, "--set", "stages.train.epochs=1")[0] == 0
    results = json.loads((out / "results.json").read_text())
    del results["stages"]["train"], results["stages"]["test"]
    rundir.write_json(out / "results.json", results)  # as if killed before the stage ended
    last = out / "checkpoints" / "train" / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:5000])
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, last)
    else:
        torch.save({"model": {}, "evil": Path("x")}, last)  # a pickled object, not a tensor
    code, _, err = corex_cli("run", path, "--out", out, "--resume", "--set", "stages.train.epochs=1")
    assert code == 2, err
    assert "Traceback" not in err and str(last) in err
    assert "weights_only=False" not in err
    expected = {"truncated": "damaged", "empty": "empty", "foreign": "not a corex checkpoint", "pickled": "pickled Python objects"}[damage]
    assert expected in err, err


def test_a_bad_stage_model_and_an_encoder_file_that_is_not_one_are_messages(corex_cli, quick_recipe, tmp_path):
    path, out = _write(quick_recipe, tmp_path), tmp_path / "run"
    assert corex_cli("--progress", "off", "run", path, "--out", out, "--set", "stages.train.epochs=1")[0] == 0
    results = json.loads((out / "results.json").read_text())
    del results["stages"]["test"]
    rundir.write_json(out / "results.json", results)
    model = out / "checkpoints" / "train" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    code, _, err = corex_cli("run", path, "--out", out, "--resume", "--set", "stages.train.epochs=1")
    assert code == 2 and "Traceback" not in err and str(model) in err
    for payload, words in (([1, 2, 3], "holds a list"), (torch.zeros(3), "holds a Tensor")):
        weights = tmp_path / "weights.pt"
        torch.save(payload, weights)
        recipe = dict(quick_recipe)
        recipe["stages"] = {"train": {**quick_recipe["stages"]["train"], "epochs": 1, "encoder_from": str(weights)}}
        code, _, err = corex_cli("run", _write(recipe, tmp_path, "transfer.yaml"), "--out", tmp_path / f"t{len(words)}")
        assert code == 2 and "Traceback" not in err and words in err and "encoder_from" in err, err


@pytest.mark.parametrize("where", ["inside_a_file", "proc", "recipe_output", "cache_dir"])
def test_unwritable_places_are_messages(corex_cli, quick_recipe, tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = []
    if where == "inside_a_file":
        args = ["--out", afile / "run"]
    elif where == "proc":
        args = ["--out", "/proc/corex-run"]
    elif where == "recipe_output":
        quick_recipe["output"] = "/proc/corex-output"
    else:
        args = ["--out", tmp_path / "run", "--set", "data.cache_dir=/proc/corex-cache"]
        quick_recipe["data"]["name"] = "phantom"
        quick_recipe["data"].pop("studies")
    code, _, err = corex_cli("run", _write(quick_recipe, tmp_path), *args)
    assert code == 2, err
    assert "Traceback" not in err
    key = {"inside_a_file": "--out", "proc": "--out", "recipe_output": "--out", "cache_dir": "data.cache_dir"}[where]
    assert key in err and "cannot" in err, err


def test_a_full_disk_while_writing_a_checkpoint_says_so(corex_cli, quick_recipe, tmp_path, monkeypatch):
    real_save = torch.save

    def save_to_a_full_disk(obj, path, *args, **kwargs):
        if str(path).endswith(".tmp") and ".last.pt." in str(path):
            with open("/dev/full", "wb") as full:  # the kernel's own "no space left on device"
                return real_save(obj, full, *args, **kwargs)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(rundir.torch, "save", save_to_a_full_disk)
    code, _, err = corex_cli("--progress", "off", "run", _write(quick_recipe, tmp_path), "--out", tmp_path / "run")
    assert code == 1, err
    assert "Traceback" not in err and "no space left on the device" in err and "last.pt" in err
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_run_files_follow_the_umask_and_provenance_is_recorded(corex_cli, quick_recipe, tmp_path):
    old = os.umask(0o022)
    try:
        rundir.FILE_MODE = rundir._file_mode()
        code, _, err = corex_cli("--progress", "off", "run", _write(quick_recipe, tmp_path), "--out", tmp_path / "run")
    finally:
        os.umask(old)
        rundir.FILE_MODE = rundir._file_mode()
    assert code == 0, err
    for name in ("results.json", "recipe.yaml", "metrics.jsonl", "checkpoints/train/model.pt"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name
    info = json.loads((tmp_path / "run" / "provenance.json").read_text())["started"]
    assert info["torch"] == torch.__version__ and info["device"] == "cpu" and info["python"]
    assert "command" in info


def test_the_python_api_names_its_own_arguments(quick_recipe, tmp_path):
    recipe = corex.load_recipe(quick_recipe)
    corex.run(recipe, out=tmp_path / "run", progress=False)
    with pytest.raises(CorexError, match=r"pass resume=True to continue that run, overwrite=True"):
        corex.run(recipe, out=tmp_path / "run", progress=False)


def test_ctrl_c_before_the_run_directory_exists_suggests_no_resume(corex_cli, quick_recipe, tmp_path, monkeypatch):
    from corex.lifecycle import RunDirectory

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "open", interrupted)
    code, _, err = corex_cli("run", _write(quick_recipe, tmp_path), "--out", tmp_path / "run")
    assert code == 130 and "--resume" not in err and "nothing was written" in err


def test_a_factory_raising_type_error_is_a_recipe_problem(corex_pm, quick_recipe, tmp_path):
    from corex import hookimpl
    from corex.plugins import register

    def broken_evaluator(class_names: list, bootstrap: int = 0):
        raise TypeError("bootstrap must be even")

    class Broken:
        @staticmethod
        @hookimpl
        def corex_evaluators():
            return {"broken": broken_evaluator}

    register(corex_pm, Broken, name="broken-plugin")
    quick_recipe["stages"]["test"]["evaluators"] = ["broken"]
    recipe = corex.load_recipe(quick_recipe)
    from corex.errors import RecipeError

    with pytest.raises(RecipeError, match=r"stages.test.evaluators\[0\]: evaluator 'broken' \(plugin 'broken-plugin'\): bootstrap must be even"):
        corex.run(recipe, out=tmp_path / "run", progress=False)


def test_the_resolved_recipe_holds_the_values_used_and_only_keys_that_apply(quick_recipe, tmp_path):
    recipe = corex.load_recipe(quick_recipe)
    corex.run(recipe, out=tmp_path / "run", progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    train, test = saved["stages"]["train"], saved["stages"]["test"]
    assert train["batch_size"] == 8 and train["optimizer"]["lr"] == 0.003 and train["schedule"]["warmup_epochs"] == 0.5
    assert saved["data"]["cache_dir"] not in (None, "")
    assert "split" not in train and "objective" not in train
    assert set(test) <= {"kind", "batch_size", "evaluators", "split", "encoder_from", "amp"} and "optimizer" not in test
    assert corex.load_recipe(saved).resolved(Path("/unused")) == saved
