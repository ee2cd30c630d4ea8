"""The command line, driven in-process like a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_the_tiny_quickstart_learns_through_the_real_loader(corex_cli, tmp_path):
    """The quickstart recipe, shrunk: phantom DICOMs -> SIIM loader -> cache -> multi-task training."""
    out = tmp_path / "run"
    code, stdout, err = corex_cli(
        "run", QUICKSTART, "--out", out, "--no-progress",
        "--set", "data.studies=320", "--set", "data.image_size=64", "--set", "data.difficulty=0.0",
        "--set", "data.batch_size=16", "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", "stages.train.epochs=6", "--set", "stages.test.evaluators.0.bootstrap=100",
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    test = results["stages"]["test"]["metrics"]
    assert test["macro_f1"] > 0.45, test  # chance is 0.25, the majority class alone ~0.16
    assert test["dice"] > 0.4, test
    assert stdout.startswith("test: test split, "), stdout  # the summary table, not the JSON
    assert f"macro_f1 {test['macro_f1']:7.3f}" in " ".join(stdout.split()) or f"{test['macro_f1']:.3f}" in stdout
    data = json.loads((out / "data.json").read_text())
    assert sum(data[s]["studies"] for s in ("train", "val", "test")) == 320
    assert "[train] epoch 6/6" in err


def test_validate_accepts_a_good_recipe_and_reports_every_problem_of_a_bad_one(corex_cli, tmp_path):
    code, out, _ = corex_cli("validate", QUICKSTART, "--no-build")
    assert code == 0 and "valid" in out
    bad = yaml.safe_load(QUICKSTART.read_text())
    bad["stages"]["train"]["heads"]["segmentation"]["weight"] = "high"
    bad["stages"]["train"]["epoch"] = 3
    bad["model"]["encoder"]["name"] = "resnet05"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    code, out, err = corex_cli("validate", path)
    assert code == 2
    assert "Traceback" not in err
    assert "3 problems in" in err
    assert "stages.train.heads.segmentation.weight: expected a number, got 'high'" in err
    assert "stages.train.epoch: unknown key; did you mean 'epochs'?" in err
    assert "model.encoder: encoder 'resnet05' is not registered; did you mean 'resnet50'?" in err
    code, _, err = corex_cli("run", path, "--out", tmp_path / "never")
    assert code == 2 and "3 problems" in err and not (tmp_path / "never").exists()


def test_validate_build_runs_the_plugins_own_checks(corex_cli, tmp_path):
    code, _, err = corex_cli(
        "validate", QUICKSTART, "--build", "--set", f"data.cache_dir={tmp_path}", "--set", "data.studies=40",
        "--set", "stages.train.augment={name: kornia, ops: [RandomAfine]}",
    )
    assert code == 2
    assert "stages.train.augment: " in err and "did you mean 'RandomAffine'" in err


def test_set_overrides_reach_the_run_and_bad_ones_are_reported(corex_cli, tmp_path):
    code, _, err = corex_cli("validate", QUICKSTART, "--set", "stages.trian.epochs=3")
    assert code == 2 and "there is no 'trian' under stages; did you mean 'train'?" in err


def test_help_shows_examples_and_every_command():
    """Every sub-command of the parser (the core's and the plugins') is in the help's command list
    itself, with its one-line help, not only somewhere in the examples."""
    from corex.cli import build_parser

    result = subprocess.run([sys.executable, "-m", "corex.cli", "--help"], capture_output=True, text=True, check=True)
    listing = result.stdout.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    listed = [line.split()[0] for line in listing.splitlines() if line.startswith("    ") and not line.startswith("      ")]
    commands = build_parser()._subparsers._group_actions[0].choices
    assert sorted(listed) == sorted(commands), listing
    assert {"run", "validate", "plugins", "recipes", "data", "study", "compare", "export", "predict", "evaluate"} <= set(listed)
    for line in listing.splitlines():
        if line.startswith("    ") and not line.startswith("      "):
            assert len(line.split()) > 1 or line.strip() == "COMMAND", f"no help for {line.strip()!r}"
    assert "examples:" in result.stdout and "corex run recipes/quickstart.yaml" in result.stdout


# Loaded by torch and by nothing the light commands need; any one of them costs seconds at start-up.
HEAVY = ("torch", "kornia", "torchmetrics", "numpy", "matplotlib", "scipy", "pydicom", "keras_core")


@pytest.mark.parametrize("argv", [
    ["--help"], ["plugins"], ["plugins", "--json"], ["recipes"], ["validate", "quickstart", "--no-build"],
    ["validate", "phantom/moco_multitask", "--no-build", "--set", "stages.pretrain.objective.queue_size=128"],
    ["study", "--help"], ["compare", "--help"], ["predict", "--help"], ["data", "phantom", "--help"],
], ids=" ".join)
def test_light_commands_import_no_torch(argv):
    """`corex --help`, `corex plugins`, `corex recipes` and schema-only validation load every plugin (its
    factories' signatures included) without torch: they answer in a fraction of a second, not 5 s."""
    code = (
        "import sys\n"
        "from corex.cli import main\n"
        f"try:\n    status = main({argv!r})\nexcept SystemExit as exit:\n    status = exit.code\n"
        f"heavy = sorted(set({HEAVY!r}) & set(sys.modules))\n"
        "assert status == 0, status\n"
        "assert not heavy, f'imported {heavy}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_recipes_lists_every_shipped_recipe_with_its_description(corex_cli):
    code, out, _ = corex_cli("recipes")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert {"quickstart", "classification", "moco_cxr", "phantom/moco_multitask", "siim/inpaint_classification"} <= set(lines)
    assert "multi-task" in lines["quickstart"].lower()


def test_data_info_and_prepare(corex_cli, tmp_path):
    args = ["--set", f"data.cache_dir={tmp_path}", "--set", "data.studies=40", "--set", "data.image_size=64"]
    code, out, err = corex_cli("data", "prepare", QUICKSTART, *args)
    assert code == 0, err
    code, out, err = corex_cli("data", "info", QUICKSTART, *args, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert sum(info[s]["studies"] for s in ("train", "val", "test")) == 40
    code, out, _ = corex_cli("data", "info", QUICKSTART, *args)
    assert out.splitlines()[0].split()[:4] == ["split", "studies", "images", "patients"]


def test_data_phantom_writes_the_siim_layout(corex_cli, tmp_path):
    code, _, err = corex_cli("data", "phantom", tmp_path / "ph", "--studies", "6", "--size", "64")
    assert code == 0, err
    assert (tmp_path / "ph" / "train_study_level.csv").exists()
    assert len(list((tmp_path / "ph" / "train").rglob("*.dcm"))) >= 6


def test_bare_data_and_no_command_print_usage(corex_cli):
    assert corex_cli()[0] == 2
    assert corex_cli("data")[0] == 2


def test_a_missing_recipe_file_is_a_message_not_a_traceback(corex_cli, tmp_path):
    code, _, err = corex_cli("validate", tmp_path / "nope.yaml")
    assert code == 2 and "cannot read the recipe" in err and "Traceback" not in err


def test_data_info_says_what_it_knows_of_undecodable_images(corex_cli, tmp_path):
    code, out, _ = corex_cli("data", "info", QUICKSTART, "--set", f"data.cache_dir={tmp_path}", "--set", "data.studies=24")
    assert code == 0 and "images that cannot be decoded: 0 known, " in out and "not checked yet" in out


def test_every_example_in_help_names_a_real_command_and_existing_recipes(corex_cli):
    from corex.cli import EXAMPLES, build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for line in EXAMPLES.splitlines()[1:]:
        words = line.split()
        assert words[0] == "corex", line
        command = next(w for w in words[1:] if not w.startswith("-") and w != "lines")
        assert command in commands, line
        for word in words:
            if word.startswith("recipes/") and "*" not in word:
                assert (ROOT / word).exists(), line


def test_nproc_below_one_is_refused(corex_cli, tmp_path):
    code, _, err = corex_cli("run", QUICKSTART, "--nproc", "0", "--out", tmp_path / "never")
    assert code == 2 and "--nproc: expected at least 1 process, got 0" in err and not (tmp_path / "never").exists()
