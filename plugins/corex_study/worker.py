"""One run of a study in its own process: ``python -m corex_study.worker SPEC.json STATUS.json``.

Started by :class:`corex_study.executors.LocalProcesses` with the torch threads and GPU it may use in
its environment; writes ``{"status": "done" | "busy" | "failed", ...}`` to STATUS.json (atomically) and
the engine's output to the run's log.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from corex_study.executors import run_spec, write_status

    spec_file, status_file = map(Path, argv)
    result = run_spec(json.loads(spec_file.read_text()))
    result.pop("results", None)  # the parent reads results.json itself
    write_status(status_file, result)
    return 0 if result.get("status") != "failed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
