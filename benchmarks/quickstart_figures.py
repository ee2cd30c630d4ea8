"""The quickstart's published figures, measured: run the README's quickstart and print them.

    python benchmarks/quickstart_figures.py [--out runs/quickstart-figures] [--keep-cache]

Runs `corex run recipes/quickstart.yaml` as a user would (a fresh process, by default an empty
cache, so the phantom is written and decoded as on a fresh clone), times it, and prints Markdown:
the machine, the wall time, the training speed and the test metrics with their 95% intervals; the
run's terminal output (progress as plain lines) is kept in OUT/terminal.txt.
docs/quickstart.md and the README quote this output; re-run it when the code they describe changes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ("macro_f1", "accuracy", "balanced_accuracy", "auroc", "study_map", "ece", "ece/calibrated", "dice", "dice/positive", "pointing_game")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "corex-quickstart-figures")
    parser.add_argument("--keep-cache", action="store_true", help="reuse ~/.cache/corex instead of an empty cache")
    args = parser.parse_args()
    env = dict(os.environ, COREX_PROGRESS="lines", COREX_PROGRESS_INTERVAL="10")
    cache = None
    if not args.keep_cache:
        cache = Path(tempfile.mkdtemp(prefix="corex-cache-"))
        env["COREX_CACHE"] = str(cache)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "corex.cli", "run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(args.out), "--overwrite"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0:
        sys.exit(f"the quickstart failed ({done.returncode}):\n{done.stderr[-3000:]}")
    # What a user sees (as in a log: progress as plain lines), kept beside the run.
    (args.out / "terminal.txt").write_text(f"$ corex run recipes/quickstart.yaml\n{done.stderr}{done.stdout}")
    results = json.loads((args.out / "results.json").read_text())
    rows = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines()]
    test = results["stages"]["test"]
    metrics, intervals = test["metrics"], test.get("intervals", {})
    speeds = sorted(r["images_per_s"] for r in rows)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
          f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after; cache {'reused' if args.keep_cache else 'empty'}\n")
    print(f"Wall time of `corex run recipes/quickstart.yaml`: {wall:.0f} s; training {results['stages']['train']['time_s']:.0f} s "
          f"for {len(rows)} epochs at {speeds[0]:.0f}-{speeds[-1]:.0f} images/s; best epoch {results['stages']['train']['best_epoch']}\n")
    print(f"Test split: {int(metrics['n']) if 'n' in metrics else '?'} studies\n")
    print("| metric | value | 95% bootstrap interval |\n|---|---|---|")
    for key in HEADLINE:
        if key in metrics and metrics[key] is not None:
            low, high = intervals.get(key, (None, None))
            shown = f"[{low:.3f}, {high:.3f}]" if low is not None else ""
            print(f"| {key} | {metrics[key]:.3f} | {shown} |")
    per_class = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("f1/")}
    print("\nPer-class F1: " + ", ".join(f"{name} {value:.3f}" for name, value in per_class.items()))


if __name__ == "__main__":
    main()
