"""`corex export`: the whole model in one pickle-free file, run directory and export interchangeable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from corex_predict import load_model
from corex_predict.export import export_model

import corex
from corex.errors import CorexError


def run(recipe, out):
    return corex.run(recipe, out, progress=False)


def _write_marker(path: str) -> None:
    Path(path).write_text("the pickled payload ran")


class Payload:
    """Unpickling this calls _write_marker: the proof that a loader executed the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny toy run for the module (seconds); tests get their own copy."""
    from corex.plugins import get_plugin_manager, register, reset_plugin_manager
    from corex.testing import ToyPlugin, tiny_recipe_dict

    reset_plugin_manager()
    register(get_plugin_manager(), ToyPlugin, name="corex-toy")
    recipe = tiny_recipe_dict()
    recipe["stages"]["train"]["epochs"] = 1
    recipe["stages"]["train"]["heads"]["classification"].update(dropout=0.1, class_weights=[1, 2, 1, 3])
    out = tmp_path_factory.mktemp("export") / "run"
    run(recipe, out)
    reset_plugin_manager()
    return out


@pytest.fixture
def tiny_run(trained_run, tmp_path, corex_pm):
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def test_export_holds_the_whole_model_with_typed_options_and_loads_weights_only(tiny_run, tmp_path, corex_cli):
    code, _, err = corex_cli("export", tiny_run, tmp_path / "model.pt")
    assert code == 0, err
    payload = torch.load(tmp_path / "model.pt", weights_only=True)  # no pickle needed
    meta = payload["meta"]
    assert meta["format"] == "corex-model/1" and meta["stage"] == "train"
    width = meta["encoder"]["options"]["width"]
    assert width == 8 and type(width) is int  # it used to be the string "8"
    options = meta["heads"]["classification"]["options"]
    assert options["dropout"] == 0.1 and type(options["dropout"]) is float
    assert options["class_weights"] == [1.0, 2.0, 1.0, 3.0] and all(type(w) is float for w in options["class_weights"])
    assert meta["heads"]["segmentation"]["factory"] == "segmentation" and meta["heads"]["segmentation"]["weight"] == 0.5
    assert meta["class_names"] == ["negative", "typical", "indeterminate", "atypical"]
    assert meta["in_channels"] == 1 and meta["image_size"] == 32 and meta["arch"] == "resnet18"
    assert meta["normalization"] == {"range": [0, 1], "source": "synthetic toy squares"}
    assert meta["recipe_digest"] == corex.load_recipe(tiny_run / "recipe.yaml").digest()
    assert meta["corex_version"] == corex.__version__

    readable = json.loads((tmp_path / "model.json").read_text())
    assert type(readable["encoder"]["options"]["width"]) is int
    assert readable["recipe_resolved"]["model"]["encoder"]["width"] == 8 and len(readable["sha256"]) == 64

    checkpoint = torch.load(tiny_run / "checkpoints" / "train" / "model.pt", weights_only=True)
    assert payload["model"].keys() == checkpoint["model"].keys()
    assert all(torch.equal(payload["model"][k], checkpoint["model"][k]) for k in checkpoint["model"])


def test_an_export_and_its_run_directory_are_the_same_model(tiny_run, tmp_path):
    export_model(tiny_run, tmp_path / "model.pt")
    from_file, from_run = load_model(tmp_path / "model.pt"), load_model(tiny_run)
    assert from_file.meta == from_run.meta
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        a, b = from_file.model(images), from_run.model(images)
    assert a.keys() == {"classification", "segmentation"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Rebuilt, not merely loaded: the class weights option reached the head again.
    assert from_file.model.heads["classification"].class_weights.tolist() == [1.0, 2.0, 1.0, 3.0]


def test_a_full_export_works_as_encoder_from_in_a_recipe(tiny_run, tiny_recipe, tmp_path):
    export_model(tiny_run, tmp_path / "model.pt")
    tiny_recipe["stages"] = {"probe": {
        "kind": "train", "epochs": 1, "encoder_from": str(tmp_path / "model.pt"), "freeze": True,
        "heads": {"classification": {}}, "evaluators": [{"name": "classification", "bootstrap": 0}],
    }}
    run(tiny_recipe, tmp_path / "probe")
    probed = torch.load(tmp_path / "probe" / "checkpoints" / "probe" / "model.pt", weights_only=True)["model"]
    exported = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    encoder_keys = [k for k in exported if k.startswith("encoder.")]
    assert encoder_keys and all(torch.equal(probed[k], exported[k]) for k in encoder_keys)


def test_encoder_only_keeps_clean_keys_and_real_types(tiny_run, tmp_path, corex_cli):
    code, _, err = corex_cli("export", tiny_run, tmp_path / "enc.pt", "--encoder-only")
    assert code == 0, err
    state = torch.load(tmp_path / "enc.pt", weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith(("encoder.", "heads.")) for k in state)
    meta = json.loads((tmp_path / "enc.json").read_text())
    assert meta["encoder"] == {"name": "resnet18", "width": 8} and meta["arch"] == "resnet18"
    with pytest.raises(CorexError, match="holds an encoder only"):
        load_model(tmp_path / "enc.pt")


def test_the_default_stage_is_the_last_with_a_model_and_a_wrong_one_is_named(tiny_run, tmp_path, corex_cli):
    meta = export_model(tiny_run, tmp_path / "a.pt")
    assert meta["stage"] == "train"  # "test" is an evaluate stage: it leaves no model
    code, _, err = corex_cli("export", tiny_run, tmp_path / "b.pt", "--stage", "test")
    assert code == 2 and "stage 'test'" in err and "stages with one: train" in err and "Traceback" not in err
    code, _, err = corex_cli("export", tmp_path, tmp_path / "c.pt")
    assert code == 2 and "is not a corex run directory" in err


def _evil_file(path: Path, marker: Path) -> Path:
    torch.save({"format": "corex-model/1", "model": {"w": torch.zeros(1)}, "meta": {"extra": Payload(marker)}}, path)
    return path


@pytest.mark.parametrize("command", ["predict", "evaluate", "export-checkpoint"])
def test_a_pickled_object_is_refused_without_running_it(command, tiny_run, tmp_path, corex_cli):
    marker = tmp_path / "marker.txt"
    if command == "export-checkpoint":  # a run directory whose checkpoint was replaced
        target = _evil_file(tiny_run / "checkpoints" / "train" / "model.pt", marker)
        args = ["export", tiny_run, tmp_path / "out.pt"]
    else:
        target = _evil_file(tmp_path / "evil.pt", marker)
        image = tmp_path / "x.png"
        image.write_bytes(b"")
        args = ["predict", target, image, "--out", tmp_path / "p"] if command == "predict" else ["evaluate", target]
    code, _, err = corex_cli(*args)
    assert code == 2
    assert not marker.exists()
    assert str(target) in err and "pickled" in err
    assert "Traceback" not in err and "weights_only=False" not in err.replace(" ", "")
    # The file really is dangerous: an unsafe load runs it.
    torch.load(target, weights_only=False)
    assert marker.exists()
