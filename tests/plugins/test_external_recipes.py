"""The shipped multi-label recipes (recipes/external/): they validate with only data.root set, and,
shrunk on the command line, run end to end (pre-training, kNN, fine-tuning, test) on tiny NIH
ChestX-ray14 and CheXpert layouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

# The tiny layouts of the multi-label tests (pytest puts this folder on sys.path).
from test_multilabel import write_chexpert, write_nih

import corex

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "external"
SHIPPED = {"nih_cxr14_multilabel.yaml": ("nih_cxr14", "byol"), "chexpert_multilabel.yaml": ("chexpert", "moco")}

# A seconds-long version of either recipe: tiny images, encoder, objective and epochs.
SHRINK = ["data.image_size=32", "data.batch_size=8", "data.num_workers=0", "data.workers=1",
          "model.encoder.name=resnet18", "model.encoder.width=8", "stages.pretrain.epochs=1", "stages.finetune.epochs=1"]
OBJECTIVE = {"byol": ["stages.pretrain.objective.hidden_dim=32", "stages.pretrain.objective.projection_dim=16"],
             "moco": ["stages.pretrain.objective.queue_size=16"]}


def overrides(*items: str) -> list[str]:
    return [part for item in items for part in ("--set", item)]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_recipe_validates_with_the_data_root_set_and_says_how_to_run_it(name, corex_cli):
    path = RECIPES / name
    text = path.read_text()
    assert text.startswith("# ") and f"corex run recipes/external/{name} --set data.root=" in text
    code, out, err = corex_cli("validate", path, "--no-build", *overrides("data.root=/x"))
    assert code == 0, out + err
    dataset, objective = SHIPPED[name]
    recipe = corex.load_recipe(path, ["data.root=/x"])
    assert recipe.data.name == dataset and str(recipe.data.options["root"]) == "/x"
    assert recipe.stages["pretrain"].objective.name == objective
    assert recipe.stages["finetune"].heads["classification"].component.options["multilabel"] is True
    assert [e.name for e in recipe.stages["knn"].evaluators] == ["knn"]
    assert [e.name for e in recipe.stages["test"].evaluators] == ["multilabel"]
    assert recipe.stages["finetune"].select.metric == "multilabel/auroc"


def run(corex_cli, tmp_path: Path, name: str, root: Path, *extra: str) -> dict:
    _, objective = SHIPPED[name]
    settings = [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *SHRINK, *OBJECTIVE[objective], *extra]
    code, out, err = corex_cli("--progress", "off", "run", RECIPES / name, "--out", tmp_path / "run", *overrides(*settings))
    assert code == 0, out + err
    return json.loads((tmp_path / "run" / "results.json").read_text())


def check(results: dict, tmp_path: Path) -> None:
    stages = results["stages"]
    assert list(stages) == ["pretrain", "knn", "finetune", "test"]
    assert math.isfinite(stages["pretrain"]["metrics"]["loss"])
    knn = stages["knn"]["metrics"]
    assert 0.0 <= knn["knn/auroc"] <= 1.0 and knn["knn/n_train"] > 0  # per-finding kNN scores on multi-label data
    test = stages["test"]
    assert 0.0 <= test["metrics"]["multilabel/auroc"] <= 1.0 and "multilabel/ap" in test["intervals"]
    assert (tmp_path / "run" / "test" / "multilabel_per_label.csv").exists()
    assert (tmp_path / "run" / "knn" / "knn_predictions.csv").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:multilabel")  # a tiny test split lacks most findings
def test_the_nih_recipe_runs_on_a_tiny_layout(corex_cli, tmp_path):
    root = write_nih(tmp_path / "nih")
    check(run(corex_cli, tmp_path, "nih_cxr14_multilabel.yaml", root, "data.val_fraction=0.25"), tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:multilabel")
@pytest.mark.filterwarnings("ignore:queue_size")  # a 16-key queue on 17 images, to stay seconds long
def test_the_chexpert_recipe_runs_on_a_tiny_layout(corex_cli, tmp_path):
    root = write_chexpert(tmp_path / "data")
    check(run(corex_cli, tmp_path, "chexpert_multilabel.yaml", root, "data.test_fraction=0.3"), tmp_path)
