"""corex study end to end on tiny arms: shared pre-training, interruption, resume, comparison."""

from __future__ import annotations

import copy
import json
import re

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
    assert recipe["stages"]["train"]["epochs"] == 2  # equal optimisation steps at half the labels
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
