"""The deploy-readiness report: self-contained HTML, and findings whose numbers are the metrics they quote."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from corex_study import write_report
from corex_eval import READY_RECALL
from sklearn.metrics import confusion_matrix

import corex
from corex.errors import CorexError

CLASSES = ["negative", "typical", "indeterminate", "atypical"]


def check_self_contained(html: str) -> int:
    """No external URL anywhere; every image is an embedded PNG. Returns the number of images."""
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, flags=re.IGNORECASE)
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<(script|link|iframe)\b", html, flags=re.IGNORECASE)
    sources = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", html)
    assert len(sources) == len(re.findall(r"<img\b", html))
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    return len(sources)


def source_value(run: Path, finding: dict, metric: str, source: str, stage: str | None = None) -> float:
    """The number ``metric`` computed independently from the file the finding names (``stage``: a number
    another stage's result holds)."""
    stage = stage or finding["stage"]
    results = json.loads((run / "results.json").read_text())["stages"][stage]
    if source == "results.json":
        if metric.startswith("interval/"):
            low, high = results["intervals"][metric.split("/", 1)[1]]
            return high - low
        return results["metrics"][metric]
    if source == "per_class.csv":
        kind, name = metric.split("/", 1)
        rows = {r["class"]: r for r in csv.DictReader((run / stage / "per_class.csv").open())}
        return float(rows[name][kind])
    if source == "subgroups.csv":
        from corex_eval.rules import subgroup_key

        parts = metric.split("/")  # subgroup/<key>/<metric>[/difference|/rest]
        column = {3: "subgroup", 4: parts[-1]}[len(parts)]
        rows = [r for r in csv.DictReader((run / stage / "subgroups.csv").open())
                if subgroup_key(r["field"], r["group"]) == parts[1] and r["metric"] == parts[2]]
        assert len(rows) == 1, metric
        return float(rows[0][column])
    if source == "data.json":
        return data_value(json.loads((run / "data.json").read_text()), stage, metric)
    if source == "predictions.csv":
        _, true, predicted = metric.split("/")
        rows = list(csv.DictReader((run / stage / "predictions.csv").open()))
        names = sorted({r["label"] for r in rows} | {r["predicted"] for r in rows})
        matrix = confusion_matrix([r["label"] for r in rows], [r["predicted"] for r in rows], labels=names)
        row = matrix[names.index(true)]
        return row[names.index(predicted)] / row.sum()
    raise AssertionError(f"unknown source {source}")


def data_value(data: dict, stage: str, metric: str) -> float:
    """A number an external-validation finding computes from data.json, computed again here."""
    own = data["stages"][stage]
    kind, *rest = metric.split("/")
    if kind == "shift":  # total variation distance between the training images' and the external images' shares
        (field,) = rest
        train, external = data["subgroups"]["train"][field], own["subgroups"]["test"][field]
        p = {k: v / sum(train.values()) for k, v in train.items()}
        q = {k: v / sum(external.values()) for k, v in external.items()}
        return 0.5 * sum(abs(p.get(k, 0) - q.get(k, 0)) for k in set(p) | set(q))
    if kind == "share":
        where, field, value = rest
        counts = (data if where == "train" else own)["subgroups"]["train" if where == "train" else "test"][field]
        return counts.get(value, 0) / sum(counts.values())
    if kind == "intensity":
        if rest == ["standardised_difference"]:
            a, b = data["intensity"]["train"], own["intensity"]["test"]
            return (b["mean"] - a["mean"]) / a["sd"]
        where, statistic = rest
        return (data if where == "train" else own)["intensity"]["train" if where == "train" else "test"][statistic]
    raise AssertionError(f"unknown data.json metric {metric}")


def shown(value: float, text: str) -> bool:
    """The sentence shows ``value`` as a percentage or with two or three decimals (or three significant digits)."""
    candidates = {f"{100 * value:.0f}%", f"{100 * value:.1f}%", f"{value:.2f}", f"{value:.3f}", f"{value:+.2f}", f"{value:.3g}"}
    if abs(value) >= 100:  # a fitted temperature gone astray
        candidates.add(f"{value:.0f}")
    return any(c in text for c in candidates)


def check_findings(run: Path) -> list[dict]:
    report = json.loads((run / "report.json").read_text())
    assert report["findings"]
    for finding in report["findings"]:
        for quoted in [finding, *finding["also"]]:
            expected = source_value(run, finding, quoted["metric"], quoted["source"], quoted.get("stage"))
            assert quoted["value"] == pytest.approx(expected, abs=1e-6), (finding["text"], quoted["metric"])
            assert shown(quoted["value"], finding["text"]), (finding["text"], quoted)
    return report["findings"]


@pytest.mark.slow
def test_a_run_with_an_evaluate_stage_writes_a_self_contained_report(tiny_recipe, tmp_path):
    tiny_recipe["data"]["studies"] = 48
    tiny_recipe["stages"]["train"]["epochs"] = 1
    tiny_recipe["stages"]["test"]["evaluators"].append({"name": "localization", "bootstrap": 20})
    tiny_recipe["stages"]["test"]["evaluators"].append({"name": "subgroups", "bootstrap": 20})  # the toy data carry no headers
    run = tmp_path / "run"
    corex.run(corex.load_recipe(tiny_recipe), out=run, progress=False)
    html = (run / "report.html").read_text()
    figures = sorted(p.name for p in (run / "test").glob("*.png")) + ["curves.png"]
    assert check_self_contained(html) == len(figures)
    for name in ("Findings", "Data", "Training", "Evaluation: test (test split)", "Deploy-readiness rule"):
        assert name in html
    findings = check_findings(run)
    metrics = {f["metric"] for f in findings}
    assert {"macro_f1", "dice/positive", "selective/accuracy_at_80", "subgroups/examined",
            "pointing_game/vs_prior", "deletion_auc"} <= metrics
    assert "pointing_game" not in metrics  # stated once, in the finding against the fixed-point baseline
    assert any(m.startswith("recall/") for m in metrics)
    markdown = (run / "report.md").read_text()
    assert "](curves.png)" in markdown and "## Findings" in markdown


def fabricated_run(root: Path, recalls: dict[str, float], metrics: dict[str, float]) -> Path:
    """A run directory with only what an evaluate stage writes (no curves, no data.json)."""
    (root / "test").mkdir(parents=True)
    stages = {"test": {"kind": "evaluate", "split": "test", "metrics": metrics, "intervals": {"macro_f1": [0.5, 0.7]}}}
    (root / "results.json").write_text(json.dumps({"recipe": "made-up", "stages": stages}))
    with (root / "test" / "per_class.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "precision", "recall", "f1", "auroc", "support"])
        writer.writerows([[c, 0.5, r, 0.5, 0.9, 10] for c, r in recalls.items()])
    # 22 indeterminate studies, 9 predicted typical: 41%
    rows = [("indeterminate", "typical")] * 9 + [("indeterminate", "indeterminate")] * 13 + [("typical", "typical")] * 20
    with (root / "test" / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_id", "label", "predicted", *(f"p_{c}" for c in CLASSES)])
        writer.writerows([[f"s{i}", y, p, 0.25, 0.25, 0.25, 0.25] for i, (y, p) in enumerate(rows)])
    return root


def test_findings_state_the_issue_examples_from_the_numbers(tmp_path):
    metrics = {"macro_f1": 0.6, "n": 42, "ece": 0.12, "ece/calibrated": 0.04, "temperature": 1.8, "pointing_game": 0.57,
               "f1/typical": 0.7, "f1/indeterminate": 0.4}
    run = fabricated_run(tmp_path / "run", {c: 0.5 + 0.05 * i for i, c in enumerate(CLASSES)}, metrics)
    report = write_report(run)
    texts = [f["text"] for f in report["findings"]]
    verdict = texts[0]
    assert verdict.startswith(f"No class reaches {READY_RECALL:.2f} recall on the test split: negative 0.50 (95% interval 0.19 to 0.81), ")
    assert verdict.endswith("not ready to deploy.")
    for name in CLASSES:  # every class below the bar is named, with its interval
        assert name in verdict
    assert "41% of indeterminate test studies were predicted typical (9 of 22)." in texts
    assert "ECE 0.12 before and 0.04 after temperature scaling (temperature 1.80, fitted on the validation split)." in texts
    assert any(t.startswith("The pointing game hit 57% of test images") for t in texts)
    assert "The hardest class is indeterminate (lowest F1, 0.40)." in texts
    check_findings(run)
    html = (run / "report.html").read_text()
    assert check_self_contained(html) == 0 and "Training" not in html  # no curves.png: section left out


def test_the_pointing_game_is_stated_once_against_its_fixed_point_baseline_when_that_is_known(tmp_path):
    metrics = {"macro_f1": 0.6, "pointing_game": 0.56, "pointing_game/prior": 0.65, "pointing_game/vs_prior": -0.09,
               "mask_area": 0.08}
    run = fabricated_run(tmp_path / "run", dict.fromkeys(CLASSES, 0.5), metrics)
    texts = [f["text"] for f in write_report(run)["findings"]]
    about = [t for t in texts if "ointing game" in t]
    assert len(about) == 1 and about[0].startswith("Pointing game 0.56 on the test split against 0.65 for the one point "
                                                   "inside the most training boxes, a uniform map 0.08")
    check_findings(run)


def test_every_class_above_the_rule_is_not_called_a_clinical_validation(tmp_path):
    run = fabricated_run(tmp_path / "run", dict.fromkeys(CLASSES, 0.9) | {"atypical": 0.85}, {"macro_f1": 0.9})
    verdict = write_report(run)["findings"][0]
    assert verdict["metric"] == "recall/atypical" and verdict["value"] == 0.85
    assert "meets this report's rule, which is not a clinical validation" in verdict["text"]


def test_write_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(CorexError, match="no results.json"):
        write_report(tmp_path)


def test_a_report_that_fails_leaves_the_run_successful_and_says_how_to_retry(tmp_path, capsys):
    import corex_study

    run = SimpleNamespace(out=tmp_path / "not-a-run")
    corex_study.corex_run_end(run=run, results={"stages": {"test": {"kind": "evaluate"}}})
    assert "report.html not written" in capsys.readouterr().err



def test_a_study_finding_quotes_every_paired_interval_behind_its_conclusion():
    from corex_study.report import comparison_findings

    def test(mean, low, high, p_holm):
        return {"mean": mean, "low": low, "high": high, "p": p_holm, "p_holm": p_holm, "comparisons": 10}

    difference = {"arm": "inpaint", "recipe": "inpaint", "label_fraction": 0.1, "seeds": [0, 1, 2, 3, 4],
                  "by_seed": test(0.082, -0.033, 0.197, 1.0), "by_study": test(0.082, 0.045, 0.119, 0.0002),
                  "conclusion": "not established: the by-seed interval contains 0",
                  "power": {"alpha": 0.005, "n": 5, "sd": 0.093, "units": "data seeds", "power_now": 0.05, "needed": 22,
                            "target": 0.8}}
    (finding,) = comparison_findings({"metric": "macro_f1", "baseline": "scratch", "differences": [difference], "arms": []})
    # The by-seed interval holds 0, which is why the conclusion reads as it does: the reader must see it.
    assert "by seed -0.033 to +0.197 (Holm p 1.000 over 10 comparisons)" in finding["text"]
    assert "by test study +0.045 to +0.119 (Holm p < 0.001 over 10 comparisons)" in finding["text"]
    assert finding["value"] == 0.082 and finding["metric"] == "by_study/inpaint@0.1/macro_f1"
    # which test failed, never "no detectable difference" beside a test that rejects; and the seeds power needs
    assert "not established: the by-seed interval contains 0" in finding["text"] and "no detectable" not in finding["text"]
    assert "80% power needs 22 data seeds" in finding["text"] and "level 0.005" in finding["text"]


# -- the verdict with its uncertainty, ties, the temperature, selective prediction, subgroups --------


def per_class_run(root: Path, rows: list[tuple[str, int, int, float]], metrics: dict[str, float] | None = None,
                  settings: dict | None = None) -> Path:
    """A run whose per_class.csv is what the classification evaluator writes: (class, recalled, support, F1),
    with the recall and its exact 95% interval."""
    from corex_eval.exact import clopper_pearson

    (root / "test").mkdir(parents=True)
    stages = {"test": {"kind": "evaluate", "split": "test", "metrics": metrics or {}, "intervals": {}}}
    (root / "results.json").write_text(json.dumps({"recipe": "made-up", "stages": stages}))
    confidence = (settings or {}).get("confidence", 0.95)
    with (root / "test" / "per_class.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "precision", "recall", "f1", "auroc", "support", "ap", "recalled", "recall_low", "recall_high"])
        for name, recalled, support, f1 in rows:
            low, high = clopper_pearson(recalled, support, confidence)
            writer.writerow([name, 0.5, f"{recalled / support:.6g}", f1, 0.9, support, 0.5, recalled, f"{low:.6g}", f"{high:.6g}"])
    if settings is not None:
        (root / "test" / "classification.json").write_text(json.dumps(settings))
    return root


def test_the_verdict_names_every_class_below_the_bar_and_whether_its_shortfall_is_established(tmp_path):
    # The issue's example: atypical at 0.62 and indeterminate at 0.68 both fall short; only one was named.
    rows = [("negative", 90, 100, 0.8), ("typical", 170, 200, 0.8), ("indeterminate", 68, 100, 0.6), ("atypical", 31, 50, 0.5)]
    run = per_class_run(tmp_path / "run", rows)
    verdict = write_report(run)["findings"][0]
    assert verdict["verdict"] and verdict["metric"] == "recall/atypical" and verdict["value"] == pytest.approx(0.62)
    text = verdict["text"]
    assert text.startswith("2 of 4 classes reach 0.80 recall on the test split; below it: atypical 0.62 (95% interval 0.47 to 0.75) "
                           "and indeterminate 0.68 (0.58 to 0.77).")
    assert "Each shortfall is established (their intervals lie below 0.80)" in text and text.endswith("not ready to deploy.")
    check_findings(run)

    # With fewer studies, the same recalls no longer establish anything for indeterminate.
    rows = [("negative", 9, 10, 0.8), ("typical", 17, 20, 0.8), ("indeterminate", 17, 25, 0.6), ("atypical", 31, 50, 0.5)]
    text = write_report(per_class_run(tmp_path / "small", rows))["findings"][0]["text"]
    assert "Atypical's shortfall is established (its interval lies below 0.80); indeterminate's is not (its interval " \
           "straddles 0.80)" in text

    # Shortfalls whose intervals all straddle the bar: none is established, in words that say so.
    rows = [("negative", 9, 10, 0.8), ("typical", 17, 20, 0.8), ("indeterminate", 9, 10, 0.8), ("atypical", 12, 16, 0.8)]
    text = write_report(per_class_run(tmp_path / "one", rows))["findings"][0]["text"]
    assert "below it: atypical 0.75 (95% interval 0.48 to 0.93). The shortfall is not established (its interval " \
           "straddles 0.80): not ready to deploy." in text
    rows = [("negative", 9, 10, 0.8), ("typical", 17, 20, 0.8), ("indeterminate", 7, 10, 0.6), ("atypical", 12, 16, 0.8)]
    text = write_report(per_class_run(tmp_path / "two", rows))["findings"][0]["text"]
    assert "None of these shortfalls is established (their intervals straddle 0.80)" in text


def test_a_degenerate_run_names_every_class_at_zero_and_calls_ties_ties(tmp_path):
    rows = [("negative", 0, 30, 0.0), ("typical", 40, 40, 0.5), ("indeterminate", 0, 20, 0.0), ("atypical", 0, 8, 0.0)]
    metrics = {"f1/negative": 0.0, "f1/typical": 0.5, "f1/indeterminate": 0.0, "f1/atypical": 0.0}
    run = per_class_run(tmp_path / "run", rows, metrics)
    report = write_report(run)
    verdict, texts = report["findings"][0]["text"], [f["text"] for f in report["findings"]]
    assert verdict.startswith("1 of 4 classes reaches 0.80 recall on the test split; below it: negative 0.00 (95% interval 0.00 "
                              "to 0.12), indeterminate 0.00 (0.00 to 0.17) and atypical 0.00 (0.00 to 0.37).")
    assert "falls short at" not in verdict
    assert "The hardest classes are negative, indeterminate and atypical (lowest F1, 0.00, a tie)." in texts
    check_findings(run)


def test_every_class_reaching_the_bar_says_when_that_is_not_established(tmp_path):
    rows = [("negative", 90, 100, 0.9), ("typical", 9, 10, 0.9), ("indeterminate", 85, 100, 0.85), ("atypical", 170, 200, 0.8)]
    run = per_class_run(tmp_path / "run", rows, settings={"ready_recall": 0.75, "confidence": 0.9})
    report = write_report(run)
    text = report["findings"][0]["text"]
    assert text.startswith("Every class reaches 0.75 recall on the test split, the lowest indeterminate 0.85 (90% interval")
    assert "That typical reaches the bar is not established on a test set of this size: its interval reaches below 0.75." in text
    assert report["rules"] and "at least 0.75" in report["rules"][0] and "90% interval" in report["rules"][0]
    check_findings(run)


@pytest.mark.parametrize(("temperature", "problem", "start"), [
    (18335.0, None, "Temperature scaling fitted T = 18335 on the validation split, outside 0.05 to 20"),
    (0.003, None, "Temperature scaling fitted T = 0.003 on the validation split, outside 0.05 to 20"),
    (0.239, "no validation error", "Temperature scaling found no error on the validation split to learn from, so no "
                                   "temperature is best (the fit stopped at T = 0.239)"),
])
def test_a_temperature_at_the_bounds_is_not_quoted_as_calibration(tmp_path, temperature, problem, start):
    metrics = {"ece": 0.31, "ece/calibrated": 0.05, "temperature": temperature}
    run = per_class_run(tmp_path / "run", [("negative", 9, 10, 0.9), ("typical", 9, 10, 0.9)], metrics,
                        {"temperature_problem": problem})
    texts = [f["text"] for f in write_report(run)["findings"]]
    (text,) = [t for t in texts if "emperature" in t]
    assert text.startswith(start)
    assert "not a calibration of this model" in text and "after temperature scaling" not in text
    if temperature > 20:
        assert "the model's scores carry little information on the validation split" in text
    check_findings(run)


def test_selective_prediction_finding(tmp_path):
    metrics = {"accuracy": 0.84, "selective/accuracy_at_90": 0.89, "selective/accuracy_at_80": 0.93, "selective/aurc": 0.061,
               "selective/e_aurc": 0.048, "selective/coverage_at_target": 0.45}
    run = per_class_run(tmp_path / "run", [("negative", 9, 10, 0.9), ("typical", 9, 10, 0.9)], metrics,
                        {"target_accuracy": 0.95, "coverages": [0.9, 0.8], "selective_ranking": "calibrated probabilities, T = 1.40",
                         "level": "study"})
    texts = [f["text"] for f in write_report(run)["findings"]]
    assert ("Referring the 20% least confident studies to a reader raises accuracy on the rest from 0.84 to 0.93 (the 10% "
            "least confident: 0.89). Accuracy 0.95 is reached answering 45% of the studies. Area under the risk-coverage curve "
            "0.061, 0.048 above an oracle that ranks every error last (ranked by calibrated probabilities, T = 1.40).") in texts
    check_findings(run)


def test_subgroup_findings_name_the_worse_subgroup_with_its_difference(tmp_path):
    run = per_class_run(tmp_path / "run", [("negative", 9, 10, 0.9), ("typical", 9, 10, 0.9)],
                        {"subgroups/examined": 14, "subgroups/tests": 56, "subgroups/worse": 1})
    header = ["field", "group", "metric", "n", "patients", "subgroup", "subgroup_low", "subgroup_high", "rest_n", "rest",
              "difference", "difference_low", "difference_high", "p", "p_adjusted", "worse"]
    rows = [["portable", "yes", "macro_f1", 61, 58, 0.62, 0.5, 0.72, 164, 0.81, -0.19, -0.31, -0.08, 1e-5, 5e-4, "yes"],
            ["portable", "yes", "accuracy", 61, 58, 0.7, 0.6, 0.8, 164, 0.85, -0.15, -0.27, -0.03, 1e-4, 0.004, "yes"],
            ["sex", "F", "macro_f1", 100, 90, 0.75, 0.6, 0.8, 125, 0.77, -0.02, -0.1, 0.06, 0.6, 1.0, "no"]]
    with (run / "test" / "subgroups.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    (run / "test" / "subgroups.json").write_text(json.dumps({"level": "study", "correction": "holm", "min_studies": 20}))
    texts = [f["text"] for f in write_report(run)["findings"]]
    assert ("Studies with portable yes (n=61): macro-F1 0.62 against 0.81 for the rest, difference -0.19 (95% interval -0.31 "
            "to -0.08), worse beyond chance after Holm over 56 tests (14 subgroups by 4 metrics); also worse on accuracy.") in texts
    check_findings(run)


def test_external_validation_states_the_shift_and_sets_internal_and_external_side_by_side(tmp_path):
    run = per_class_run(tmp_path / "run", [("negative", 9, 10, 0.9), ("typical", 9, 10, 0.9)], {"macro_f1": 0.81, "auroc": 0.93})
    results = json.loads((run / "results.json").read_text())
    results["stages"] = {"train": {"kind": "train"}, "test": results["stages"]["test"] | {"intervals": {"macro_f1": [0.75, 0.86]}},
                         "external": {"kind": "evaluate", "split": "test", "metrics": {"macro_f1": 0.61, "auroc": 0.8},
                                      "intervals": {"macro_f1": [0.52, 0.69]}}}
    (run / "results.json").write_text(json.dumps(results))
    (run / "external").mkdir()
    views = {"train": {"view": {"AP": 55, "PA": 45}, "sex": {"F": 50, "M": 50}},
             "test": {"view": {"AP": 12, "PA": 8}, "sex": {"F": 9, "M": 11}}}
    intensity = {"train": {"mean": 0.5, "sd": 0.2, "p1": 0.01, "p50": 0.52, "p99": 0.95}}
    data = {"train": {"classes": {}}, "subgroups": views, "intensity": intensity,
            "stages": {"external": {"test": {"classes": {}}, "subgroups": {"test": {"view": {"AP": 90, "PA": 10}, "sex": {"F": 46, "M": 54}}},
                                    "intensity": {"test": {"mean": 0.6, "sd": 0.25, "p1": 0.05, "p50": 0.63, "p99": 0.99}}}}}
    (run / "data.json").write_text(json.dumps(data))
    findings = [f for f in write_report(run)["findings"] if f["stage"] == "external"]
    texts = [f["text"] for f in findings]
    assert ("External data: the header metadata of the test split of stage external's own data differ from the training images "
            "(the recipe's data, train split) most in view (total variation 0.35 against 0.05 between the training data's own "
            "train and test splits; AP 55% of training images against 90%); sex within 0.10.") in texts
    assert any(t.startswith("External data: decoded pixel intensities of the test split of stage external's own data have mean "
                            "0.60 (sd 0.25) against 0.50 (sd 0.20)") and "+0.50 training standard deviations" in t for t in texts)
    assert ("External against internal validation, the test split of stage external's own data against stage test (test split "
            "of the training data), with 95% intervals: macro-F1 0.61 (0.52 to 0.69) against 0.81 (0.75 to 0.86); macro AUROC "
            "0.80 against 0.93.") in texts
    check_findings(run)
