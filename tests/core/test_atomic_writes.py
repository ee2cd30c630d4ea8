"""The run directory's promises about files (corex/rundir.py): a write that fails leaves the previous
file as it was, checkpoints are written atomically (shown by a failure injected mid-write, whatever
the file the writer was handed), messages name the file, and the metrics log survives torn lines
and resumes."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import corex
from corex import checkpoints, rundir
from corex.errors import CorexError, RunFailure
from corex.testing import tiny_recipe_dict


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- a failed write keeps the previous file ---------------------------------------------------------


def test_a_write_that_fails_leaves_the_previous_file_untouched(tmp_path):
    path = tmp_path / "results.json"
    rundir.write_json(path, {"macro_f1": 0.9})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="the writer broke"):
        with rundir.atomic_path(path) as temporary:
            assert temporary.parent == path.parent and temporary != path
            temporary.write_text('{"macro_f1": 0.1, "half')
            raise ValueError("the writer broke")  # not a write error: it keeps its own type
    assert path.read_bytes() == before
    assert names(tmp_path) == ["results.json"]  # and no temporary is left behind


def test_a_write_that_fails_leaves_no_file_where_there_was_none(tmp_path):
    with pytest.raises(KeyError):
        with rundir.atomic_path(tmp_path / "deep" / "table.csv") as temporary:
            temporary.write_text("a,b\n1,")
            raise KeyError("x")
    assert names(tmp_path / "deep") == []


def test_a_write_that_succeeds_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "notes.txt"
    rundir.atomic_write_text(path, "first")
    rundir.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert names(path.parent) == ["notes.txt"]


def _half_then(error: BaseException):
    """A torch.save that writes half of the real bytes wherever it is told to, then fails."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        with open(f, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise error

    return save


def test_a_checkpoint_whose_write_runs_out_of_space_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    rundir.save_torch(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    monkeypatch.setattr(rundir.torch, "save", _half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(RunFailure, match="no space left on the device") as caught:
        rundir.save_torch(path, {"model": {"w": torch.zeros(3)}, "epoch": 2})
    assert str(path) in str(caught.value) and "--resume" in str(caught.value)
    monkeypatch.undo()
    state = checkpoints.load_checkpoint(path, "test", required=["model", "epoch"])
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert names(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_write_refused_by_the_system_is_a_message_naming_the_file(tmp_path, monkeypatch, code):
    path = tmp_path / "model.pt"
    monkeypatch.setattr(rundir.torch, "save", _half_then(OSError(code, os.strerror(code))))
    with pytest.raises(CorexError) as caught:
        rundir.save_torch(path, {"epoch": 1})
    assert type(caught.value) is CorexError  # the user's to fix (exit 2), not a failure of the run
    assert str(caught.value) == f"cannot write '{path}': {os.strerror(code)}"
    assert names(tmp_path) == []


def test_an_unexpected_os_error_is_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.torch, "save", _half_then(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as caught:
        rundir.save_torch(tmp_path / "model.pt", {"epoch": 1})
    assert not isinstance(caught.value, CorexError) and caught.value.errno == errno.EIO
    assert names(tmp_path) == []


def test_another_runtime_error_while_writing_is_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.torch, "save", _half_then(RuntimeError("a bug in a writer")))
    with pytest.raises(RuntimeError, match="a bug in a writer") as caught:
        rundir.save_torch(tmp_path / "model.pt", {"epoch": 1})
    assert not isinstance(caught.value, CorexError)
    assert names(tmp_path) == []


TORCH_WRITER_ERRORS = ["[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed",
                       "basic_ios::clear: iostream error", "PytorchStreamWriter: file write failed"]


@pytest.mark.parametrize("message", TORCH_WRITER_ERRORS)
@pytest.mark.parametrize("free, words", [(2**40, "the write failed"), (3 * 2**29, "the write failed"), (2**30, "the write failed"),
                                         (2**30 - 1, "no space left on the device"), (2**20, "no space left on the device")])
def test_torchs_writer_failing_without_an_errno_is_told_by_the_free_space(tmp_path, monkeypatch, free, words, message):
    path = tmp_path / "last.pt"
    rundir.save_torch(path, {"epoch": 1})
    failure = RuntimeError(message)
    monkeypatch.setattr(rundir.torch, "save", _half_then(failure))
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": free})())
    with pytest.raises(RunFailure, match=words) as caught:
        rundir.save_torch(path, {"epoch": 2})
    assert f"cannot write '{path}'" in str(caught.value) and f"({free / 2**20:.0f} MiB free there)" in str(caught.value)
    monkeypatch.undo()
    assert checkpoints.load_file(path, "test")["epoch"] == 1


def test_a_place_that_cannot_hold_a_file_is_a_message(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CorexError, match=f"cannot write '{afile / 'run' / 'results.json'}'"):
        rundir.write_json(afile / "run" / "results.json", {})


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o002, 0o664)])
def test_new_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        rundir.FILE_MODE = rundir._file_mode()
        assert os.umask(umask) == umask  # reading the umask left it as it was
        rundir.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
        rundir.FILE_MODE = rundir._file_mode()
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode


def test_an_os_error_without_an_errno_is_a_message_with_its_text(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise OSError("the folder went away")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", refused)
    with pytest.raises(CorexError) as caught:
        rundir.atomic_write_text(tmp_path / "a.txt", "x")
    assert str(caught.value) == f"cannot write '{tmp_path / 'a.txt'}': the folder went away"

    def denied(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", denied)
    with pytest.raises(CorexError) as caught:
        rundir.atomic_write_text(tmp_path / "a.txt", "x")
    assert str(caught.value) == f"cannot write '{tmp_path / 'a.txt'}': Permission denied"
    monkeypatch.undo()
    log = rundir.MetricsLog(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(rundir.os, "fsync", refused)
    with pytest.raises(CorexError) as caught:
        log.append({"stage": "train", "epoch": 1})
    assert str(caught.value) == f"cannot write '{log.path}': the folder went away"


def test_temporaries_of_killed_writes_are_found_and_removed_and_nothing_else(tmp_path):
    stale = [tmp_path / ".last.pt.x1y2.tmp", tmp_path / "checkpoints" / "train" / ".best.pt.abc.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "checkpoints" / "train" / "best.pt"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (tmp_path / ".folder.tmp").mkdir()
    assert sorted(rundir.remove_temporaries(tmp_path)) == sorted(stale)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in stale)
    assert (tmp_path / ".folder.tmp").is_dir()


# -- JSON and the metrics log ---------------------------------------------------------------------


def test_json_holds_numbers_tensors_paths_and_null_for_what_is_not_finite(tmp_path):
    data = {"f1": np.float32(0.5), "n": np.int64(3), "ece": float("nan"), "inf": -math.inf, "t": torch.tensor([1.0, 2.0]),
            "where": Path("/a/b"), "pairs": (1, [2, {3: 4}])}
    rundir.write_json(tmp_path / "r.json", data)
    text = (tmp_path / "r.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"  # indented, for people and diffs
    assert rundir.read_json(tmp_path / "r.json") == {"f1": 0.5, "n": 3, "ece": None, "inf": None, "t": [1.0, 2.0], "where": "/a/b",
                                                      "pairs": [1, [2, {"3": 4}]]}


def test_the_metrics_log_appends_reads_past_torn_lines_and_truncates_for_a_resume(tmp_path):
    log = rundir.MetricsLog(tmp_path / "metrics.jsonl")
    assert log.rows() == [] and not log.has("train", 1)
    rows = [{"stage": "pretrain", "epoch": 1}, {"stage": "pretrain", "epoch": 2}] + [{"stage": "train", "epoch": e, "loss": e / 10} for e in (1, 2, 3)]
    for row in rows:
        log.append(row)
    assert log.rows() == rows
    with log.path.open("a") as handle:
        handle.write('{"stage": "train", "epo\n\n')  # a kill mid-line, then an empty line
    assert log.rows() == rows
    assert log.has("train", 3) and log.has("pretrain", 2) and not log.has("train", 4) and not log.has("test", 1)
    log.truncate(["pretrain"], "train", 2)
    assert log.rows() == rows[:4]
    assert log.path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:4])  # the torn line is gone too
    log.truncate([], "train", 0)
    assert log.rows() == []
    # A row of the stage without an epoch (written before its first epoch) counts as epoch 0: kept.
    log.append({"stage": "train", "note": "before the first epoch"})
    log.append({"stage": "train", "epoch": 1})
    log.truncate([], "train", 0)
    assert log.rows() == [{"stage": "train", "note": "before the first epoch"}]


def test_the_metrics_log_says_when_the_disk_is_full(tmp_path, monkeypatch):
    log = rundir.MetricsLog(tmp_path / "metrics.jsonl")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full)
    with pytest.raises(RunFailure, match=f"cannot write '{log.path}': no space left"):
        log.append({"stage": "train", "epoch": 1})


# -- the lock, in one process ---------------------------------------------------------------------


def test_the_lock_refuses_a_second_holder_until_released_and_names_the_first(tmp_path):
    first, second = rundir.RunLock(tmp_path), rundir.RunLock(tmp_path)
    first.acquire()
    try:
        assert (tmp_path / ".corex.lock").read_text() == f"corex process {os.getpid()}"
        with pytest.raises(CorexError) as caught:
            second.acquire()
        assert str(caught.value) == (f"'{tmp_path}' is in use by corex process {os.getpid()}; wait for it to finish, "
                                     "or use another --out")
    finally:
        first.release()
    second.acquire()
    second.release()
    second.release()  # twice is harmless


# -- provenance -----------------------------------------------------------------------------------


def test_provenance_records_the_run_environment_and_the_recipes_commit(tmp_path, monkeypatch):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "r.yaml").write_text("name: r\n")
    subprocess.run(git + ["add", "r.yaml"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "r"], check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv("COREX_CACHE", "/somewhere")
    monkeypatch.setenv("COREX_UNRELATED", "x")
    info = rundir.provenance("cpu", str(tmp_path / "r.yaml"))
    assert info["environment"].get("COREX_CACHE") == "/somewhere" and "COREX_UNRELATED" not in info["environment"]
    assert info["recipe_git"] == {"commit": commit, "dirty": False}
    (tmp_path / "r.yaml").write_text("name: changed\n")
    assert rundir.provenance("cpu", str(tmp_path / "r.yaml"))["recipe_git"]["dirty"] is True
    assert rundir.provenance("cpu", None).get("recipe_git") is None
    real_run = subprocess.run

    def no_git(*args, **kwargs):
        if args and args[0][:1] == ["git"]:
            raise FileNotFoundError(2, "No such file or directory: 'git'")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", no_git)
    assert rundir.provenance("cpu", str(tmp_path / "r.yaml"))["recipe_git"] is None  # no git on the machine
    monkeypatch.setattr(subprocess, "run", real_run)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert rundir.provenance("cpu", str(tmp_path / "elsewhere" / "r.yaml"))["recipe_git"] is None


@pytest.mark.parametrize("argv, command", [(["/usr/local/bin/corex", "run", "r.yaml", "--resume"], ["corex", "run", "r.yaml", "--resume"]),
                                           ([], []), ([""], [])])
def test_provenance_records_the_command_line(monkeypatch, argv, command):
    monkeypatch.setattr(sys, "argv", argv)
    assert rundir.provenance("cpu", None)["command"] == command


def test_provenance_names_a_gpu_only_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cpu", "cuda", "cuda:1"):
        info = rundir.provenance(device, None)
        assert info["device"] == device and "device_name" not in info and "cuda" not in info
    # A machine with a GPU: named for a CUDA run, not for a CPU run on the same machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Test GPU {device.index}")
    assert "device_name" not in rundir.provenance("cpu", None)
    info = rundir.provenance("cuda:1", None)
    assert info["device_name"] == "Test GPU 1" and info["cuda"] == torch.version.cuda


# -- fault points ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wanted, misses, hit", [
    ("after_row:train:2", [("after_row", "train", 3), ("after_row", "train", None), ("after_checkpoint", "train", 2), ("after_row", "val", 2)],
     ("after_row", "train", 2)),
    ("after_model:train", [("after_model", "train", 1), ("after_model", "test", None)], ("after_model", "train", None)),
])
def test_a_fault_point_kills_only_where_it_is_asked_to(wanted, misses, hit):
    code = ("import sys\nfrom corex.rundir import fault_point\n"
            + "".join(f"fault_point({p!r}, {s!r}, {e!r})\n" for p, s, e in misses)
            + "print('alive', flush=True)\n" + f"fault_point({hit[0]!r}, {hit[1]!r}, {hit[2]!r})\nprint('survived')\n")
    env = {**os.environ, "COREX_FAULT_AT": wanted}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout == "alive\n"


# -- a training run: checkpoints are atomic -------------------------------------------------------


def test_a_checkpoint_write_that_fails_mid_run_leaves_the_last_good_checkpoint_to_resume_from(tmp_path, monkeypatch, corex_pm):
    """Whatever file the checkpoint writer is handed, a failure half-way through writing epoch 2's
    last.pt must leave epoch 1's last.pt whole: the run is then resumed from it."""
    recipe = tiny_recipe_dict()
    recipe["data"]["studies"] = 80
    recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 0}]
    out = tmp_path / "run"
    real_save = torch.save
    failing = _half_then(OSError(errno.ENOSPC, "No space left on device"))

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj and obj.get("epoch") == 2:  # epoch 2's last.pt, by its content
            return failing(obj, f, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(rundir.torch, "save", save)
    with pytest.raises(RunFailure, match="no space left on the device"):
        corex.run(corex.load_recipe(recipe), out=out, progress=False)
    monkeypatch.undo()
    last = out / "checkpoints" / "train" / "last.pt"
    state = checkpoints.load_checkpoint(last, "test", required=["model", "optimizer", "epoch", "rng"])
    assert state["epoch"] == 1
    assert not list(out.rglob("*.tmp"))
    results = corex.run(corex.load_recipe(recipe), out=out, resume=True, progress=False)
    assert results["stages"]["train"]["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"]["train"]["epochs"] == 2
