"""`corex evaluate` and `corex predict` on an exported phantom run reproduce the run's own test figures."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import yaml
from corex_predict import load_model, predict

from corex.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """The quickstart shrunk to seconds: phantom DICOMs, the real SIIM loader, one epoch; and its export."""
    from corex.plugins import reset_plugin_manager

    reset_plugin_manager()
    root = tmp_path_factory.mktemp("evaluate")
    code = main([
        "run", str(QUICKSTART), "--out", str(root / "run"), "--no-progress",
        "--set", "data.studies=60", "--set", "data.image_size=32", "--set", "data.batch_size=8",
        "--set", f"data.cache_dir={root / 'cache'}", "--set", "data.workers=1", "--set", "model.encoder.width=8",
        "--set", "stages.train.epochs=1", "--set", "stages.test.evaluators.0.bootstrap=50",
        "--set", "stages.test.evaluators.2.bootstrap=50",
    ])
    assert code == 0
    assert main(["export", str(root / "run"), str(root / "model.pt")]) == 0
    return root


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same(a, b) -> bool:
    """Equal, counting NaN (JSON null) equal to itself."""
    missing = (None,) if not isinstance(a, float) else ()
    if a in missing or b in missing or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or (isinstance(b, float) and math.isnan(b)))
    return a == b


def test_evaluating_the_export_reproduces_the_runs_test_metrics_exactly(phantom_run, capsys):
    run = phantom_run / "run"
    before = _digest(run)
    assert main(["evaluate", str(phantom_run / "model.pt"), "--json"]) == 0
    out, err = capsys.readouterr()
    folder = phantom_run / "model-evaluations" / "test-1"
    assert f"evaluation written to {folder}" in err
    again = json.loads((folder / "results.json").read_text())["stages"]["evaluate"]
    assert again == json.loads(out)["stages"]["evaluate"]
    original = json.loads((run / "results.json").read_text())["stages"]["test"]
    different = {k: (v, again["metrics"].get(k)) for k, v in original["metrics"].items() if not _same(v, again["metrics"].get(k))}
    assert not different
    assert again["intervals"] == original["intervals"]
    assert (folder / "predictions.csv").read_text() == (run / "test" / "predictions.csv").read_text()
    assert _digest(run) == before  # the run itself is untouched


def test_evaluate_a_run_with_tta_into_new_folders(phantom_run, capsys):
    run = phantom_run / "run"
    before = _digest(run)
    assert main(["evaluate", str(run), "--tta", "hflip,scale"]) == 0
    table = capsys.readouterr().out
    assert "TTA: hflip, scale" in table and "with TTA" in table
    assert any(line.split()[0] == "macro_f1" and len(line.split()) >= 3 for line in table.splitlines()[2:])
    assert main(["evaluate", str(run), "--split", "val", "--evaluators", "classification"]) == 0
    assert main(["evaluate", str(run), "--evaluators", "segmentation"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (run / "evaluations").iterdir()) == ["test-1", "test-2", "val-1"]
    with_tta = json.loads((run / "evaluations" / "test-1" / "results.json").read_text())
    metrics = with_tta["stages"]["evaluate"]["metrics"]
    original = json.loads((run / "results.json").read_text())["stages"]["test"]["metrics"]
    assert all(_same(v, metrics[k]) for k, v in original.items())  # without TTA: as the run
    assert with_tta["tta"] == ["hflip", "scale"]
    for key in ("macro_f1", "auroc", "dice", "loss"):
        assert f"tta/{key}" in metrics
    assert 0.0 <= metrics["tta/macro_f1"] <= 1.0
    assert "tta/pointing_game" not in metrics  # Grad-CAM sees the plain model: reported once
    assert (run / "evaluations" / "test-1" / "tta" / "predictions.csv").is_file()
    val = json.loads((run / "evaluations" / "val-1" / "results.json").read_text())["stages"]["evaluate"]["metrics"]
    assert val["n"] == json.loads((run / "data.json").read_text())["val"]["studies"] and "dice" not in val
    only_masks = json.loads((run / "evaluations" / "test-2" / "results.json").read_text())["stages"]["evaluate"]["metrics"]
    assert only_masks["dice"] == original["dice"] and "macro_f1" not in only_masks
    assert {k: v for k, v in _digest(run).items() if not k.startswith("evaluations")} == before


def test_evaluate_reports_bad_arguments_as_messages(phantom_run, capsys, tmp_path):
    assert main(["evaluate", str(phantom_run / "run"), "--evaluators", "clasification"]) == 2
    err = capsys.readouterr().err
    assert "clasification" in err and "did you mean 'classification'" in err and "Traceback" not in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["evaluate", str(phantom_run / "run"), "--out", str(tmp_path / "full")]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_predicting_the_test_images_reproduces_the_runs_study_probabilities(phantom_run):
    run = phantom_run / "run"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    (phantom,) = (Path(recipe["data"]["cache_dir"]) / "phantom").iterdir()
    with (run / "test" / "predictions.csv").open() as handle:
        expected = {row["study_id"]: row for row in csv.DictReader(handle)}
    files = [f for study in expected for f in sorted((phantom / "train" / study).rglob("*.dcm"))]
    assert len(files) >= len(expected) > 0
    predictions = predict(load_model(phantom_run / "model.pt"), files, batch_size=3)
    studies = {r["study_id"]: r for r in predictions.studies}  # grouped by the DICOM StudyInstanceUID
    assert set(studies) == set(expected)
    names = load_model(phantom_run / "model.pt").class_names
    for study, row in expected.items():
        assert studies[study]["predicted"] == row["predicted"]
        for name in names:
            # predictions.csv holds six significant digits
            assert studies[study][f"prob_{name}"] == pytest.approx(float(row[f"p_{name}"]), abs=2e-6), (study, name)


def test_the_summary_table_says_what_else_results_json_holds():
    from corex_predict.cli import evaluation_table

    metrics = {"macro_f1": 0.7, "loss": 0.5, "loss/classification": 0.4, "f1/negative": 0.8, "auroc/typical": 0.9,
               "subgroups/examined": 3.0, "temperature": 1.1, "tta/macro_f1": 0.6}
    results = {"model": "m", "stage": "train", "split": "test", "stages": {"evaluate": {"metrics": metrics, "intervals": {}}}}
    lines = evaluation_table(results).splitlines()
    assert any(line.split()[0] == "macro_f1" for line in lines[2:-1])
    assert lines[-1] == "  more in results.json: auroc/..., f1/..., subgroups/..., temperature"
    only_shown = {"model": "m", "stage": "train", "split": "test", "stages": {"evaluate": {"metrics": {"macro_f1": 0.7}}}}
    assert "more in results.json" not in evaluation_table(only_shown)
