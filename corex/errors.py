"""Errors the command line prints as a message (exit code 2) instead of a traceback.

:class:`CorexError` is THE exception a plugin raises for a mistake of the user or of the data (a
bad option value, an unreadable file, a missing path): the command line prints its message and
exits with code 2, without a traceback. Subclass it for your own kinds (``corex_cxr.DataError``
does). Anything else escaping a plugin is treated as a bug and keeps its traceback; a
``ValueError`` (or ``TypeError``) raised by a factory while corex builds a component is reported
as a problem at that component's recipe path.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CorexError(Exception):
    """A problem the user can fix: bad recipe, bad data, a plugin conflict.

    The message should name what is wrong and where (a recipe path, a file), and say how to fix it.
    """


class RunFailure(CorexError):
    """A run that started well and could not go on: a full disk, a diverging loss.

    Printed as a message like every CorexError, but the command line exits with code 1.
    """

    exit_code = 1


class PluginError(CorexError):
    """Plugins that cannot be loaded or that contradict each other."""


class RecipeError(CorexError):
    """Every problem found in a recipe, each prefixed with its recipe path."""

    def __init__(self, problems: Iterable[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''}{where}:"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.7)
    return f"; did you mean '{close[0]}'?" if close else ""


__all__ = ["CorexError", "PluginError", "RecipeError", "RunFailure", "did_you_mean"]
