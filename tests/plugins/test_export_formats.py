"""`corex export` to ONNX and TorchScript: the graphs give the torch model's probabilities, carry the
preprocessing contract and the input gate, and `corex predict` runs them; newer or unknown formats
are refused with both versions named; the model card is written from metadata."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from corex_cxr.cache import decode_to_cache
from corex_predict import load_model, predict
from corex_predict.export import export_model
from PIL import Image
from pydicom.data import get_testdata_file

import corex
from corex.cli import main

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")]
PROBS = ["prob_negative", "prob_typical", "prob_indeterminate", "prob_atypical"]
RG1 = get_testdata_file("RG1_UNCR.dcm")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny toy run (one epoch) whose test stage fits the input gate, exported in the three formats."""
    from corex.plugins import get_plugin_manager, register, reset_plugin_manager
    from corex.testing import ToyPlugin, tiny_recipe_dict

    reset_plugin_manager()
    register(get_plugin_manager(), ToyPlugin, name="corex-toy")
    recipe = tiny_recipe_dict()
    recipe["stages"]["train"]["epochs"] = 1
    recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 20}, "segmentation", "input_gate"]
    root = tmp_path_factory.mktemp("formats")
    corex.run(recipe, root / "run", progress=False)
    for name in ("model.pt", "model.onnx", "model.ts"):
        export_model(root / "run", root / "exports" / name)
    reset_plugin_manager()
    return root


def cli(*args) -> int:
    return main([str(a) for a in args])


def _png(path: Path, seed: int) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48), dtype=np.uint8)).save(path)
    return path


def _rg1_tensor(size: int) -> torch.Tensor:
    pixels, _ = decode_to_cache(Path(RG1), size)
    return torch.from_numpy(pixels.astype(np.float32) / 65535.0)[None, None]


def test_onnx_and_torchscript_give_the_torch_models_outputs(exported):
    """Against the torch model run by hand (softmax of the head's logits, the head's mask logits, the
    Mahalanobis distance from the run's input_gate.pt), on the real radiograph and a random batch of 5."""
    native = load_model(exported / "run")
    gate = torch.load(exported / "run" / "test" / "input_gate.pt", weights_only=True)
    images = torch.cat([_rg1_tensor(native.image_size), torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))])
    with torch.no_grad():
        features = native.model.encoder(images)
        probabilities = torch.softmax(native.model.heads["classification"](features), 1)
        masks = native.model.heads["segmentation"](features)
        pooled = features[-1].mean((2, 3)).double()
        centred = pooled - gate["mean"].double()
        distance = ((centred @ gate["precision"].double()) * centred).sum(1).sqrt()
    session = onnxruntime.InferenceSession(str(exported / "exports" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    onnx_out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": images.numpy()})))
    scripted = torch.jit.load(str(exported / "exports" / "model.ts"))
    with torch.no_grad():
        ts_out = dict(zip(["probabilities", "mask_logits", "ood_score"], scripted(images)))
    for out in (onnx_out, ts_out):
        assert np.abs(np.asarray(out["probabilities"]) - probabilities.numpy()).max() < 1e-4
        assert np.abs(np.asarray(out["mask_logits"]) - masks.numpy()).max() < 1e-4
        assert np.allclose(np.asarray(out["ood_score"]), distance.numpy(), rtol=1e-4)
    # One image at a time works too (the batch dimension is dynamic).
    single = session.run(["probabilities"], {"image": images[:1].numpy()})[0]
    assert np.abs(single - probabilities[:1].numpy()).max() < 1e-4


def test_a_pt_export_converts_to_a_graph_with_the_same_outputs_and_gate(exported, tmp_path):
    """`corex export model.pt model.ts`: the graph made from the .pt export, not from the run, gives
    the run's probabilities and carries its input gate; an ONNX file is not a source."""
    assert cli("export", exported / "exports" / "model.pt", tmp_path / "converted.ts") == 0
    images = torch.cat([_rg1_tensor(32), torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))])
    native, converted = load_model(exported / "run"), load_model(tmp_path / "converted.ts")
    with torch.no_grad():
        expected = torch.softmax(native.model.heads["classification"](native.model.encoder(images)), 1)
        probabilities = torch.jit.load(str(tmp_path / "converted.ts"))(images)[0]
    assert (probabilities - expected).abs().max() < 1e-4
    assert converted.gate is not None and converted.meta["input_gate"] == native.meta["input_gate"]
    assert json.loads((tmp_path / "converted.ts.json").read_text())["file_format"] == "torchscript"
    with pytest.raises(corex.CorexError, match="not a run directory or a .pt file"):
        export_model(exported / "exports" / "model.onnx", tmp_path / "again.ts")


def test_the_contract_and_the_gate_are_embedded_in_each_file_and_beside_it(exported):
    run_meta = load_model(exported / "run").meta
    proto = onnx.load(str(exported / "exports" / "model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    extra = {"corex.json": ""}
    torch.jit.load(str(exported / "exports" / "model.ts"), _extra_files=extra)
    threshold = json.loads((exported / "run" / "test" / "input_gate.json").read_text())["threshold"]
    for meta, kind in ((json.loads(props["corex"]), "onnx"), (json.loads(extra["corex.json"]), "torchscript")):
        assert meta["format"] == "corex-model/1" and meta["corex_version"] == corex.__version__
        assert meta["class_names"] == ["negative", "typical", "indeterminate", "atypical"] and meta["image_size"] == 32
        assert meta["intensity"].startswith("float32 in [0, 1]: 0 = air")
        assert meta["graph"]["kind"] == kind and meta["graph"]["output_order"] == ["probabilities", "mask_logits", "ood_score"]
        assert meta["input_gate"]["threshold"] == threshold and meta["input_gate"]["false_alarm_rate"] == 0.05
        assert meta["training_data"]["synthetic"] is True and meta["training_data"]["source"] == "toy"
        assert meta["recipe_yaml"] == run_meta["recipe_yaml"]
    assert props["image_size"] == "32" and json.loads(props["class_names"])[0] == "negative" and float(props["ood_threshold"]) == threshold
    for name, kind, file in (("model.onnx.json", "onnx", "model.onnx"), ("model.ts.json", "torchscript", "model.ts"), ("model.json", "pt", "model.pt")):
        readable = json.loads((exported / "exports" / name).read_text())
        assert readable["file_format"] == kind and readable["file"] == file
        assert readable["input_gate"]["threshold"] == threshold and len(readable["sha256"]) == 64
    payload = torch.load(exported / "exports" / "model.pt", weights_only=True)
    assert torch.equal(payload["gate"]["precision"], torch.load(exported / "run" / "test" / "input_gate.pt", weights_only=True)["precision"])


def test_predict_runs_each_format_to_the_native_probabilities(exported, tmp_path, capsys):
    picture = _png(tmp_path / "picture.png", 1)
    results = {}
    for model in (exported / "run", exported / "exports" / "model.pt", exported / "exports" / "model.onnx", exported / "exports" / "model.ts"):
        out = tmp_path / model.name
        assert cli("predict", model, RG1, picture, "--out", out, "--no-progress") == 0, capsys.readouterr().err
        results[model.name] = json.loads((out / "predictions.json").read_text())
    err = capsys.readouterr().err
    assert "trained on synthetic data" in err and "must not be used on patients" in err
    native = results["run"]["records"]
    for name in ("model.onnx", "model.ts"):
        assert results[name]["format"] == ("onnx" if name.endswith("onnx") else "torchscript")
        for a, b in zip(native, results[name]["records"], strict=True):
            assert max(abs(a[k] - b[k]) for k in PROBS) < 1e-4
            assert abs(a["opacity_fraction"] - b["opacity_fraction"]) <= 1 / (32 * 32) + 1e-9
            assert a["flags"] == b["flags"] and a.get("ood_score", 0) == pytest.approx(b.get("ood_score", 0), rel=1e-4)
    assert results["model.pt"]["records"] == native  # the .pt export is the run's model, to the bit
    # The real radiograph passes the header checks (CR, CHEST, PA): its only flag can be the score.
    assert not re.search(r"modality=|body_part=|view=", native[0]["flags"])


def test_tta_works_on_a_graph_and_saliency_and_evaluate_ask_for_the_torch_model(exported, tmp_path, capsys):
    picture = _png(tmp_path / "picture.png", 2)
    native = predict(load_model(exported / "exports" / "model.pt"), [picture], tta="hflip,scale")
    graph = predict(load_model(exported / "exports" / "model.onnx"), [picture], tta="hflip,scale")
    assert max(abs(native[0][k] - graph[0][k]) for k in PROBS) < 1e-4
    assert cli("predict", exported / "exports" / "model.onnx", picture, "--out", tmp_path / "o", "--saliency") == 2
    err = capsys.readouterr().err
    assert "--saliency" in err and "needs the torch model" in err and "onnx" in err and "Traceback" not in err
    assert cli("evaluate", exported / "exports" / "model.ts") == 2
    err = capsys.readouterr().err
    assert "corex evaluate needs the torch model" in err and "Traceback" not in err


def _assert_both_versions(err: str, found: str) -> None:
    assert found in err and "corex-model/1" in err and corex.__version__ in err and "Traceback" not in err


@pytest.mark.parametrize("found", ["corex-model/2", "not-corex/9"])
def test_newer_or_unknown_formats_are_refused_naming_both_versions(exported, tmp_path, capsys, found):
    picture = _png(tmp_path / "p.png", 0)
    payload = torch.load(exported / "exports" / "model.pt", weights_only=True)
    payload["meta"]["format"] = payload["format"] = found
    torch.save(payload, tmp_path / "model.pt")
    proto = onnx.load(str(exported / "exports" / "model.onnx"))
    for prop in proto.metadata_props:
        if prop.key == "corex":
            prop.value = json.dumps({**json.loads(prop.value), "format": found})
    onnx.save(proto, str(tmp_path / "model.onnx"))
    extra = {"corex.json": ""}
    scripted = torch.jit.load(str(exported / "exports" / "model.ts"), _extra_files=extra)
    torch.jit.save(scripted, str(tmp_path / "model.ts"), _extra_files={"corex.json": json.dumps({**json.loads(extra["corex.json"]), "format": found})})
    for name in ("model.pt", "model.onnx", "model.ts"):
        assert cli("predict", tmp_path / name, picture, "--out", tmp_path / f"out-{name}") == 2
        _assert_both_versions(capsys.readouterr().err, found)
        assert cli("evaluate", tmp_path / name) == 2
        _assert_both_versions(capsys.readouterr().err, found)
    # A run whose checkpoint (or fitted gate) names a format this corex does not read: export refuses it.
    run = tmp_path / "run"
    shutil.copytree(exported / "run", run)
    checkpoint = torch.load(run / "checkpoints" / "train" / "model.pt", weights_only=True)
    torch.save({**checkpoint, "format": found.replace("corex-model", "corex-checkpoint")}, run / "checkpoints" / "train" / "model.pt")
    assert cli("export", run, tmp_path / "again.pt") == 2
    err = capsys.readouterr().err
    assert found.replace("corex-model", "corex-checkpoint") in err and "corex-checkpoint/1" in err and "Traceback" not in err
    torch.save(checkpoint, run / "checkpoints" / "train" / "model.pt")
    gate = torch.load(run / "test" / "input_gate.pt", weights_only=True)
    torch.save({**gate, "format": found.replace("corex-model", "corex-input-gate")}, run / "test" / "input_gate.pt")
    for args in (("export", run, tmp_path / "again.pt"), ("predict", run, picture, "--out", tmp_path / "o"), ("evaluate", run)):
        assert cli(*args) == 2
        err = capsys.readouterr().err
        assert "corex-input-gate/1" in err and found.replace("corex-model", "corex-input-gate") in err and "Traceback" not in err
    assert not (tmp_path / "again.pt").exists()


def test_formats_follow_the_suffix_or_format_and_exports_do_not_overwrite_each_other(exported, tmp_path, capsys):
    assert cli("export", exported / "run", tmp_path / "model.bin") == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert cli("export", exported / "run", tmp_path / "model.bin", "--format", "torchscript") == 0
    assert json.loads((tmp_path / "model.bin.json").read_text())["file_format"] == "torchscript"
    assert load_model(tmp_path / "model.bin").kind == "torchscript"  # read by content, whatever the name
    assert cli("export", exported / "run", tmp_path / "model.pth") == 0
    assert cli("export", exported / "run", tmp_path / "model.pt") == 2  # model.json is model.pth's
    assert "holds the metadata of 'model.pth'" in capsys.readouterr().err
    assert not (tmp_path / "model.pt").exists()


def test_the_export_model_card_lists_the_exports_and_says_synthetic(exported):
    card = (exported / "exports" / "MODEL_CARD.md").read_text()
    for name, sidecar in (("model.pt", "model.json"), ("model.onnx", "model.onnx.json"), ("model.ts", "model.ts.json")):
        sha = json.loads((exported / "exports" / sidecar).read_text())["sha256"]
        assert f"`{name}`" in card and sha in card
    assert "trained on synthetic data" in card and "must not be used on patients" in card
    assert "## Input gate" in card and "Threshold" in card


def test_the_run_model_card_is_written_from_the_runs_files(exported, tmp_path, corex_pm):
    from corex_predict.card import write_run_card

    from corex.metrics import catalog

    run = tmp_path / "run"
    shutil.copytree(exported / "run", run)
    card = (run / "MODEL_CARD.md").read_text()
    results = json.loads((run / "results.json").read_text())["stages"]["test"]
    data = json.loads((run / "data.json").read_text())
    for section in ("## Intended use", "## Training data", "## Architecture", "## Evaluation", "## Limitations", "## Provenance"):
        assert section in card
    assert "This model was trained on synthetic data" in card and "`toy`" in card
    assert f"| train | {data['train']['studies']} |" in card
    for name in catalog().headline():
        if name in results["metrics"]:
            assert f"| `{name}` | {results['metrics'][name]:.3f} |" in card
            if name in results.get("intervals", {}):
                low, high = results["intervals"][name]
                assert f"[{low:.3f}, {high:.3f}]" in card
    assert corex.load_recipe(run / "recipe.yaml").digest() in card and corex.__version__ in card
    findings = [f["text"] for f in json.loads((run / "report.json").read_text())["findings"]]
    assert findings and all(text in card for text in findings)
    # Without report.json (another observer order, or no corex_study), the findings come from the plugins.
    (run / "report.json").unlink()
    (run / "MODEL_CARD.md").unlink()
    assert write_run_card(run) == run / "MODEL_CARD.md"
    assert all(text in (run / "MODEL_CARD.md").read_text() for text in findings)
