"""corex study end to end on tiny arms: shared pre-training, interruption, resume, comparison."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from corex_study.study import plan

import corex
from corex.plugins import register
from corex.testing import tiny_recipe_dict


def tiny_arm(name: str, heads: list[str]) -> dict:
    """A tiny MoCo-then-fine-tune arm on the toy data (seconds per run)."""
    recipe = tiny_recipe_dict()
    recipe["name"] = f"tiny-{name}"
    recipe["data"]["studies"] = 64
    train = recipe["stages"]["train"]
    train["epochs"] = 1
    train["encoder_from"] = "pretrain"
    train["heads"] = {h: v for h, v in train["heads"].items() if h in heads}
    train["evaluators"] = [e for e in train["evaluators"] if (e if isinstance(e, str) else e["name"]) in heads]
    recipe["stages"]["test"]["evaluators"] = copy.deepcopy(train["evaluators"])
    recipe["stages"]["test"]["evaluators"][0]["bootstrap"] = 20
    pretrain = {"kind": "pretrain", "epochs": 1, "augment": "moco_cxr",
                "objective": {"name": "moco", "queue_size": 8, "key_momentum": 0.9}}
    recipe["stages"] = {"pretrain": pretrain, **recipe["stages"]}
    return recipe


@pytest.fixture
def arms(tmp_path, corex_pm):
    paths = []
    for name, heads in (("moco_classification", ["classification"]), ("moco_multitask", ["classification", "segmentation"])):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_arm(name, heads), sort_keys=False))
        paths.append(path)
    return paths


class InterruptSecondSeed:
    """Stops the study inside the first epoch of moco_multitask, seed 1 (as a kill would)."""

    @staticmethod
    @corex.hookimpl
    def corex_epoch_end(run, stage):
        if stage == "train" and "moco_multitask" in str(run.out) and run.out.name == "seed-1":
            raise KeyboardInterrupt


def test_plan_shares_pretraining_and_lays_out_runs(arms, tmp_path):
    jobs = plan(arms, [0, 1], [1.0, 0.5], tmp_path / "study")
    pretrain = [j for j in jobs if j.kind == "pretrain"]
    runs = [j for j in jobs if j.kind == "arm"]
    group = pretrain[0].out.parent.name
    assert re.fullmatch(r"moco-[0-9a-f]{8}", group)
    assert [j.out.relative_to(tmp_path / "study").as_posix() for j in pretrain] == [f"pretrain/{group}/seed-0", f"pretrain/{group}/seed-1"]
    assert len(runs) == 8 and all(j.needs == [pretrain[j.seed]] for j in runs)
    half = next(j for j in runs if j.name == "moco_multitask" and j.fraction == 0.5 and j.seed == 1)
    assert half.out.relative_to(tmp_path / "study").as_posix() == "moco_multitask/frac-0.5/seed-1"
    recipe = half.recipe
    assert "pretrain" not in recipe["stages"] and recipe["seed"] == 1 and recipe["data"]["label_fraction"] == 0.5
    assert recipe["stages"]["train"]["encoder_from"] == str((pretrain[1].out / "checkpoints" / "pretrain" / "model.pt").resolve())
    # Equal optimisation steps at half the labels: a budget of the steps at fraction 1 (64 toy studies:
    # 38 training images, batch 8, 4 steps an epoch; 1 epoch), and the warm-up of fraction 1 in steps.
    assert recipe["stages"]["train"]["steps"] == 4 and recipe["stages"]["train"]["epochs"] == 1
    assert recipe["stages"]["train"]["schedule"]["warmup_steps"] == round(0.5 * 4)
    full = next(j for j in runs if j.name == "moco_multitask" and j.fraction == 1.0 and j.seed == 1)
    assert full.recipe["stages"]["train"]["steps"] is None  # fraction 1: the recipe as it is
    assert recipe["data"]["reduce_val"] is True
    assert pretrain[1].recipe["data"]["label_fraction"] == 1.0 and list(pretrain[1].recipe["stages"]) == ["pretrain"]
    # Another objective option is another pre-training.
    other = yaml.safe_load(arms[1].read_text())
    other["stages"]["pretrain"]["objective"]["temperature"] = 0.1
    arms[1].write_text(yaml.safe_dump(other, sort_keys=False))
    jobs = plan(arms, [0], [1.0], tmp_path / "study")
    assert len([j for j in jobs if j.kind == "pretrain"]) == 2


@pytest.mark.slow
def test_a_killed_study_resumes_without_redoing_finished_runs(arms, tmp_path, corex_cli, corex_pm):
    out = tmp_path / "study"
    command = ["study", *arms, "--seeds", "0", "1", "--label-fractions", "1.0", "--out", out]
    register(corex_pm, InterruptSecondSeed, name="interrupt")
    code, stdout, err = corex_cli(*command)
    corex_pm.unregister(name="interrupt")
    assert code == 130 and "run the same command again" in err
    assert "[1/4] moco_classification frac 1 seed 0: macro_f1" in stdout and "study ETA" in stdout
    assert "\r" not in stdout
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert len(finished) == 5  # pre-training seeds 0 and 1, three of the four arm runs
    interrupted = out / "moco_multitask" / "frac-1" / "seed-1"
    assert (interrupted / "recipe.yaml").exists() and not (interrupted / "results.json").exists()

    code, stdout, err = corex_cli(*command)
    assert code == 0, err
    assert "3 of 4 runs already finished" in stdout
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # nothing finished was redone
    assert "[4/4] moco_multitask frac 1 seed 1" in stdout
    assert "[pretrain]" not in stdout  # both pre-trainings had finished
    assert "resumed" in (interrupted.parent / "seed-1.log").read_text()
    results = json.loads((interrupted / "results.json").read_text())
    assert set(results["stages"]) == {"train", "test"}
    assert [p.name for p in sorted((out / "pretrain").glob("moco-*/seed-?"))] == ["seed-0", "seed-1"]
    compare = (out / "compare.md").read_text()
    assert "tiny-moco_multitask" in compare and "Paired differences" in compare
    for name in ("compare.csv", "compare.png", "compare.json", "report.html", "report.md"):
        assert (out / name).exists(), name
    assert (interrupted / "report.html").exists()

    code, _, err = corex_cli(*command, "--set", "stages.test.evaluators.0.bootstrap=30")
    assert code == 2 and "holds a finished run of another recipe than this study's moco_classification frac 1 seed 0" in err


# -- issue 19: separate seeds, equal steps, runs at once, a Ray cluster ------------------------------------


def test_seed_pairs_crossed_paired_and_the_shortcut():
    from corex_study.study import seed_pairs

    from corex.errors import CorexError

    assert seed_pairs([0, 1, 2]) == [(0, 0), (1, 1), (2, 2)]
    assert seed_pairs() == [(s, s) for s in range(5)]
    assert seed_pairs(data_seeds=[0, 1], train_seeds=[5, 6]) == [(0, 5), (0, 6), (1, 5), (1, 6)]
    assert seed_pairs(data_seeds=[0, 1], train_seeds=[5, 6], pairing="paired") == [(0, 5), (1, 6)]
    assert seed_pairs(train_seeds=[3, 4]) == [(0, 3), (0, 4)]  # one data draw, two trainings
    with pytest.raises(CorexError, match="either --seeds or"):
        seed_pairs([0], data_seeds=[1])
    with pytest.raises(CorexError, match="2 data seeds and 3 training seeds"):
        seed_pairs(data_seeds=[0, 1], train_seeds=[0, 1, 2], pairing="paired")


def test_plan_separates_data_and_training_seeds_and_keys_pretraining_by_both(arms, tmp_path):
    from corex_study.study import seed_pairs

    jobs = plan(arms, None, [1.0], tmp_path / "study", pairs=seed_pairs(data_seeds=[0, 1], train_seeds=[0, 2]))
    runs = {j.out.relative_to(tmp_path / "study").as_posix(): j for j in jobs if j.kind == "arm"}
    assert set(runs) == {f"{arm}/frac-1/{d}" for arm in ("moco_classification", "moco_multitask")
                         for d in ("seed-0", "data-0-seed-2", "data-1-seed-0", "data-1-seed-2")}
    crossed = runs["moco_multitask/frac-1/data-1-seed-2"]
    assert crossed.recipe["seed"] == 2 and crossed.recipe["data"]["seed"] == 1
    assert runs["moco_multitask/frac-1/seed-0"].recipe["data"]["seed"] is None  # equal seeds: the layout of earlier studies
    pretrain = [j for j in jobs if j.kind == "pretrain"]
    # a pre-training depends on the data draw (its training images) and the training seed: one per pair, both arms share it
    assert sorted(p.out.name for p in pretrain) == ["data-0-seed-2", "data-1-seed-0", "data-1-seed-2", "seed-0"]
    assert crossed.needs[0].out.name == "data-1-seed-2" and runs["moco_classification/frac-1/data-1-seed-2"].needs == crossed.needs
    # a pre-training on data of its own does not depend on the data seed: one per training seed
    for path in arms:
        recipe = yaml.safe_load(path.read_text())
        recipe["stages"]["pretrain"]["data"] = {"name": "toy", "image_size": 32, "batch_size": 8, "studies": 48}
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    jobs = plan(arms, None, [1.0], tmp_path / "other", pairs=seed_pairs(data_seeds=[0, 1], train_seeds=[0, 2]))
    assert sorted(j.out.name for j in jobs if j.kind == "pretrain") == ["seed-0", "seed-2"]


def classification_arms(root):
    """Two tiny arms without pre-training (a few seconds each) on the toy data."""
    paths = []
    for name, heads in (("cls", ["classification"]), ("mt", ["classification", "segmentation"])):
        recipe = tiny_arm(name, heads)
        del recipe["stages"]["pretrain"]
        del recipe["stages"]["train"]["encoder_from"]
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        paths.append(path)
    return paths


@pytest.fixture
def toy_in_workers(tmp_path, monkeypatch, corex_pm):
    """The toy data set for worker processes too (they load plugins afresh): a module on COREX_PLUGINS."""
    folder = tmp_path / "toy-plugin"
    folder.mkdir()
    (folder / "corex_toy_workers.py").write_text("from corex.testing import ToyPlugin\n\ncorex_datasets = ToyPlugin.corex_datasets\n")
    monkeypatch.setenv("COREX_PLUGINS", "corex_toy_workers")  # after corex_pm was built: this process keeps its own toy
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return folder


def results_of(study):
    return {p.relative_to(study).as_posix(): json.loads(p.read_text()) for p in sorted(study.rglob("results.json"))}


@pytest.mark.slow
def test_jobs_2_gives_the_results_of_jobs_1_and_fractions_take_equal_steps(tmp_path, corex_cli, toy_in_workers):
    paths = classification_arms(tmp_path)
    common = ["study", *paths, "--seeds", "0", "1", "--label-fractions", "1.0", "0.5"]
    code, stdout, err = corex_cli(*common, "--out", tmp_path / "one", "--jobs", "1")
    assert code == 0, err
    code, stdout, err = corex_cli(*common, "--out", tmp_path / "two", "--jobs", "2", "--cpus-per-run", "1")
    assert code == 0, err
    assert "2 runs at once in worker processes, 1 torch thread each" in stdout and "[8/8]" in stdout
    one, two = results_of(tmp_path / "one"), results_of(tmp_path / "two")
    assert len(one) == 8 and one.keys() == two.keys()
    for run in one:  # the same runs: every stage's metrics bit for bit (one torch thread each way)
        assert {s: r["metrics"] for s, r in one[run]["stages"].items()} == {s: r["metrics"] for s, r in two[run]["stages"].items()}, run
    # label fraction 0.5 takes exactly the steps of fraction 1 (64 toy studies: 38 training images, batch 8: 4 a full epoch)
    for arm in ("cls", "mt"):
        for seed in (0, 1):
            full, half = (one[f"{arm}/frac-{f}/seed-{seed}/results.json"]["stages"]["train"] for f in ("1", "0.5"))
            assert full["steps"] == half["steps"] == 4 and (full["epochs"], half["epochs"]) == (1, 2)
    assert (tmp_path / "two" / "compare.md").exists() and (tmp_path / "two" / "report.html").exists()
    # all finished: running again redoes nothing
    code, stdout, _ = corex_cli(*common, "--out", tmp_path / "two", "--jobs", "2")
    assert code == 0 and "8 of 8 runs already finished" in stdout and "[1/8]" not in stdout


def test_a_run_another_process_holds_is_left_to_it_and_taken_up_when_it_lets_go(tmp_path, corex_cli):
    import threading

    from corex_study.executors import attempt
    from corex_study.study import run_study

    from corex.rundir import RunLock

    paths = classification_arms(tmp_path)
    jobs = plan(paths[:1], [0], [1.0], tmp_path / "study")
    (job,) = jobs
    job.out.mkdir(parents=True)
    held = RunLock(job.out)
    held.acquire()  # as another worker would (a second open file: flock conflicts within one process too)
    assert attempt(job.spec()) == {"status": "busy"}
    lines = []
    releaser = threading.Timer(1.0, held.release)
    releaser.start()
    try:
        run_study(jobs, echo=lines.append, poll=0.3)
    finally:
        releaser.cancel()
        held.release()
    assert any("is in use by another process" in line for line in lines)
    assert any(line.startswith("[1/1] cls frac 1 seed 0:") for line in lines)
    assert json.loads((job.out / "results.json").read_text())["stages"]["test"]["metrics"]["n"] > 0


def test_executor_options_are_checked(tmp_path, corex_pm):
    from corex_study.executors import InProcess, LocalProcesses, make_executor, parse_devices

    from corex.errors import CorexError

    assert parse_devices("cuda:0,cuda:1") == ["0", "1"] and parse_devices("2,3") == ["2", "3"]
    assert isinstance(make_executor(), InProcess) and isinstance(make_executor(jobs=2), LocalProcesses)
    eight = make_executor(devices=",".join(f"cuda:{i}" for i in range(8)))
    assert eight.capacity == 8 and eight.devices == [str(i) for i in range(8)]
    with pytest.raises(CorexError, match="each run at once needs a GPU of its own"):
        make_executor(jobs=3, devices="cuda:0,cuda:1")
    with pytest.raises(CorexError, match="is not a GPU"):
        parse_devices("gpu0")
    with pytest.raises(CorexError, match="for --executor ray"):
        make_executor(address="127.0.0.1:6379")
    jobs = plan(classification_arms(tmp_path), [0], [1.0], tmp_path / "s", overrides=["device=cuda:1"])
    with pytest.raises(CorexError, match="runs on device 'cuda:1'"):
        make_executor(devices="cuda:0,cuda:1").check(jobs)


@pytest.mark.slow
def test_the_ray_executor_runs_the_study_on_a_local_cluster(tmp_path, toy_in_workers, monkeypatch):
    # Ray on this machine only, its node's address on loopback: Ray's own switch for single-machine
    # clusters, read at import (for the driver and the workers) and looked up when the node starts here.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    paths = classification_arms(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:")
        command = [sys.executable, "-m", "corex.cli", "study", *map(str, paths), "--seeds", "0", "1", "--label-fractions", "1.0",
                   "--out", str(tmp_path / "ray"), "--executor", "ray", "--address", address]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        ray.shutdown()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "each run a task of the Ray cluster" in done.stdout and "[4/4]" in done.stdout
    found = results_of(tmp_path / "ray")
    assert sorted(found) == [f"{arm}/frac-1/seed-{s}/results.json" for arm in ("cls", "mt") for s in (0, 1)]
    assert all(set(r["stages"]) == {"train", "test"} for r in found.values())
    assert (tmp_path / "ray" / "compare.json").exists()
