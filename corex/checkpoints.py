"""Reading checkpoints and weight files safely, with messages that say what is wrong with a file.

Everything corex writes holds only tensors and plain values, so every load uses
``weights_only=True``: a file carrying a pickled Python object is refused before anything in it
runs. Writing goes through :func:`corex.rundir.save_torch` (atomic, full-disk aware).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from corex.errors import CorexError


def load_file(path: Path, where: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; every failure becomes a message naming ``path``."""
    path = Path(path)
    if not path.exists():
        raise CorexError(f"{where}: '{path}' does not exist")
    if path.is_dir():
        raise CorexError(f"{where}: '{path}' is a folder, not a weights file")
    if path.stat().st_size == 0:
        raise CorexError(f"{where}: '{path}' is empty (0 bytes): it was never completely written")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise CorexError(
                f"{where}: '{path}' holds pickled Python objects, and corex refused to load it: unpickling can run "
                "arbitrary code. corex's own files hold only tensors and plain values, so this file was not written "
                "by corex (or was changed since). Use only files whose origin you trust and that corex wrote."
            ) from None
        raise CorexError(f"{where}: '{path}' is damaged or not a torch file ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 -- on a file that is not torch's, torch.load raises whatever its parser hits
        # (RuntimeError, EOFError, KeyError, IndexError ...): the file is the problem, not corex.
        raise CorexError(f"{where}: '{path}' is damaged or not a torch file: it may have been cut short ({_first_line(exc)})") from None


def load_checkpoint(path: Path, where: str, required: Iterable[str] = ("model",), map_location: Any = "cpu") -> dict[str, Any]:
    """A corex checkpoint: a mapping with at least the ``required`` keys."""
    payload = load_file(path, where, map_location)
    if not isinstance(payload, Mapping):
        raise CorexError(f"{where}: '{path}' holds a {type(payload).__name__}, not a corex checkpoint")
    missing = [key for key in required if key not in payload]
    if missing:
        raise CorexError(f"{where}: '{path}' is not a corex checkpoint of this kind (it lacks {', '.join(missing)})")
    if "model" in payload and not _is_state_dict(payload["model"]):
        raise CorexError(f"{where}: '{path}' has a 'model' entry that is not a state dict of tensors")
    return dict(payload)


def load_state(module: torch.nn.Module, state: Mapping[str, Any], path: Path, where: str) -> None:
    """``module.load_state_dict(state)`` (strict), or a message saying the file is another model's."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        detail = _first_line(exc)
        raise CorexError(
            f"{where}: '{path}' does not fit this recipe's model ({detail[:300]}); it was written by another recipe "
            "or another version of a plugin"
        ) from None


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _first_line(exc: BaseException) -> str:
    """The gist of a torch error: its first sentence (torch appends paragraphs of advice)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    cut = first.find(". ")
    return (first[:cut] if 0 < cut < 160 else first[:160]).rstrip(".")


__all__ = ["load_checkpoint", "load_file", "load_state"]
