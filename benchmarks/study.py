"""The phantom study: `corex study` over the six recipes/phantom arms (a thin caller, kept for old links).

    python benchmarks/study.py --seeds 0 1 2 3 4 --label-fractions 1.0 0.1 --out runs/study

is the same as

    corex study recipes/phantom/*.yaml --seeds 0 1 2 3 4 --label-fractions 1.0 0.1 --out runs/study

Every other option of `corex study` passes through (see `corex study --help` and docs/study.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from corex.cli import main

PHANTOM = Path(__file__).resolve().parents[1] / "recipes" / "phantom"

if __name__ == "__main__":
    sys.exit(main(["study", *map(str, sorted(PHANTOM.glob("*.yaml"))), *sys.argv[1:]]))
