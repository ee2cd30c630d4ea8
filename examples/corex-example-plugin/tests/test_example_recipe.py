"""The package's recipe through the real command line, in-process (``corex run``, ``corex validate``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from corex_example import csv_logger

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "example.yaml"


def test_the_recipe_validates_with_its_components_built(corex_cli, tmp_path):
    # validate builds every component and runs the encoder once, so it opens (here: writes) the phantom.
    code, out, err = corex_cli("validate", RECIPE, "--set", f"data.cache_dir={tmp_path}")
    assert code == 0, err
    assert "valid" in out


def test_a_mistyped_option_of_the_plugin_is_reported_with_its_recipe_path(corex_cli, tmp_path):
    code, _, err = corex_cli("validate", RECIPE, "--set", f"data.cache_dir={tmp_path}", "--set", "model.encoder.widht=8", "--set", "stages.test.evaluators.1.specificity=high")
    assert code == 2 and "Traceback" not in err
    assert "model.encoder.widht: unknown option; did you mean 'width'?" in err
    assert "stages.test.evaluators[1].specificity: expected a number, got 'high'" in err


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on threads that wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_corex_run_trains_the_example_encoder_and_logs_csv(corex_cli, corex_plugin, tmp_path, one_thread):
    corex_plugin(csv_logger, name="corex_example.csv_logger")  # as COREX_PLUGINS=corex_example.csv_logger would
    out = tmp_path / "run"
    code, _, err = corex_cli("--progress", "off", "run", RECIPE, "--out", out, "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert code == 0, err

    results = json.loads((out / "results.json").read_text())
    test = results["stages"]["test"]["metrics"]
    assert test["macro_f1"] > 0.3, test  # chance is 0.25; the majority class alone scores ~0.15
    assert test["dice"] > 0.1, test
    # The evaluator's table and its metrics tell the same story.
    with (out / "test" / "sens_at_spec90.csv").open(newline="") as handle:
        points = list(csv.DictReader(handle))
    assert {p["class"] for p in points} == {"negative", "typical", "indeterminate", "atypical"}
    for point in points:
        assert float(point["sensitivity"]) == pytest.approx(test[f"sens_at_spec90/{point['class']}"])
        assert float(point["specificity"]) >= 0.9
    assert test["sens_at_spec90"] > 0.1, test  # 0.1 is what a random score gets at specificity 0.9

    # The observer's CSV holds exactly the engine's metrics.jsonl rows.
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with (out / "epochs.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(logged) == 8
    for row, expected in zip(rows, logged, strict=True):
        assert set(row) == set(expected)
        for key, value in expected.items():
            assert row[key] == str(value), key
    with (out / "results.csv").open(newline="") as handle:
        assert [(r["stage"], r["kind"]) for r in csv.DictReader(handle)] == [("train", "train"), ("test", "evaluate")]

    # The plugin's own metric declaration and finding reach the summary, the report and corex compare.
    report = json.loads((out / "report.json").read_text())
    mine = [f for f in report["findings"] if f["metric"] == "sens_at_spec90"]
    assert len(mine) == 1 and f"{test['sens_at_spec90']:.2f}" in mine[0]["text"]
    assert "Operating points at 90% specificity" in (out / "report.md").read_text()
    code, table, err = corex_cli("compare", out)
    assert code == 0, err
    header = next(line for line in table.splitlines() if line.startswith("| arm"))
    assert "sens_at_spec90" in header


@pytest.mark.slow
def test_the_summary_table_shows_the_plugins_headline_metric(corex_cli, tmp_path, one_thread):
    out = tmp_path / "run"
    code, table, err = corex_cli("--progress", "off", "run", RECIPE, "--out", out, "--set", f"data.cache_dir={tmp_path / 'cache'}",
                                 "--set", "stages.train.epochs=1")
    assert code == 0, err
    row = next(line for line in table.splitlines() if line.strip().startswith("sens_at_spec90"))
    value = json.loads((out / "results.json").read_text())["stages"]["test"]["metrics"]["sens_at_spec90"]
    assert f"{value:.3f}" in row
