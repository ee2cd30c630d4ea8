"""The ``tensorboard`` logger: TensorBoard event files written with torch's ``SummaryWriter``.

What it writes, under ``log_dir`` (default ``RUN/tensorboard``):

* scalars ``STAGE/KEY`` for every number of every epoch's metrics.jsonl row (``train/train/loss``,
  ``train/val/macro_f1``, ``train/lr``), at the optimisation-step count over all stages;
* scalars ``STAGE/METRIC``, ``STAGE/METRIC/low`` and ``STAGE/METRIC/high`` for each finished stage's
  results and their 95% intervals (``test/macro_f1``), at the last step;
* text: the resolved recipe (``recipe``, once) and, at the end, ``report.md``, ``results.json``,
  ``MODEL_CARD.md`` and ``recipe.yaml`` (``artifacts/NAME``); images: ``curves.png``.

A resumed run writes a new event file in the same folder. Its first event is a session start at
the first step it writes (``purge_step``), so TensorBoard hides whatever the interrupted run had
written from that step on: a step logged again after a resume (an extended run redoing a stage)
is never shown twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from corex.errors import CorexError
from corex.progress import log

from corex_track.common import local_path, make_folder, number, params_table, require, result_scalars, steps_so_far

DEFAULT_DIR = "tensorboard"
TEXT_SUFFIXES = (".md", ".json", ".yaml", ".yml", ".txt", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEXT_LIMIT = 256 * 1024  # larger text files are left to the run directory


class TensorBoardLogger:
    """Writes TensorBoard event files for one run (see the module's docstring)."""

    def __init__(self, *, run_dir: Path, log_dir: Path | None = None):
        require("tensorboard", "tensorboard", "tensorboard")
        self.run_dir = Path(run_dir)
        self.log_dir = local_path(DEFAULT_DIR if log_dir is None else log_dir, self.run_dir)
        self.resumed = False
        self.step = 0
        self._writer: Any = None

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"log_dir": str(self.log_dir)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue in the folder the run started in, when it is still there (a run directory moved
        elsewhere takes its default folder with it: the configured one is then the same folder)."""
        saved = state.get("log_dir")
        if saved and Path(saved).is_dir():
            self.log_dir = Path(saved)

    # -- the run -------------------------------------------------------------------------------
    def start(self, params: Mapping[str, Any], resumed: bool) -> None:
        make_folder(self.log_dir, "loggers: tensorboard log_dir")
        self.resumed = resumed
        if resumed:
            # Opened at the first write, with a purge step there; results alone go at the last step.
            self.step = steps_so_far(self.run_dir)
            return
        if any(self.log_dir.glob("events.out.tfevents.*")):
            log(f"loggers: '{self.log_dir}' already holds TensorBoard event files; TensorBoard shows them and this run's as one run")
        writer = self._open()
        writer.add_text("recipe", params_table(params), 0)
        writer.flush()

    def _open(self, purge_step: int | None = None) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
            except OSError as exc:
                raise CorexError(f"loggers: tensorboard cannot write in '{self.log_dir}': {exc.strerror or exc}") from exc
        return self._writer

    def log_metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        writer = self._open(purge_step=step if self.resumed else None)
        for key, value in metrics.items():
            if (value := number(value)) is not None:
                writer.add_scalar(f"{stage}/{key}", value, step)
        self.step = step
        writer.flush()

    def log_results(self, stage: str, result: Mapping[str, Any]) -> None:
        writer = self._open()
        for tag, value in result_scalars(stage, result).items():
            writer.add_scalar(tag, value, self.step)
        writer.flush()

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES and path.stat().st_size <= TEXT_LIMIT:
            text = path.read_text(errors="replace")
            if suffix != ".md":  # shown as a block of code, not as Markdown
                text = "\n".join("    " + line for line in text.splitlines())
            self._open().add_text(f"artifacts/{path.name}", text, self.step)
        elif suffix in IMAGE_SUFFIXES:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._open().add_image(f"artifacts/{path.name}", pixels, self.step, dataformats="HWC")
        else:
            return  # report.html and other files stay in the run directory
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger(log_dir={str(self.log_dir)!r})"


__all__ = ["TensorBoardLogger"]
