"""The example plugin's parts, each against an independent reference, with corex.testing's fixtures.

No conftest.py is needed: installing corex makes ``corex_pm``, ``corex_plugin`` and ``corex_cli``
available (``corex.testing``), and installing this package makes corex load it.
"""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

import corex_example
from corex.contract import pyramid_problems
from corex.errors import PluginError
from corex.hookspecs import hookimpl
from corex.plugins import Registry
from corex.testing import assert_light, assert_mirrors
from corex_example import csv_logger
from corex_example.evaluator import SensitivityAtSpecificity


def test_the_installed_plugin_provides_its_components_under_its_entry_point_name(corex_pm):
    registry = Registry(corex_pm)
    assert registry.get("encoders", "example_mobilenet").plugin == "example"
    assert registry.get("evaluators", "example_sens_at_spec").plugin == "example"
    # The CSV logger is opt-in: not loaded unless named in COREX_PLUGINS (or registered by a test).
    assert not corex_pm.is_registered(csv_logger)


def test_registering_the_installed_plugin_again_says_what_to_do(corex_plugin):
    with pytest.raises(PluginError, match="already loaded.*use the corex_pm fixture"):
        corex_plugin(corex_example)


def test_a_plugin_that_is_not_installed_gets_its_hook_names_checked(corex_plugin):
    class Misspelt:
        @staticmethod
        @hookimpl
        def corex_epoch_ends(run, stage, epoch, metrics):  # no such hook: corex_epoch_end
            pass

    with pytest.raises(PluginError, match="did you mean 'corex_epoch_end'"):
        corex_plugin(Misspelt, name="misspelt")


@pytest.mark.parametrize("blocks", [1, 2])
def test_the_encoder_pyramid_is_what_it_declares_and_feeds_the_segmentation_head(corex_pm, blocks):
    registry = Registry(corex_pm)
    encoder = registry.get("encoders", "example_mobilenet").factory(width=4, blocks=blocks)
    assert (encoder.arch, encoder.in_channels, encoder.channels, encoder.strides) == ("example_mobilenet", 1, (4, 8, 16, 32), (2, 4, 8, 16))
    assert pyramid_problems(encoder, "example_mobilenet", "model.encoder") == []  # the core's own check
    images = torch.rand(2, 1, 64, 96)
    features = encoder(images)
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // s, 96 // s) for c, s in zip(encoder.channels, encoder.strides)]
    # The built-in U-Net decoder needs nothing more than channels and strides, highest resolution first.
    head = registry.get("heads", "segmentation").factory(channels=encoder.channels, strides=encoder.strides)
    assert head(features).shape == (2, 1, 64, 96)
    assert sum(p.numel() for p in encoder.parameters()) < 5_000  # depthwise-separable: tiny at width 4


def test_loading_the_plugin_and_reading_its_factories_imports_no_torch():
    # corex imports every installed plugin for `corex --help`: that must stay instant.
    assert_light("corex_example")


def test_the_factories_repeat_their_classes_options_and_defaults():
    from corex_example.encoder import MobileNetPyramid

    assert_mirrors(corex_example.example_mobilenet, MobileNetPyramid)
    assert_mirrors(corex_example.example_sens_at_spec, SensitivityAtSpecificity)


def test_the_encoder_refuses_impossible_options():
    with pytest.raises(ValueError, match="width must be at least 1"):
        corex_example.example_mobilenet(width=0)
    with pytest.raises(ValueError, match="blocks must be at least 1"):
        corex_example.example_mobilenet(blocks=0)


def reference_sensitivity(scores: np.ndarray, positive: np.ndarray, specificity: float) -> float:
    """The highest true-positive rate on scikit-learn's ROC curve with FPR <= 1 - specificity."""
    fpr, tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
    return float(tpr[fpr <= 1 - specificity + 1e-9].max())


@pytest.mark.parametrize("specificity", [0.5, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sensitivity_at_specificity_matches_scikit_learn(specificity, seed):
    rng = np.random.default_rng(seed)
    n, k = 157, 4
    labels = rng.integers(-1, k, n)  # -1: unlabelled, must be ignored
    # Logits rounded to one decimal, so that many scores tie.
    logits = np.round(rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels.clip(0)], 1)
    evaluator = SensitivityAtSpecificity(specificity=specificity, class_names=["a", "b", "c", "d"])
    evaluator.update({"label": torch.tensor([0])}, {"classification": torch.zeros(1, k)})
    evaluator.reset()  # what reset forgets must not count
    for start in range(0, n, 16):  # streamed in batches, as the engine does
        part = slice(start, start + 16)
        evaluator.update({"label": torch.from_numpy(labels[part])}, {"classification": torch.from_numpy(logits[part]).float()})
    metrics = evaluator.compute()

    known = labels >= 0
    probabilities = torch.softmax(torch.from_numpy(logits[known]).float(), dim=1).numpy()
    name = f"sens_at_spec{100 * specificity:g}"
    expected = {c: reference_sensitivity(probabilities[:, i], labels[known] == i, specificity) for i, c in enumerate("abcd")}
    for c in "abcd":
        assert metrics[f"{name}/{c}"] == pytest.approx(expected[c], abs=1e-12), c
    assert metrics[name] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


def test_the_saved_operating_points_hold_the_specificity_and_match_the_metrics(tmp_path):
    rng = np.random.default_rng(3)
    labels = torch.from_numpy(rng.integers(0, 3, 200))
    logits = torch.from_numpy(rng.normal(size=(200, 3))).float() + 2 * torch.nn.functional.one_hot(labels, 3)
    evaluator = SensitivityAtSpecificity(specificity=0.9, class_names=["x", "y", "z"])
    evaluator.update({"label": labels}, {"classification": logits})
    metrics = evaluator.compute()
    evaluator.save(tmp_path)
    with (tmp_path / "sens_at_spec90.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class"] for r in rows] == ["x", "y", "z"]
    probabilities = torch.softmax(logits, dim=1)
    for k, row in enumerate(rows):
        threshold, scores, positive = float(row["threshold"]), probabilities[:, k], labels == k
        # Independent of the evaluator's own arithmetic: apply the saved threshold to the data.
        assert float(row["specificity"]) == pytest.approx(float((scores[~positive] <= threshold).double().mean()))
        assert float(row["specificity"]) >= 0.9
        assert float(row["sensitivity"]) == pytest.approx(float((scores[positive] > threshold).double().mean()))
        assert float(row["sensitivity"]) == pytest.approx(metrics[f"sens_at_spec90/{row['class']}"])
        assert int(row["positives"]) + int(row["negatives"]) == 200


def test_a_class_without_positives_is_nan_and_left_out_of_the_mean():
    evaluator = SensitivityAtSpecificity(specificity=0.5)
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[2.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 1.0, 0]])
    evaluator.update({"label": labels}, {"classification": logits})
    metrics = evaluator.compute()
    assert math.isnan(metrics["sens_at_spec50/class2"])
    assert metrics["sens_at_spec50/class0"] == metrics["sens_at_spec50/class1"] == 1.0
    assert metrics["sens_at_spec50"] == 1.0


def test_the_evaluator_refuses_a_specificity_outside_0_1():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        corex_example.example_sens_at_spec(specificity=1.0)


def test_the_csv_logger_rewrites_an_epoch_that_runs_again_and_unions_the_columns(tmp_path):
    run = SimpleNamespace(out=tmp_path)
    csv_logger.corex_epoch_end(run=run, stage="pretrain", epoch=1, metrics={"train/loss": 2.0, "lr": 0.1})
    csv_logger.corex_epoch_end(run=run, stage="train", epoch=1, metrics={"train/loss": 1.0, "val/macro_f1": 0.5})
    csv_logger.corex_epoch_end(run=run, stage="train", epoch=1, metrics={"train/loss": 0.9, "val/macro_f1": 0.6})  # after --resume
    with (tmp_path / "epochs.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["stage", "epoch", "train/loss", "lr", "val/macro_f1"]
    assert [(r["stage"], r["epoch"], r["train/loss"], r["lr"], r["val/macro_f1"]) for r in rows] == [
        ("pretrain", "1", "2.0", "0.1", ""), ("train", "1", "0.9", "", "0.6")]
    csv_logger.corex_run_end(run=run, results={"stages": {"test": {"kind": "evaluate", "split": "test", "metrics": {"macro_f1": 0.7}}}})
    assert (tmp_path / "results.csv").read_text().splitlines() == ["stage,kind,split,macro_f1", "test,evaluate,test,0.7"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.csv", "results.csv"]  # no temporary left
