"""The input gate: the fit against scikit-learn and numpy, the evaluator as the engine calls it, and
`corex predict` / `corex evaluate` on real radiographs that are not what a phantom model was made for."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from corex_predict.gate import (
    GateEvaluator,
    InputGate,
    header_fields,
    header_flags,
    ledoit_wolf,
    quantile_threshold,
    read_gate,
    wilson,
)
from pydicom.data import get_testdata_file
from sklearn.covariance import LedoitWolf

from corex.cli import main
from corex.errors import CorexError

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
RG1, RG3 = get_testdata_file("RG1_UNCR.dcm"), get_testdata_file("RG3_UNCR.dcm")  # CR CHEST PA; CR EXTREMITY AP


# -- the fit, against independent references -----------------------------------------------------------


def test_ledoit_wolf_matches_scikit_learn():
    features = torch.from_numpy(np.random.default_rng(0).normal(size=(40, 12)) @ np.diag(np.linspace(0.2, 3, 12)))
    mean, covariance, shrinkage = ledoit_wolf(features)
    reference = LedoitWolf().fit(features.numpy())
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-10)
    assert np.allclose(mean.numpy(), reference.location_) and np.allclose(covariance.numpy(), reference.covariance_, atol=1e-12)


def test_the_threshold_is_numpys_higher_quantile_and_keeps_the_false_alarm_rate():
    scores = torch.from_numpy(np.random.default_rng(1).gamma(3.0, size=101))
    for rate in (0.01, 0.05, 0.1, 0.33):
        threshold = quantile_threshold(scores, rate)
        assert threshold == np.quantile(scores.numpy(), 1 - rate, method="higher")
        assert float((scores > threshold).double().mean()) <= rate


class _Encoder(torch.nn.Module):
    """The pyramid is the image itself at two levels: the pooled deepest level is the image's channel means."""

    def forward(self, image):
        return [image, image]


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()


def _batch(features: np.ndarray, meta: dict | None = None) -> dict:
    image = torch.from_numpy(features).float()[:, :, None, None].expand(-1, -1, 2, 2).contiguous()
    batch = {"image": image, "image_id": [f"i{i}" for i in range(len(features))], "study_id": [f"s{i}" for i in range(len(features))]}
    if meta is not None:
        batch["meta"] = meta
    return batch


def test_the_evaluator_fits_on_train_thresholds_on_val_and_reports_the_flagged_share(tmp_path):
    rng = np.random.default_rng(2)
    train, val = rng.normal(size=(60, 5)), rng.normal(size=(40, 5))
    test = np.concatenate([rng.normal(size=(18, 5)), rng.normal(loc=6.0, size=(2, 5))])  # two far away
    gate, model = GateEvaluator(false_alarm_rate=0.1), _Model()
    for chunk in np.array_split(train, 3):
        gate.training_update(_batch(chunk), {}, model=model)
    for chunk in np.array_split(val, 2):
        gate.calibration_update(_batch(chunk), {})  # without model=, as the engine may call it
    gate.reset()  # the engine resets before the scored split: the fit stays
    meta = {"modality": ["CR"] * 19 + ["MR"], "body_part": ["CHEST"] * 20, "view": ["PA"] * 20}
    gate.update(_batch(test, meta), {}, model=model)
    metrics = gate.compute()

    reference = LedoitWolf().fit(train)
    precision = np.linalg.inv(reference.covariance_)

    def distance(x):
        centred = x - reference.location_
        return np.sqrt(np.einsum("ij,jk,ik->i", centred, precision, centred))

    threshold = np.quantile(distance(val), 0.9, method="higher")
    assert metrics["input_gate/threshold"] == pytest.approx(threshold, rel=1e-4)
    ood = distance(test) > threshold
    assert ood[-2:].all()
    assert metrics["input_gate/flagged_ood"] == pytest.approx(ood.mean())
    assert metrics["input_gate/flagged_header"] == pytest.approx(1 / 20)
    assert metrics["input_gate/flagged"] == pytest.approx(np.mean(ood | (np.arange(20) == 19)))
    assert metrics["input_gate/n"] == 20
    gate.save(tmp_path)
    saved = torch.load(tmp_path / "input_gate.pt", weights_only=True)  # a plain weights-only file
    assert saved["format"] == "corex-input-gate/1" and saved["level"] == -1 and saved["false_alarm_rate"] == 0.1
    assert np.allclose(saved["mean"].numpy(), reference.location_, atol=1e-6)
    assert np.allclose(saved["precision"].numpy(), precision, rtol=1e-3, atol=1e-4)
    assert read_gate(tmp_path / "input_gate.pt").threshold == pytest.approx(threshold, rel=1e-4)
    with (tmp_path / "input_gate.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [bool(r["flags"]) for r in rows] == list(ood | (np.arange(20) == 19)) and "modality=MR" in rows[-1]["flags"]


def test_an_unfitted_gate_says_where_it_belongs_and_intervals_are_wilsons():
    gate = GateEvaluator()
    with pytest.raises(CorexError, match="evaluate stage"):
        gate.update(_batch(np.zeros((2, 3))), {}, model=_Model())
    with pytest.raises(ValueError, match="false_alarm_rate"):
        GateEvaluator(false_alarm_rate=1.5)
    low, high = wilson(0, 32)
    assert low == 0.0 and high == pytest.approx(1.959964 ** 2 / (32 + 1.959964 ** 2), rel=1e-6)  # 0.1072
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_header_flags():
    assert header_flags(header_fields(pydicom.dcmread(RG1, stop_before_pixels=True))) == []  # CR, CHEST, PA
    assert header_flags(header_fields(pydicom.dcmread(RG3, stop_before_pixels=True))) == ["body_part=EXTREMITY"]
    assert header_flags({"modality": "mr", "body_part": "KNEE", "view": "LL"}) == ["modality=MR", "body_part=KNEE", "view=LL"]
    assert header_flags({"modality": "DX", "body_part": "", "view": "AP"}) == []  # absent fields are no flag
    assert header_flags({}) == [] and header_flags({"view": "LATERAL"}) == ["view=LATERAL"]
    with pytest.raises(CorexError, match="newer"):
        InputGate.from_state({"format": "corex-input-gate/2"}, "gate")


# -- end to end, on a phantom model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """The quickstart shrunk to seconds with input_gate in its test stage, and real files to judge."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from corex.plugins import reset_plugin_manager

    reset_plugin_manager()
    root = tmp_path_factory.mktemp("gate")
    code = main([
        "run", str(QUICKSTART), "--out", str(root / "run"), "--no-progress",
        "--set", "data.studies=60", "--set", "data.image_size=32", "--set", "data.batch_size=8",
        "--set", f"data.cache_dir={root / 'cache'}", "--set", "model.encoder.width=8", "--set", "stages.train.epochs=1",
        "--set", "stages.test.evaluators=[{name: classification, bootstrap: 50}, input_gate]",
    ])
    assert code == 0
    files = root / "files"
    files.mkdir()
    stripped = pydicom.dcmread(RG3)  # the extremity radiograph without the header fields that give it away
    for keyword in ("Modality", "BodyPartExamined", "ViewPosition"):
        delattr(stripped, keyword)
    stripped.save_as(files / "extremity_no_header.dcm")
    lateral = pydicom.dcmread(RG1)
    lateral.ViewPosition = "LL"
    lateral.save_as(files / "chest_lateral.dcm")
    figure = Figure(figsize=(3, 3))
    axes = figure.subplots()
    axes.plot([0, 1, 2, 3], [0, 1, 4, 9])
    axes.set_title("not a radiograph")
    figure.savefig(files / "plot.png")
    return root


@pytest.mark.slow
def test_predict_flags_what_the_phantom_model_was_not_made_for(phantom, capsys):
    files = phantom / "files"
    inputs = [RG1, RG3, files / "extremity_no_header.dcm", files / "chest_lateral.dcm", files / "plot.png"]
    code = main(["predict", str(phantom / "run"), *map(str, inputs), "--out", str(phantom / "out"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err  # flagged inputs are still predicted
    records = {Path(r["file"]).name: r for r in json.loads((phantom / "out" / "predictions.json").read_text())["records"] if r["level"] == "image"}
    threshold = json.loads((phantom / "run" / "test" / "input_gate.json").read_text())["threshold"]
    chest, extremity, stripped, lateral, plot = (records[Path(p).name] for p in inputs)
    assert not any(k in chest["flags"] for k in ("modality=", "body_part=", "view="))  # the real chest radiograph's header passes
    assert extremity["flags"].startswith("body_part=EXTREMITY")
    assert "view=LL" in lateral["flags"]
    for record in (extremity, stripped, plot):  # the image itself gives them away, header or not
        assert record["ood_score"] > threshold and f"out_of_distribution score {record['ood_score']:.1f} > " in record["flags"]
    assert stripped["ood_score"] == pytest.approx(extremity["ood_score"], rel=1e-6)  # same pixels, no header
    assert "body_part" not in stripped["flags"]
    with (phantom / "out" / "predictions.csv").open() as handle:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(handle) if r["level"] == "image"}
    assert all(rows[name]["flags"] == records[name]["flags"] for name in records)
    assert "trained on synthetic data" in err and "phantom" in err and "must not be used on patients" in err
    assert f"flagged {RG3}: body_part=EXTREMITY" in err and "[flagged: " in out

    assert main(["predict", str(phantom / "run"), str(files / "plot.png"), RG3, "--out", str(phantom / "strict"), "--gate", "strict", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"refused {files / 'plot.png'}: out_of_distribution score" in err and f"refused {RG3}: body_part=EXTREMITY" in err
    strict = json.loads((phantom / "strict" / "predictions.json").read_text())
    assert strict["records"] == [] and len(strict["refused"]) == 2 and "Traceback" not in err


@pytest.mark.slow
def test_the_gate_travels_in_an_export_and_evaluate_applies_it(phantom, tmp_path, capsys):
    assert main(["export", str(phantom / "run"), str(tmp_path / "model.ts")]) == 0
    capsys.readouterr()
    files = [RG1, str(phantom / "files" / "plot.png")]
    from corex_predict import load_model, predict

    native, graph = predict(load_model(phantom / "run"), files), predict(load_model(tmp_path / "model.ts"), files)
    for a, b in zip(native.images, graph.images, strict=True):
        assert a["ood_score"] == pytest.approx(b["ood_score"], rel=1e-4) and a["flags"] == b["flags"]
        assert max(abs(a[k] - b[k]) for k in a if k.startswith("prob_")) < 1e-4
    # corex evaluate judges by the run's fitted gate: on the run's own test split it reproduces the run's figures ...
    assert main(["evaluate", str(phantom / "run"), "--evaluators", "classification", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["stages"]["evaluate"]["metrics"]
    original = json.loads((phantom / "run" / "results.json").read_text())["stages"]["test"]["metrics"]
    gate_keys = [k for k in original if k.startswith("input_gate/")]
    assert gate_keys and all(again[k] == pytest.approx(original[k], rel=1e-6) for k in gate_keys)
    # ... and on another source (a phantom drawn from another seed) it is applied, not fitted again.
    assert main(["evaluate", str(phantom / "run"), "--evaluators", "classification", "--set", "data.seed=11", "--json"]) == 0
    other = json.loads(capsys.readouterr().out)["stages"]["evaluate"]["metrics"]
    assert other["input_gate/threshold"] == original["input_gate/threshold"] and not math.isnan(other["input_gate/flagged"])


@pytest.mark.slow
def test_the_phantom_runs_model_card_says_synthetic_and_reports_the_gate(phantom):
    card = (phantom / "run" / "MODEL_CARD.md").read_text()
    assert "This model was trained on synthetic data" in card and "the corex phantom" in card and "must not be used on patients" in card
    gate = json.loads((phantom / "run" / "test" / "input_gate.json").read_text())
    assert f"Threshold {gate['threshold']:.4g}" in card and "Input gate on this split" in card
    report = json.loads((phantom / "run" / "report.json").read_text())
    assert any("input gate flagged" in f["text"] for f in report["findings"])
