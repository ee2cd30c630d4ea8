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
    run = tmp_path / "run"
    corex.run(corex.load_recipe(tiny_recipe), out=run, progress=False)
    html = (run / "report.html").read_text()
    figures = sorted(p.name for p in (run / "test").glob("*.png")) + ["curves.png"]
    assert check_self_contained(html) == len(figures)
    for name in ("Findings", "Data", "Training", "Evaluation: test (test split)", "Deploy-readiness rule"):
        assert name in html
    findings = check_findings(run)
    metrics = {f["metric"] for f in findings}
    assert {"macro_f1", "pointing_game", "dice/positive"} <= metrics
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

    difference = {"recipe": "inpaint", "label_fraction": 0.1, "seeds": [0, 1, 2, 3, 4],
                  "by_seed": test(0.082, -0.033, 0.197, 1.0), "by_study": test(0.082, 0.045, 0.119, 0.0002),
                  "conclusion": "no detectable difference at this size"}
    (finding,) = comparison_findings({"metric": "macro_f1", "baseline": "scratch", "differences": [difference]})
    # The by-seed interval holds 0, which is why the conclusion reads as it does: the reader must see it.
    assert "by seed -0.033 to +0.197 (Holm p 1.000 over 10 comparisons)" in finding["text"]
    assert "by test study +0.045 to +0.119 (Holm p < 0.001 over 10 comparisons)" in finding["text"]
    assert finding["value"] == 0.082 and finding["metric"] == "by_study/inpaint@0.1/macro_f1"
