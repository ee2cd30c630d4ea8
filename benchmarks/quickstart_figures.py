"""The quickstart's published figures, measured over seeds: run the README's quickstart and print them.

    python benchmarks/quickstart_figures.py [--seeds 0 1 2 3 4] [--set KEY=VALUE ...] [--out DIR] [--keep-cache]

Runs `corex run recipes/quickstart.yaml --set seed=S --set data.seed=S` for every seed S, as a user
would (a fresh process each; by default one empty cache for the whole benchmark, so each seed's
phantom is written and decoded as on a fresh clone), times each run, and prints Markdown: the
processor, the wall time, each run's headline test metrics, and for each headline metric (the
metrics the plugins declare as headline, corex.metrics.catalog().headline()) its mean ± sd and
range over the seeds. The runs' terminal output (progress as plain lines) is kept in
OUT/seed-S/terminal.txt.

Why several seeds: one run is exactly reproducible on one machine, but its last digits differ on
another processor (floating-point kernels differ), and a different seed moves the metrics far more
than that. The figures worth quoting are the spread over seeds. docs/quickstart.md and the README
quote this output; re-run it when the code they describe changes (about 10 minutes of both cores of a
2-core CPU for 5 seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def processor() -> str:
    """The processor's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def headline_names() -> list[str]:
    from corex.metrics import catalog

    return catalog().headline()


def summary(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    shown_sd = f"{sd:.3f}" if not math.isnan(sd) else "–"
    return f"{mean:.3f} ± {shown_sd} | {min(values):.3f} to {max(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="data and training seeds, one run each (default 0 1 2 3 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the quickstart recipe for every run (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "corex-quickstart-figures")
    parser.add_argument("--keep-cache", action="store_true", help="reuse ~/.cache/corex (or $COREX_CACHE) instead of an empty cache")
    args = parser.parse_args(argv)
    env = dict(os.environ, COREX_PROGRESS="lines", COREX_PROGRESS_INTERVAL="10")
    cache = None
    if not args.keep_cache:
        cache = Path(tempfile.mkdtemp(prefix="corex-cache-"))
        env["COREX_CACHE"] = str(cache)
    load_before = os.getloadavg()[0]
    walls, runs = {}, {}
    started_all = time.perf_counter()
    try:
        for seed in args.seeds:
            out = args.out / f"seed-{seed}"
            sets = [item for o in [*args.overrides, f"seed={seed}", f"data.seed={seed}"] for item in ("--set", o)]
            command = [sys.executable, "-m", "corex.cli", "run", str(RECIPE), *sets, "--out", str(out), "--overwrite"]
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            walls[seed] = time.perf_counter() - started
            if done.returncode != 0:
                print(f"the quickstart with seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            (out / "terminal.txt").write_text(f"$ corex run recipes/quickstart.yaml {' '.join(sets)}\n{done.stderr}{done.stdout}")
            runs[seed] = json.loads((out / "results.json").read_text())
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    total = time.perf_counter() - started_all

    names = headline_names()
    tests = {seed: results["stages"]["test"]["metrics"] for seed, results in runs.items()}
    shown = [n for n in names if any(isinstance(m.get(n), (int, float)) for m in tests.values())]
    print(f"Processor: {processor()} ({os.cpu_count()} logical cores, {platform.machine()}); "
          f"{platform.python_implementation()} {platform.python_version()}; 1-minute load average {load_before:.1f} before "
          f"and {os.getloadavg()[0]:.1f} after; cache {'reused' if args.keep_cache else 'empty'}\n")
    overrides = "".join(f" --set {o}" for o in args.overrides)
    print(f"`corex run recipes/quickstart.yaml{overrides} --set seed=S --set data.seed=S` for S in {' '.join(map(str, args.seeds))}: "
          f"wall time {total:.0f} s in all, {statistics.fmean(walls.values()):.0f} s per run "
          f"({min(walls.values()):.0f} to {max(walls.values()):.0f} s)\n")
    print("| seed | wall time (s) | test studies | " + " | ".join(shown) + " |")
    print("|---|---|---|" + "---|" * len(shown))
    for seed in args.seeds:
        metrics = tests[seed]
        cells = [f"{metrics[n]:.3f}" if isinstance(metrics.get(n), (int, float)) else "–" for n in shown]
        studies = int(metrics["n"]) if isinstance(metrics.get("n"), (int, float)) else "?"
        print(f"| {seed} | {walls[seed]:.0f} | {studies} | " + " | ".join(cells) + " |")
    print(f"\nOver the {len(args.seeds)} seeds (data and training seed S), each headline test metric:\n")
    print("| metric | mean ± sd | range |\n|---|---|---|")
    for name in shown:
        values = [float(m[name]) for m in tests.values() if isinstance(m.get(name), (int, float)) and math.isfinite(m[name])]
        print(f"| {name} | {summary(values)} |")
    print("\nA single run is exact on one machine: the same command gives the same metrics, digit for digit. On another "
          "processor its last digits differ (other floating-point kernels), and another seed moves the metrics by the "
          "spread above; quote the mean ± sd over seeds, not one run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
