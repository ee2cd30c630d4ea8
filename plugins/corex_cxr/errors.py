"""The one exception corex_cxr raises for bad data, and file names as text that any file takes."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from corex.errors import CorexError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(path: Path | str | bytes) -> str:
    r"""A file name as text that every reader and writer takes (JSON, CSV, a terminal, a log).

    A name that is not valid UTF-8 (an old scanner's Latin-1 ``b"scan\xff.png"``) reaches Python as a
    ``str`` holding lone surrogates (``os.fsdecode``'s surrogateescape), which UTF-8 files refuse; its
    bytes that are not UTF-8, and control characters, are shown as ``\xNN`` escapes here (the text
    ``scan\xff.png``, with a backslash). A valid name is returned unchanged. The result names the
    file for people, image ids and cache keys; open the file with its own ``Path``.
    """
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def printable_problems(problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{"path", "reason"}`` problems with their paths in :func:`printable` form (for skipped.json)."""
    return [{**problem, "path": printable(problem["path"])} if "path" in problem else problem for problem in problems]


class DataError(CorexError, ValueError):
    """An unusable file or CSV row: ``str(error)`` is ``"<path>: <reason>"``.

    A :class:`corex.errors.CorexError`, so the command line prints it as a message (exit code 2)
    wherever it is raised: building the source, ``corex data prepare`` or the first batch of a
    run. Still a ``ValueError`` for code that catches that.
    ``problems`` lists every ``{"path", "reason"}`` it stands for: one, or all of them for
    an error from :meth:`collected`.
    """

    def __init__(self, path: Path | str, reason: str, problems: list[dict[str, Any]] | None = None):
        self.path, self.reason = printable(path), reason
        super().__init__(f"{self.path}: {reason}")
        self.problems = printable_problems(problems) if problems is not None else [{"path": self.path, "reason": reason}]

    @classmethod
    def collected(cls, where: Path | str, problems: list[dict[str, Any]]) -> DataError:
        """One error listing every problem found in a data set, one per line."""
        problems = printable_problems(problems)
        lines = "".join(f"\n  {problem['path']}: {problem['reason']}" for problem in problems)
        reason = f"{len(problems)} unusable sample(s); fix them or set on_bad_sample: skip{lines}"
        return cls(where, reason, problems)
