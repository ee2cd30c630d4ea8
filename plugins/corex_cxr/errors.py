"""The one exception corex_cxr raises for bad data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corex.errors import CorexError


class DataError(CorexError, ValueError):
    """An unusable file or CSV row: ``str(error)`` is ``"<path>: <reason>"``.

    A :class:`corex.errors.CorexError`, so the command line prints it as a message (exit code 2)
    wherever it is raised: building the source, ``corex data prepare`` or the first batch of a
    run. Still a ``ValueError`` for code that catches that.
    ``problems`` lists every ``{"path", "reason"}`` it stands for: one, or all of them for
    an error from :meth:`collected`.
    """

    def __init__(self, path: Path | str, reason: str, problems: list[dict[str, Any]] | None = None):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason
        self.problems = problems if problems is not None else [{"path": self.path, "reason": reason}]

    @classmethod
    def collected(cls, where: Path | str, problems: list[dict[str, Any]]) -> DataError:
        """One error listing every problem found in a data set, one per line."""
        lines = "".join(f"\n  {problem['path']}: {problem['reason']}" for problem in problems)
        reason = f"{len(problems)} unusable sample(s); fix them or set on_bad_sample: skip{lines}"
        return cls(where, reason, problems)
