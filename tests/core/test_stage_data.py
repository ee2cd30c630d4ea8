"""A stage with its own data: pre-training on an unlabelled folder, fine-tuning on the phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image


def _unlabelled_folder(root, count: int = 40):
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"patient{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((48, 48)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"image{i}.png")
    (root / "notes.txt").write_text("not an image: ignored")


def _recipe(tmp_path) -> dict:
    return {
        "name": "external",
        "data": {"name": "phantom", "image_size": 32, "batch_size": 16, "studies": 60, "difficulty": 0.0,
                 "cache_dir": str(tmp_path / "cache")},
        "model": {"encoder": {"name": "resnet18", "width": 8}},
        "stages": {
            "pretrain": {
                "kind": "pretrain", "epochs": 1,
                "data": {"name": "folder", "root": str(tmp_path / "corpus"), "image_size": 32, "batch_size": 8,
                         "val_fraction": 0.0, "test_fraction": 0.0, "cache_dir": str(tmp_path / "cache")},
                "objective": {"name": "moco", "queue_size": 8, "projection_dim": 16, "hidden_dim": 32},
            },
            "train": {"kind": "train", "epochs": 1, "encoder_from": "pretrain", "heads": {"classification": {}},
                      "evaluators": [{"name": "classification", "bootstrap": 0}], "select": "macro_f1"},
            "test": {"kind": "evaluate", "evaluators": [{"name": "classification", "bootstrap": 0}]},
        },
    }


@pytest.mark.slow
def test_pretraining_on_an_unlabelled_folder_then_fine_tuning_on_the_phantom(corex_cli, tmp_path):
    _unlabelled_folder(tmp_path / "corpus")
    path = tmp_path / "external.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path), sort_keys=False))
    code, _, err = corex_cli("data", "prepare", path)
    assert code == 0, err
    assert "folder: 40 images decoded" in err and "siim: " in err, err
    code, stdout, err = corex_cli("--progress", "off", "run", path, "--out", tmp_path / "run")
    assert code == 0, err
    assert "pretrain     pretrain  moco: 1 epochs x 5 steps, global batch 8, on data 'folder'" in err, err
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["stages"]["pretrain"]["train"]["images"] == 40
    assert data["stages"]["pretrain"]["train"]["classes"] == {"negative": 0, "typical": 0, "indeterminate": 0, "atypical": 0}
    assert sum(data[s]["studies"] for s in ("train", "val", "test")) == 60
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["images"]) for r in rows] == [("pretrain", 40), ("train", 32)]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["stages"]["test"]["metrics"]["macro_f1"] <= 1


def test_a_stage_data_block_is_validated_at_its_own_path(corex_cli, tmp_path):
    recipe = _recipe(tmp_path)
    recipe["stages"]["pretrain"]["data"]["image_size"] = 40
    recipe["stages"]["pretrain"]["data"]["nonsense"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = corex_cli("validate", path, "--no-build")
    assert code == 2 and "Traceback" not in err
    assert "stages.pretrain.data.image_size: must be a multiple of 32" in err, err
    assert "stages.pretrain.data.nonsense: unknown option" in err, err
    recipe = _recipe(tmp_path)  # a folder that does not exist: the data source's own message, at the stage's path
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = corex_cli("validate", path)
    assert code == 2 and "stages.pretrain.data" in err and "not a directory" in err, err
