"""What both loggers share: the install hint, local paths, the step on resume, results as scalars."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from corex.errors import CorexError
from corex.rundir import MetricsLog

INSTALL = 'pip install "corex-cxr[tracking]"'


def require(module: str, logger: str, package: str) -> None:
    """A CorexError naming what to install unless ``module`` can be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or a module set to None
        found = False
    if not found:
        raise CorexError(f"the '{logger}' logger needs the {package} package, which is not installed: {INSTALL}")


def local_path(path: str | Path, run_dir: Path) -> Path:
    """``path`` with ``~`` expanded, a relative one taken from the run directory, made absolute."""
    path = Path(path).expanduser()
    return (path if path.is_absolute() else Path(run_dir) / path).absolute()


def make_folder(path: Path, what: str) -> None:
    """Create ``path`` (and its parents), or a CorexError saying why it cannot be."""
    if path.exists() and not path.is_dir():
        raise CorexError(f"{what}: '{path}' is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CorexError(f"{what}: cannot create '{path}': {exc.strerror or exc}") from exc


def steps_so_far(run_dir: Path) -> int:
    """Optimisation steps over all stages in the run's ``metrics.jsonl`` (the step the engine counts)."""
    return sum(int(row.get("steps", 0) or 0) for row in MetricsLog(Path(run_dir) / "metrics.jsonl").rows())


def number(value: Any) -> float | None:
    """``value`` as a float when it is a number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def result_scalars(stage: str, result: Mapping[str, Any]) -> dict[str, float]:
    """A stage's results.json entry as ``{STAGE/metric: value, STAGE/metric/low: ..., STAGE/metric/high: ...}``."""
    out: dict[str, float] = {}
    for name, value in (result.get("metrics") or {}).items():
        if (value := number(value)) is not None:
            out[f"{stage}/{name}"] = value
    for name, bounds in (result.get("intervals") or {}).items():
        if isinstance(bounds, (list, tuple)) and len(bounds) == 2:
            for side, bound in zip(("low", "high"), bounds):
                if (bound := number(bound)) is not None:
                    out[f"{stage}/{name}/{side}"] = bound
    return out


def params_table(params: Mapping[str, Any]) -> str:
    """The flattened recipe as a Markdown table (TensorBoard's text tab renders it)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    rows = ["| key | value |", "|---|---|"] + [f"| {cell(key)} | {cell(value)} |" for key, value in params.items()]
    return "\n".join(rows)


__all__ = ["INSTALL", "local_path", "make_folder", "number", "params_table", "require", "result_scalars", "steps_so_far"]
