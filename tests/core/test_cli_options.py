"""Every command-line option is documented and reachable: each sub-command's --help (walked from the
parser, so a new option or command is covered without touching this file) lists all of its
options; and the options no other test passes are exercised here, each checked to take effect."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import corex
from corex.testing import tiny_recipe_dict


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command of ``parser``, with its words, walking the sub-parsers."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, path + (name,))
    return found


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]


def _parser() -> argparse.ArgumentParser:
    from corex.cli import build_parser

    return build_parser()


ALL = commands(_parser())


def exits(*args: str) -> tuple[int, str]:
    """``corex ARGS`` for arguments that end in argparse's exit (--help, --version): status, stdout."""
    from corex.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code, out.getvalue()


def help_of(words: tuple[str, ...]) -> str:
    code, text = exits(*words, "--help")
    assert code in (0, None), (words, code)
    return text


def test_the_walk_finds_every_command_of_the_help():
    names = {words for words, _ in ALL}
    for command in ("run", "validate", "plugins", "recipes", "data", "study", "compare", "export", "predict", "evaluate"):
        assert (command,) in names, command
    assert {("data", "prepare"), ("data", "info"), ("data", "phantom")} <= names


@pytest.mark.parametrize("words, parser", ALL, ids=[" ".join(w) or "corex" for w, _ in ALL])
def test_every_command_has_a_help_that_lists_each_of_its_options(corex_pm, words, parser):
    text = help_of(words)
    assert text.startswith(f"usage: {' '.join(('corex',) + words)}"), text[:200]
    # Past the usage lines: each option in the body, where its explanation is.
    body = text.split("\n\n", 1)[1]
    for option in options(parser):
        assert option in body, (words, option)


def test_version(corex_pm):
    assert exits("--version") == (0, f"corex {corex.__version__}\n")


# -- a tiny run, its export, some pictures ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from corex.plugins import get_plugin_manager, register, reset_plugin_manager
    from corex.testing import ToyPlugin

    reset_plugin_manager()
    register(get_plugin_manager(), ToyPlugin, name="corex-toy")
    recipe = tiny_recipe_dict()
    recipe["data"]["studies"] = 64
    recipe["stages"]["train"]["epochs"] = 1
    recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 0}]
    root = tmp_path_factory.mktemp("options")
    corex.run(corex.load_recipe(recipe), out=root / "run", progress=False)
    for seed in range(3):
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 48), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"p{seed}.png")
    reset_plugin_manager()
    return root


def test_predict_stage_study_csv_saliency_level_device_and_workers(tiny_run, corex_cli, tmp_path):
    pictures = [tiny_run / f"p{i}.png" for i in range(3)]
    (tmp_path / "studies.csv").write_text("file,study\np0.png,s1\np1.png,s1\np2.png,s2\n")
    code, _, err = corex_cli("predict", tiny_run / "run", *pictures, "--out", tmp_path / "o", "--stage", "train", "--study-csv",
                             tmp_path / "studies.csv", "--saliency", "--saliency-level", "-2", "--device", "cpu", "--workers", "1",
                             "--no-progress")
    assert code == 0, err
    written = json.loads((tmp_path / "o" / "predictions.json").read_text())
    records = written["records"]
    studies = {r["study_id"]: r for r in records if r["level"] == "study"}
    assert set(studies) == {"s1", "s2"} and studies["s1"]["n_images"] == 2  # --study-csv grouped them
    assert len(list((tmp_path / "o" / "saliency").glob("*.png"))) == 3  # --saliency at --saliency-level -2
    assert "train" in json.dumps(written.get("info", written))  # --stage: the model of stage train
    # Each option is read: a wrong value of each is refused, naming it.
    for option, value, words in (("--stage", "nope", "nope"), ("--device", "tpu", "tpu"), ("--saliency-level", "-9", "-9")):
        args = ["predict", tiny_run / "run", pictures[0], "--out", tmp_path / f"bad{option}", "--no-progress", option, value]
        if option == "--saliency-level":
            args.append("--saliency")
        code, _, err = corex_cli(*args)
        assert code == 2 and words in err and "Traceback" not in err, (option, err)


def test_evaluate_stage_batch_size_and_device(tiny_run, corex_cli, tmp_path):
    code, stdout, err = corex_cli("evaluate", tiny_run / "run", "--stage", "train", "--batch-size", "4", "--device", "cpu",
                                  "--split", "val", "--out", tmp_path / "e", "--json")
    assert code == 0, err
    results = json.loads(stdout)
    assert results["stage"] == "train" and results["split"] == "val"
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert saved["stage"] == "train"
    for option, value in (("--stage", "nope"), ("--device", "tpu"), ("--batch-size", "0")):
        code, _, err = corex_cli("evaluate", tiny_run / "run", "--out", tmp_path / f"bad{option}", option, value)
        assert code == 2 and value in err and "Traceback" not in err, (option, err)


# -- study: which arms, validation, steps, the compared metric and baseline -------------------------


def _arm(root: Path, name: str, heads: list[str]) -> Path:
    recipe = tiny_recipe_dict()
    recipe["name"] = f"tiny-{name}"
    recipe["data"]["studies"] = 64
    train = recipe["stages"]["train"]
    train["epochs"] = 1
    train["heads"] = {h: v for h, v in train["heads"].items() if h in heads}
    train["evaluators"] = [e for e in train["evaluators"] if (e if isinstance(e, str) else e["name"]) in heads]
    recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 20}]
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_study_arms_no_reduce_val_no_equal_steps_metric_and_baseline(corex_cli, corex_pm, tmp_path):
    arms = [_arm(tmp_path, "cls", ["classification"]), _arm(tmp_path, "mt", ["classification", "segmentation"]),
            _arm(tmp_path, "never", ["classification"])]
    out = tmp_path / "study"
    code, stdout, err = corex_cli("study", *arms, "--seeds", "0", "--label-fractions", "0.5", "--out", out, "--arms", "cls", "mt",
                                  "--no-reduce-val", "--no-equal-steps", "--metric", "accuracy", "--baseline", "mt")
    assert code == 0, err
    assert not (out / "never").exists()  # --arms: only these
    for arm in ("cls", "mt"):
        recipe = yaml.safe_load((out / arm / "frac-0.5" / "seed-0" / "recipe.yaml").read_text())
        assert recipe["data"]["label_fraction"] == 0.5
        assert recipe["data"]["reduce_val"] is False  # --no-reduce-val
        assert recipe["stages"]["train"]["steps"] is None  # --no-equal-steps: no budget of fraction 1's steps
    compared = json.loads((out / "compare.json").read_text())
    assert compared["metric"] == "accuracy" and compared["baseline"] == "tiny-mt"  # --metric, --baseline
    assert {row["arm"] for row in csv.DictReader(io.StringIO((out / "compare.csv").read_text()))} == {"tiny-cls", "tiny-mt"}
    assert "## Paired differences in test accuracy against tiny-mt" in (out / "compare.md").read_text()
