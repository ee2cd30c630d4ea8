"""The deploy-readiness report: report.html (self-contained), report.md and report.json.

:func:`write_report` builds it for a run directory from what the run left: results.json,
data.json, curves.png and every evaluate stage's folder (tables, predictions, figures). Sections
whose files are missing are left out. :func:`write_study_report` does the same for a study's
comparison. The HTML embeds every image as a base64 data URI and links nothing outside the file,
so it opens from disk, offline, with no server.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

import csv

from corex import metrics as declared
from corex.errors import CorexError
from corex.rundir import atomic_write_text, write_json
from corex_study.runs import read_json

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.meta { color: #666; font-size: 0.9em; }
.rule { background: #f5f5f7; border-left: 4px solid #888; padding: 0.5em 0.8em; font-size: 0.92em; }
.verdict { font-size: 1.15em; font-weight: 600; }
ul.findings li { margin: 0.35em 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
th { background: #f0f0f3; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.9em; margin-top: 0.3em; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def _cell(value: Any) -> str:
    """A table cell: numbers right-aligned (the default), words left-aligned."""
    text = _fmt(value)
    wordy = isinstance(value, str) and re.search(r"[a-zA-Z]{3}", text)
    return f'<td class="text">{html.escape(text)}</td>' if wordy else f"<td>{html.escape(text)}</td>"


class Document:
    """Builds the same content as HTML and Markdown side by side."""

    def __init__(self, title: str):
        self.title = title
        self.html: list[str] = []
        self.md: list[str] = [f"# {title}", ""]

    def heading(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md += [f"## {text}", ""]

    def paragraph(self, text: str, css: str = "") -> None:
        attribute = f' class="{css}"' if css else ""
        self.html.append(f"<p{attribute}>{html.escape(text)}</p>")
        self.md += [text, ""]

    def items(self, texts: list[str]) -> None:
        self.html.append('<ul class="findings">' + "".join(f"<li>{html.escape(t)}</li>" for t in texts) + "</ul>")
        self.md += [f"- {t}" for t in texts] + [""]

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        self.md += ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows] + [""]

    def figure(self, path: Path, caption: str, root: Path) -> None:
        alt = html.escape(path.name)
        self.html.append(f'<figure><img src="{_data_uri(path)}" alt="{alt}"><figcaption>{html.escape(caption)}</figcaption></figure>')
        self.md += [f"![{path.name}]({path.relative_to(root).as_posix()})", "", f"*{caption}*", ""]

    def pipe_table(self, text: str) -> None:
        """A Markdown pipe table (as compare.md writes them) as a table of both outputs."""
        lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
        self.table(lines[0], lines[2:])

    def render_html(self, meta: str) -> str:
        return (
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1><p class=\"meta\">{html.escape(meta)}</p>"
            + "\n".join(self.html) + "</body></html>\n"
        )


def data_table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    splits = {k: v for k, v in data.items() if isinstance(v, dict) and "classes" in v}
    classes = list(dict.fromkeys(c for info in splits.values() for c in info["classes"]))
    header = ["split", "studies", "images", "patients", *classes]
    rows = [[split, info.get("studies", "–"), info.get("images", "–"), info.get("patients", "–"),
             *(info["classes"].get(c, 0) for c in classes)] for split, info in splits.items()]
    return header, rows


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def metrics_table(result: dict[str, Any], catalog: declared.Catalog) -> list[list[Any]]:
    """Headline metrics first (as the plugins declare them), then any others; the families of
    per-class ones (``f1/*``) are left to the per-class table."""
    metrics, intervals = result.get("metrics", {}), result.get("intervals", {})
    names = [m for m in catalog.headline() if metrics.get(m) is not None]
    families = {m.name for m in catalog if "*" in m.name}
    names += sorted(m for m in metrics if m not in names and metrics[m] is not None
                    and not ((metric := catalog.get(m)) is not None and metric.name in families))
    rows = []
    for name in names:
        interval = intervals.get(name)
        rows.append([name, float(metrics[name]), f"{interval[0]:.3f} to {interval[1]:.3f}" if interval else ""])
    return rows


def write_report(run_dir: str | Path, pm: Any = None) -> dict[str, Any]:
    """Write report.html, report.md and report.json into ``run_dir``; returns the report.json content.

    Reads results.json (required), data.json, curves.png and each evaluate stage's folder. The
    findings, the headline metrics and the figures' captions come from the plugins that computed
    them (``corex_findings``, ``corex_metrics``, ``corex_artefacts``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").exists():
        raise CorexError(f"'{run_dir}' holds no results.json: not a finished run directory")
    results = read_json(run_dir / "results.json")
    name = results.get("recipe", run_dir.name)
    catalog, captions = declared.catalog(pm), declared.artefacts(pm)
    evaluations = {s: r for s, r in results.get("stages", {}).items() if r.get("kind") == "evaluate"}
    findings = [f for stage, result in evaluations.items() for f in declared.findings(run_dir, stage, result, pm)]
    verdicts = [f for f in findings if f.verdict]

    doc = Document(f"Deploy-readiness report: {name}")
    doc.heading("Findings")
    for verdict in verdicts:
        doc.paragraph(f"[{verdict.stage}] {verdict.text}" if len(evaluations) > 1 else verdict.text, "verdict")
    for note in dict.fromkeys(v.note for v in verdicts if v.note):
        doc.paragraph(note, "rule")
    doc.items([f"[{f.stage}] {f.text}" if len(evaluations) > 1 else f.text for f in findings if not f.verdict])

    if (run_dir / "data.json").exists():
        header, rows = data_table(read_json(run_dir / "data.json"))
        if rows:
            doc.heading("Data")
            doc.paragraph("Studies, images and patients per split, and studies per class (data.json).")
            doc.table(header, rows)
    if (run_dir / "curves.png").exists():
        doc.heading("Training")
        doc.figure(run_dir / "curves.png", "Training and validation curves per stage (metrics.jsonl)" + selection_note(results) + ".",
                   run_dir)

    order = list(captions)
    for stage, result in evaluations.items():
        split = result.get("split", stage)
        folder = declared.stage_folder(run_dir, stage)
        doc.heading(f"Evaluation: {stage} ({split} split)")
        rows = metrics_table(result, catalog)
        if rows:
            doc.table(["metric", "value", "95% bootstrap interval"], rows)
        for table in sorted(folder.glob("*.csv"), key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name)):
            rows_read = read_csv(table)
            if table.name in captions and rows_read and len(rows_read) <= 50:  # a per-sample table is linked, not shown
                doc.paragraph(captions[table.name].format(split=split) + f" ({table.name})")
                columns = list(rows_read[0])
                doc.table(columns, [[_maybe_float(row[c]) for c in columns] for row in rows_read])
        pictures = sorted((p for p in folder.glob("*.png") if p.name != "curves.png"), key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
        for picture in pictures:
            caption = captions.get(picture.name, "Figure written by the evaluate stage: " + re.sub(r"[_-]+", " ", picture.stem) + ".")
            doc.figure(picture, caption.format(split=split), run_dir)

    report = {"run": str(run_dir), "recipe": name, "rules": list(dict.fromkeys(v.note for v in verdicts if v.note)),
              "findings": [f.to_dict() for f in findings]}
    meta = f"Run directory {run_dir}; written by corex_study from results.json and the evaluate stages' artefacts."
    atomic_write_text(run_dir / "report.html", doc.render_html(meta))
    atomic_write_text(run_dir / "report.md", "\n".join(doc.md))
    write_json(run_dir / "report.json", report)
    return report


def selection_note(results: dict[str, Any]) -> str:
    """How each train stage's checkpoint was chosen, as the results say."""
    chosen = [f"stage '{name}' keeps epoch {stage['best_epoch']}, the best validation {stage['selected_on']}"
              for name, stage in results.get("stages", {}).items() if stage.get("selected_on") and stage.get("best_epoch") is not None]
    unchosen = [f"stage '{name}' selected no epoch ({stage['selected_on']} was never finite), so it keeps its last weights"
                for name, stage in results.get("stages", {}).items() if stage.get("selected_on") and stage.get("best_epoch") is None]
    return "; " + "; ".join(chosen + unchosen) if chosen or unchosen else ""


def _maybe_float(text: str) -> Any:
    try:
        return float(text) if "." in text or "nan" in text.lower() else int(text)
    except ValueError:
        return text


# -- the study's report -----------------------------------------------------------------------------


def comparison_findings(comparison: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's findings: one per paired difference (its mean, every paired interval behind the conclusion, by
    seed and by test study, so a reader sees which one leaves 0 inside, and the seeds 80% power would need), and one
    per degenerate arm, naming its degenerate runs and why."""
    from corex_study.compare import degenerate_text

    metric = comparison["metric"]
    found = []
    for arm in comparison["arms"]:
        if arm.get("degenerate"):
            entries = arm["degenerate"]
            text = (f"{arm['label']} at label fraction {arm['label_fraction']:g} is degenerate in {len(entries)} of {len(arm['seeds'])} "
                    f"runs: {degenerate_text(entries)}.")
            found.append({"text": text, "metric": f"degenerate/{arm['label']}@{arm['label_fraction']:g}", "value": float(len(entries)),
                          "source": "compare.json", "stage": "", "also": []})
    for d in comparison["differences"]:
        tests = [(name, label, d[name]) for name, label in (("by_seed", "by seed"), ("by_study", "by test study")) if d[name]]
        if not tests:
            continue
        quoted, _, shown = tests[-1]  # the by-study mean when there is one: it is the value checked against compare.json
        intervals = "; ".join(f"{label} {t['low']:+.3f} to {t['high']:+.3f} (Holm p {_p_value(t['p_holm'])} over {t['comparisons']} "
                              f"comparison{'s' if t['comparisons'] != 1 else ''})" for _, label, t in tests)
        text = (f"{d['arm']} at label fraction {d['label_fraction']:g}: {shown['mean']:+.3f} {metric} against "
                f"{comparison['baseline']}, 95% intervals {intervals}: {d['conclusion']}.")
        power = d.get("power")
        if power and power.get("needed"):
            text += (f" At the observed sd of {power['sd']:.3f} over {power['n']} {power['units']}, a paired t test at "
                     f"Holm's first-step level {power['alpha']:.4g} has power {power['power_now']:.2f}; {power['target']:.0%} "
                     f"power needs {power['needed']} {str(power['units']).split(' (')[0]}.")
        found.append({"text": text, "metric": f"{quoted}/{d['arm']}@{d['label_fraction']:g}/{metric}",
                      "value": shown["mean"], "source": "compare.json", "stage": "", "also": []})
    return found


def _p_value(p: float) -> str:
    return "–" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def write_study_report(study_dir: str | Path, comparison: dict[str, Any]) -> dict[str, Any]:
    """report.html, report.md and report.json of a comparison (written by ``corex study`` / ``compare --out``)."""
    from corex_study.compare import arms_table, differences_table, variance_table

    study_dir = Path(study_dir)
    findings = comparison_findings(comparison)
    detected = [d for d in comparison["differences"] if d.get("detected")]
    doc = Document(f"Study report: test {comparison['metric']} across arms")
    doc.heading("Findings")
    if comparison["differences"]:
        total = len(comparison["differences"])
        summary = (f"{len(detected)} of {total} paired differences against {comparison['baseline']} "
                   f"{'is' if len(detected) == 1 else 'are'} detected after Holm correction"
                   + ("; for the others each row names the test that did not reject." if len(detected) < total else "."))
        doc.paragraph(summary, "verdict")
    doc.paragraph("A difference counts as detected only when both paired tests reject: by seed and by test study (where "
                  "predictions allow), each 95% interval excluding 0 and each Holm-adjusted p-value below 0.05. Requiring both "
                  "is an intersection-union test.", "rule")
    doc.items([f["text"] for f in findings])
    doc.heading("Arms")
    doc.pipe_table(arms_table(comparison))
    if (study_dir / "compare.png").exists():
        doc.figure(study_dir / "compare.png", f"Test {comparison['metric']} per arm and label fraction: each seed's run (dots) "
                   "and the mean with its 95% t interval over seeds (black); the dashed line is the baseline's mean.", study_dir)
    if comparison["differences"]:
        doc.heading(f"Paired differences against {comparison['baseline']}")
        doc.pipe_table(differences_table(comparison))
    doc.heading("Where the spread comes from")
    doc.paragraph("Variance components as standard deviations: between data draws, between trainings on one data draw, "
                  "and from the sampling of the test studies (docs/study.md says how each is estimated).")
    doc.pipe_table(variance_table(comparison))
    report = {"study": str(study_dir), "metric": comparison["metric"], "baseline": comparison["baseline"], "findings": findings}
    atomic_write_text(study_dir / "report.html", doc.render_html(f"Study directory {study_dir}; written by corex_study from compare.json."))
    atomic_write_text(study_dir / "report.md", "\n".join(doc.md))
    write_json(study_dir / "report.json", report)
    return report
