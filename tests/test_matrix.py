"""Every registered component through every path a user takes by changing one name in a recipe.

The cells are built from the registry, not listed: a new encoder, objective or evaluator joins the
matrix by being registered. Each cell runs the real command line on a tiny phantom (64 px, one
step per stage): `corex run` (optionally a pre-training, then training, then an evaluate stage with
every shipped evaluator that fits the heads); the cells without pre-training then go on through
`corex export`, `corex predict --saliency` on a radiograph and `corex evaluate`. The cells of the
torch ResNet-18 are fast; the others are marked slow (they still run in CI: `pytest -m "not slow"`
leaves them out).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from corex.plugins import Registry, get_plugin_manager

FAST_ENCODER = "resnet18"
HEAD_SETS = {"classification": ["classification"], "multitask": ["classification", "segmentation"]}
# Evaluators that need what these single-label phantom runs do not have (multi-label data).
NEEDS_OTHER_DATA = {"multilabel"}
# Small settings for components whose defaults are sized for real data (options they document).
SMALL = {"width": 4, "queue_size": 8, "hidden_dim": 16, "projection_dim": 8}


def registered(kind: str) -> list[str]:
    return sorted(Registry(get_plugin_manager()).components(kind))


def small_options(kind: str, name: str) -> dict:
    import inspect

    factory = Registry(get_plugin_manager()).get(kind, name).factory
    return {k: v for k, v in SMALL.items() if k in inspect.signature(factory).parameters}


def evaluators_for(heads: list[str]) -> list:
    chosen = []
    for name in registered("evaluators"):
        if name in NEEDS_OTHER_DATA or (name == "segmentation" and "segmentation" not in heads):
            continue
        options = {"bootstrap": 0} if name in ("classification", "segmentation", "localization", "knn", "subgroups") else {}
        if name == "localization":
            options["level"] = -2
        chosen.append({"name": name, **options} if options else name)
    return chosen


def cells() -> list:
    """Every encoder x every head set from scratch (the whole path: run, export, predict, evaluate), and
    every encoder x every pre-training with multi-task fine-tuning (a pretrain stage never sees the
    heads, so its other head sets would repeat these cells)."""
    found = []
    for encoder in registered("encoders"):
        plans = [(heads, None) for heads in HEAD_SETS] + [("multitask", objective) for objective in registered("objectives")]
        for heads, pretrain in plans:
            marks = [] if encoder == FAST_ENCODER else [pytest.mark.slow]
            found.append(pytest.param(encoder, heads, pretrain, id=f"{encoder}-{heads}-{pretrain or 'scratch'}", marks=marks))
    return found


def recipe(encoder: str, heads: str, pretrain: str | None, cache: Path) -> dict:
    stages = {}
    if pretrain is not None:
        stages["pretrain"] = {"kind": "pretrain", "epochs": 1, "max_steps_per_epoch": 1, "augment": "moco_cxr",
                              "objective": {"name": pretrain, **small_options("objectives", pretrain)}}
    train = {"kind": "train", "epochs": 1, "max_steps_per_epoch": 1, "augment": "cxr_light",
             "heads": {h: {} for h in HEAD_SETS[heads]}, "evaluators": [{"name": "classification", "bootstrap": 0}], "select": "loss"}
    if pretrain is not None:
        train["encoder_from"] = "pretrain"
    stages["train"] = train
    stages["test"] = {"kind": "evaluate", "split": "test", "evaluators": evaluators_for(HEAD_SETS[heads])}
    return {
        "name": f"matrix-{encoder}-{heads}-{pretrain or 'scratch'}", "seed": 0,
        "data": {"name": "phantom", "image_size": 64, "batch_size": 8, "studies": 48, "cache_dir": str(cache)},
        "model": {"encoder": {"name": encoder, **small_options("encoders", encoder)}},
        "stages": stages,
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix-cache")


@pytest.mark.parametrize(("encoder", "heads", "pretrain"), cells())
def test_a_cell_runs_exports_predicts_and_evaluates(encoder, heads, pretrain, cache, tmp_path, corex_cli):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(encoder, heads, pretrain, cache), sort_keys=False))
    run = tmp_path / "run"
    code, _, err = corex_cli("--progress", "off", "run", path, "--out", run)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    test = json.loads((run / "results.json").read_text())["stages"]["test"]["metrics"]
    assert "macro_f1" in test and "pointing_game" in test and "knn/accuracy" in test
    assert (run / "test" / "saliency_examples.png").exists()  # Grad-CAM of this encoder, in the report's gallery
    if heads == "multitask":
        assert "dice" in test
    if pretrain is not None:
        assert (run / "checkpoints" / "pretrain" / "model.pt").exists()
        return  # the rest of the path is the scratch cells'

    code, _, err = corex_cli("export", run, tmp_path / "model.pt")
    assert code == 0, err[-2000:]
    radiograph = next(p for p in sorted(cache.rglob("*.dcm")))
    code, _, err = corex_cli("predict", tmp_path / "model.pt", radiograph, "--out", tmp_path / "predicted", "--saliency", "--no-progress")
    assert code == 0, err[-2000:]
    records = json.loads((tmp_path / "predicted" / "predictions.json").read_text())
    assert records and any((tmp_path / "predicted" / "saliency").glob("*.png"))

    code, _, err = corex_cli("evaluate", run, "--split", "test", "--out", tmp_path / "again")
    assert code == 0, err[-2000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())["stages"]["evaluate"]["metrics"]
    assert again["macro_f1"] == pytest.approx(test["macro_f1"])
