"""One progress reporter for all long work: training, evaluation, decoding, prediction, studies.

On a terminal it draws a live bar with an ETA; on anything else (a log file, a cluster job) it
prints one plain line every ``interval`` seconds, or every ``every`` steps, and never a carriage
return. The mode comes from ``--progress auto|bar|lines|off`` (or ``COREX_PROGRESS``)::

    from corex.progress import progress

    with progress(len(files), "decode", unit="img") as bar:
        for path in files:
            ...
            bar.update(1, skipped=n_skipped)

``note`` is a callable whose text is shown beside the bar (the engine shows the whole run's ETA).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

MODES = ("auto", "bar", "lines", "off")
_settings: dict[str, Any] = {"mode": None, "interval": None, "every": None}


def set_mode(mode: str | None = None, *, interval: float | None = None, every: int | None = None) -> None:
    """Choose how progress is shown from now on (the CLI's ``--progress``)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode '{mode}' is not one of {', '.join(MODES)}")
    _settings.update(mode=mode, interval=interval, every=every)


def current_mode(stream: IO[str] | None = None) -> str:
    """``bar``, ``lines`` or ``off``: what ``auto`` means for ``stream`` (default stderr)."""
    mode = _settings["mode"] or os.environ.get("COREX_PROGRESS", "auto")
    if mode not in MODES:
        mode = "auto"
    if mode == "auto":
        stream = stream or sys.stderr
        return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
    return mode


def _interval() -> float:
    value = _settings["interval"] if _settings["interval"] is not None else os.environ.get("COREX_PROGRESS_INTERVAL", 10)
    return max(0.0, float(value))


def _every() -> int | None:
    value = _settings["every"] if _settings["every"] is not None else os.environ.get("COREX_PROGRESS_EVERY")
    return int(value) if value not in (None, "", 0, "0") else None


def log(message: str) -> None:
    """A line on stderr. Under torch.distributed (torchrun sets ``RANK`` and ``WORLD_SIZE``) only rank 0
    speaks, and says so."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return
        message = f"[rank 0/{world}] {message}"
    print(message, file=sys.stderr, flush=True)


def format_duration(seconds: float | None) -> str:
    """``1:02:03`` or ``2:03``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_value(value: Any) -> str:
    """Integers as integers, other numbers with four significant digits."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _plural(unit: str) -> str:
    if unit.endswith("y"):
        return unit[:-1] + "ies"
    return unit + ("es" if unit.endswith(("s", "ch", "sh", "x")) else "s")


class Progress:
    """A bar or a stream of plain lines for ``total`` steps (``total`` may be unknown: None)."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "step", stream: IO[str] | None = None,
                 note: Callable[[], str] | None = None, mode: str | None = None):
        self.total, self.desc, self.unit, self.note = total, desc, unit, note
        self.stream = stream or sys.stderr
        self.mode = mode or current_mode(self.stream)
        self.done = 0
        self.values: dict[str, Any] = {}
        self.started = self._last_line = time.perf_counter()
        self._last_line_step = 0
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(finished=exc[0] is None)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.total is None or self.rate <= 0:
            return None
        return max(0, self.total - self.done) / self.rate

    def update(self, n: int = 1, /, **values: Any) -> None:
        self.done += n
        self.values.update(values)
        if self._bar is not None:
            self._bar.update(n)
            postfix = {k: format_value(v) for k, v in self.values.items()}
            if self.note is not None:
                postfix["run"] = self.note()
            self._bar.set_postfix(postfix, refresh=False)
        elif self.mode == "lines":
            now = time.perf_counter()
            every = _every()
            due = (every is not None and self.done - self._last_line_step >= every) or (every is None and now - self._last_line >= _interval())
            if due:
                self._line()

    def set_values(self, **values: Any) -> None:
        self.values.update(values)

    def _line(self) -> None:
        self._last_line, self._last_line_step = time.perf_counter(), self.done
        print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """The plain progress line: ``train 1/3: 40/120 steps (33%)  212 img/s  eta 0:31  loss 0.41``."""
        if self.total:
            count = f"{self.done}/{self.total} {_plural(self.unit)} ({100 * self.done / self.total:.0f}%)"
        else:
            count = f"{self.done} {_plural(self.unit)}"
        parts = [f"{self.desc}: {count}", f"{self.rate:.1f} {self.unit}/s"]
        if self.total:
            parts.append(f"eta {format_duration(self.eta)}")
        parts += [f"{k} {format_value(v)}" for k, v in self.values.items()]
        if self.note is not None:
            parts.append(self.note())
        return "  ".join(parts)

    def close(self, finished: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and finished and self.done != self._last_line_step and self.done > 0:
            self._line()  # the last state, so a log always shows where the work ended
        self.mode = "off"


def progress(total: int | None, desc: str, *, unit: str = "step", stream: IO[str] | None = None,
             note: Callable[[], str] | None = None) -> Progress:
    """A :class:`Progress` in the mode chosen by ``--progress`` / ``COREX_PROGRESS``."""
    return Progress(total, desc, unit=unit, stream=stream, note=note)


__all__ = ["MODES", "Progress", "current_mode", "format_duration", "format_value", "log", "progress", "set_mode"]
