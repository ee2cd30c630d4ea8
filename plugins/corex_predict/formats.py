"""File formats: which kind of model file a path is, and whether this corex can read its metadata.

Every corex file names its metadata format as ``"<name>/<version>"`` (``corex-model/1``,
``corex-input-gate/1``). A file of a format this corex does not know, or of a newer version of one
it knows, is refused with both versions named, before anything in it is used.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

from corex import __version__
from corex.errors import CorexError

MODEL_FORMAT = "corex-model/1"
KINDS = ("pt", "onnx", "torchscript")
SUFFIXES = {".pt": "pt", ".pth": "pt", ".onnx": "onnx", ".ts": "torchscript", ".torchscript": "torchscript", ".jit": "torchscript"}
META_NAME = "corex"  # ONNX metadata_props key, and TorchScript extra file "corex.json"
TS_EXTRA = "corex.json"


def parse_format(value: Any) -> tuple[str, int] | None:
    """``"corex-model/1"`` to ``("corex-model", 1)``; ``None`` for anything else."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)/(\d+)\s*", value) if isinstance(value, str) else None
    return (match.group(1), int(match.group(2))) if match else None


def check_format(found: Any, expected: str, where: str, written_by: Any = None) -> None:
    """Refuse ``found`` unless it is ``expected`` (or an older version of it), naming both versions."""
    want = parse_format(expected)
    assert want is not None
    got = parse_format(found)
    by = f" (written by corex {written_by})" if isinstance(written_by, str) and written_by else ""
    if got is not None and got[0] == want[0] and got[1] <= want[1]:
        return
    if got is not None and got[0] == want[0]:
        raise CorexError(f"{where}: its format is {found!r}{by}, but this corex ({__version__}) reads {expected!r} and older: "
                         "the file is newer than this corex; upgrade corex to use it")
    shown = repr(found) if found is not None else "missing"
    raise CorexError(f"{where}: its format {shown}{by} is not one this corex {__version__} knows (it reads {expected!r}); "
                     "it was not written by `corex export`, or by a corex that writes another format")


def infer_kind(path: Path, requested: str | None = None) -> str:
    """``pt``, ``onnx`` or ``torchscript``: ``requested`` (``--format``), else from the suffix."""
    if requested is not None:
        if requested not in KINDS:
            raise CorexError(f"--format must be one of {', '.join(KINDS)}, got {requested!r}")
        return requested
    kind = SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise CorexError(f"export: cannot tell the format from '{path}' (suffix {Path(path).suffix or 'none'}); "
                         "name it .pt, .onnx or .ts, or pass --format pt|onnx|torchscript")
    return kind


def file_kind(path: Path) -> str:
    """What a model file is, by its content where that tells (a TorchScript archive holds ``code/``;
    an ONNX file is a protobuf), else by its suffix: ``pt``, ``onnx`` or ``torchscript``."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            names = []
        if any("/code/" in name or name.endswith(f"extra/{TS_EXTRA}") for name in names):
            return "torchscript"
        return "pt"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    return SUFFIXES.get(path.suffix.lower(), "pt")


__all__ = ["KINDS", "MODEL_FORMAT", "check_format", "file_kind", "infer_kind", "parse_format"]
