"""benchmarks/quickstart_figures.py over seeds, shrunk: every headline metric's mean ± sd and range, the
processor and the wall time (the 5-seed benchmark itself takes about 10 minutes of a 2-core CPU)."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_figures_over_two_seeds(tmp_path):
    from corex.metrics import catalog

    command = [sys.executable, str(ROOT / "benchmarks" / "quickstart_figures.py"), "--seeds", "0", "1",
               "--set", "stages.train.epochs=1", "--set", "data.studies=200", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert text.startswith("Processor: ") and "wall time" in text
    assert "exact on one machine" in text and "another processor" in text
    for seed in (0, 1):
        recipe = (tmp_path / "out" / f"seed-{seed}" / "recipe.yaml").read_text()
        assert f"seed: {seed}" in recipe
    tests = [json.loads((tmp_path / "out" / f"seed-{s}" / "results.json").read_text())["stages"]["test"]["metrics"] for s in (0, 1)]
    shown = 0
    for name in catalog().headline():
        values = [m[name] for m in tests if isinstance(m.get(name), (int, float))]
        if len(values) < 2:
            continue
        row = re.search(rf"^\| {re.escape(name)} \| ([-0-9.]+) ± ([-0-9.]+) \| ([-0-9.]+) to ([-0-9.]+) \|$", text, flags=re.M)
        assert row, name
        mean, sd, low, high = map(float, row.groups())
        assert (mean, sd, low, high) == pytest.approx(
            (statistics.fmean(values), statistics.stdev(values), min(values), max(values)), abs=6e-4), name
        shown += 1
    assert shown >= 5
