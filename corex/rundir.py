"""The run directory: atomic writes, the metrics log, curves and a README for humans."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from corex.errors import CorexError, RunFailure

RUN_README = """\
# corex run: {name}

Made by `corex run` from the recipe below (recipe.yaml holds it fully resolved).

| file | what it holds |
|---|---|
| recipe.yaml | the recipe as run: each stage's optimizer, schedule and batch size filled in, overrides applied |
| plugins.json | every plugin with its version and the components it provides |
| provenance.json | Python, torch, device, the command line and the recipe's git commit, at the start and at each resume |
| data.json | class names; images, studies and patients per split and class |
| skipped.json | samples left out under `on_bad_sample: skip` (only when there are some) |
| metrics.jsonl | one JSON line per epoch of every train/pretrain stage |
| results.json | the final metrics of every stage (best checkpoint for train stages), with 95% intervals |
| report.html, report.md | the deploy-readiness report: figures, tables and findings computed from the numbers |
| MODEL_CARD.md | the model card, written from the run's metadata and results: intended use, data, results, limitations |
| curves.png | training loss and validation metrics per epoch, the selected epoch marked |
| checkpoints/STAGE/ | last.pt (resume), best.pt (best validation), model.pt (what later stages start from) |
| STAGE/ | what a stage's evaluators and objective wrote: plots, tables, predictions |
| evaluations/ | later `corex evaluate` runs, each in a folder of its own |

Resume an interrupted run with `corex run {recipe} --out {out} --resume`; start it afresh with `--overwrite`.
Export the model with `corex export {out} model.pt` (see docs/predict.md).
"""


def _file_mode() -> int:
    """What ``open()`` would give a new file under the user's umask (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()
# Errors that mean "no room": a full disk, a quota, a file-size limit.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _write_failure(path: Path, exc: BaseException) -> CorexError | None:
    """A clear message for a write that failed for want of space or permission, else None."""
    codes = {getattr(e, "errno", None) for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    text = str(exc)
    # torch's writer reports a full disk as "[enforce fail at inline_container.cc] ... file write failed"
    # or "basic_ios::clear" with no errno, so look at the free space too.
    torch_writer = "inline_container" in text or "basic_ios" in text or "file write failed" in text
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    free_text = f" ({free / 2**20:.0f} MiB free there)" if free is not None else ""
    if codes & _NO_SPACE or (torch_writer and (free is None or free < 2**30)):
        return RunFailure(f"cannot write '{path}': no space left on the device{free_text}. Free some space, then continue with --resume")
    if torch_writer:
        return RunFailure(f"cannot write '{path}': the write failed{free_text} ({text.splitlines()[0][:200]})")
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
        return CorexError(f"cannot write '{path}': {getattr(exc, 'strerror', None) or exc}")
    return None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Every file corex or a plugin writes into a run directory goes through this, so a crash (or
    a reader) never sees half a checkpoint, table or plot::

        with atomic_path(out / "table.csv") as tmp:
            tmp.write_text(text)

    A full disk or a read-only place becomes a :class:`~corex.errors.CorexError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise _write_failure(path, exc) or CorexError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    temporary = Path(name)
    try:
        yield temporary
        with contextlib.suppress(OSError):
            os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as exc:
        failure = _write_failure(path, exc)
        if failure is None:
            raise
        raise failure from exc
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def remove_temporaries(root: Path) -> list[Path]:
    """Delete the temporary files that a killed process left (``.NAME.*.tmp``); return them."""
    found = [p for p in Path(root).rglob(".*.tmp") if p.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    return found


class RunLock:
    """An OS lock on a run directory: one process works in it at a time.

    ``flock`` is released by the kernel when the process dies, so a killed run never leaves a
    stale lock behind.
    """

    NAME = ".corex.lock"

    def __init__(self, out: Path):
        self.path = Path(out) / self.NAME
        self._handle = None

    def acquire(self) -> None:
        import fcntl

        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise CorexError(f"'{self.path.parent}' is in use by {holder}; wait for it to finish, or use another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"corex process {os.getpid()}")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the flock
            self._handle = None


# Environment variables that change what a run reads or loads (the cache, the plugins).
RUN_ENVIRONMENT = ("COREX_CACHE", "COREX_PLUGINS", "COREX_DISABLE_PLUGINS", "COREX_DISABLE_PLUGIN_AUTOLOAD", "KERAS_HOME")


def provenance(device: str, recipe_source: str | None) -> dict[str, Any]:
    """What made this run: versions, device, command line and the recipe's git commit."""
    import platform

    from corex import __version__

    info: dict[str, Any] = {
        "corex": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": device,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else [],
        "cwd": os.getcwd(),
        # What the run depends on beside its recipe: a resume must see the same.
        "environment": {k: v for k, v in sorted(os.environ.items()) if k in RUN_ENVIRONMENT},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    if recipe_source:
        info["recipe_git"] = _git_state(Path(recipe_source).resolve().parent)
    return info


def _git_state(folder: Path) -> dict[str, Any] | None:
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads as "not measurable"
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


class MetricsLog:
    """``metrics.jsonl``: appended once per epoch; rows after a resume point are dropped."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line torn by a kill mid-write
                if line.strip():
                    rows.append(json.loads(line))
        return rows

    def has(self, stage: str, epoch: int) -> bool:
        return any(r.get("stage") == stage and r.get("epoch") == epoch for r in self.rows())

    def append(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(_jsonable(row)) + "\n"
        try:
            with self.path.open("a") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise _write_failure(self.path, exc) or CorexError(f"cannot write '{self.path}': {exc.strerror or exc}") from exc

    def truncate(self, keep: Iterable[str], stage: str, last_epoch: int) -> None:
        """Keep the rows of finished stages ``keep`` and of ``stage`` up to ``last_epoch``."""
        keep = set(keep)
        rows = [
            r for r in self.rows()
            if r.get("stage") in keep or (r.get("stage") == stage and r.get("epoch", 0) <= last_epoch)
        ]
        atomic_write_text(self.path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))


def fault_point(point: str, stage: str, epoch: int | None = None) -> None:
    """Kill this process at a named point when ``COREX_FAULT_AT`` asks for it (fault tests only).

    ``COREX_FAULT_AT=after_checkpoint:train:2`` dies with SIGKILL right after stage ``train``
    wrote epoch 2's ``last.pt``, before its metrics row, as a power cut would.
    """
    wanted = os.environ.get("COREX_FAULT_AT")
    if wanted and wanted == f"{point}:{stage}" + (f":{epoch}" if epoch is not None else ""):
        import signal

        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["MetricsLog", "RUN_ENVIRONMENT", "RunLock", "atomic_path", "atomic_write_text", "fault_point", "provenance", "read_json", "remove_temporaries",
           "save_torch", "write_json"]
