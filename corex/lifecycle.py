"""A run directory's lifecycle: new, resumed, extended or overwritten, by one process at a time.

:class:`RunDirectory` locks the folder (an OS lock the kernel releases when the process dies),
decides what is left to do from what the folder holds, refuses a changed recipe unless only a
stage's epochs grew (then that stage and the later ones are redone), and writes the files that
describe the run: recipe.yaml, plugins.json, provenance.json and the folder's README.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from corex import rundir
from corex.build import DEFAULT_CACHE
from corex.errors import CorexError, RecipeError
from corex.plugins import Registry, describe_plugins
from corex.progress import log
from corex.schema import Recipe

# Flag names in messages: the command line's, or the Python API's keyword arguments.
CLI_FLAGS = {"out": "--out", "resume": "--resume", "overwrite": "--overwrite"}
API_FLAGS = {"out": "out", "resume": "resume=True", "overwrite": "overwrite=True"}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, for naming the keys in which two recipes differ."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def recipe_differences(before: Recipe, after: Recipe) -> list[tuple[str, Any, Any]]:
    """``(key, before, after)`` for every resolved value that differs."""
    old, new = flatten(before.resolved(DEFAULT_CACHE)), flatten(after.resolved(DEFAULT_CACHE))
    missing = object()
    return [(key, old.get(key, missing), new.get(key, missing)) for key in sorted(set(old) | set(new))
            if old.get(key, missing) != new.get(key, missing)]


def resolved_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.resolved(DEFAULT_CACHE), sort_keys=False)


class RunDirectory:
    """The folder ``out`` of one run: locked while the run uses it. ``resume`` continues the run it
    holds (a finished stage is not redone; a stage whose ``epochs`` grew is extended); ``overwrite``
    deletes what it holds and starts afresh."""

    def __init__(self, recipe: Recipe, out: Path, *, resume: bool, overwrite: bool, registry: Registry, device: str,
                 flags: Mapping[str, str] = API_FLAGS):
        if resume and overwrite:
            raise CorexError(f"{flags['resume']} and {flags['overwrite']} contradict each other: choose one")
        self.recipe, self.out = recipe, Path(out)
        self.resume, self.overwrite, self.flags = resume, overwrite, dict(flags)
        self.registry, self.pm, self.device = registry, registry.pm, device
        self.lock = rundir.RunLock(self.out)
        self.results: dict[str, Any] = {"recipe": recipe.name, "stages": {}}
        self.status = "new"  # new | resumed | complete | extended
        self.created = False  # whether this run made the folder
        self.started_new = False  # whether this process locked the folder and began a new run in it (what discard may undo)

    def close(self) -> None:
        self.lock.release()

    def discard(self) -> None:
        """Undo a new run that failed before its first stage started (a wrong data.root, a plugin that
        broke at build time): nothing it wrote may block the corrected command. Call before ``close``."""
        # Only what this process began: a run refused (folder in use, or holding another run) touches nothing.
        if not self.started_new or self.status != "new" or not self.out.is_dir():
            return
        for path in self.out.iterdir():
            if path.name != rundir.RunLock.NAME:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        self.lock.release()
        (self.out / rundir.RunLock.NAME).unlink(missing_ok=True)
        if self.created:
            with contextlib.suppress(OSError):
                self.out.rmdir()

    def open(self) -> None:
        """Create or reopen ``out``, lock it, and decide what is left to do."""
        out, flags = self.out, self.flags
        where = flags["out"]
        try:
            if out.exists() and not out.is_dir():
                raise CorexError(f"{where}: '{out}' is a file, not a folder")
            self.created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except OSError as exc:
            raise CorexError(f"{where}: cannot use '{out}' as a run directory: {exc.strerror or exc}") from exc
        try:
            self._decide(out)
        except BaseException:
            self.lock.release()
            raise

    def _decide(self, out: Path) -> None:
        flags = self.flags
        saved = out / "recipe.yaml"
        existing = [p for p in out.iterdir() if p.name != rundir.RunLock.NAME]
        if self.overwrite and existing:
            for path in existing:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            log(f"corex: {flags['overwrite']}: deleted the earlier run in '{out}'")
            existing = []
        if not self.resume:
            if existing:
                raise CorexError(
                    f"{flags['out']}: '{out}' already holds files; pass {flags['resume']} to continue that run, "
                    f"{flags['overwrite']} to delete it and start afresh, or choose another folder"
                )
            log(f"corex: new run of '{self.recipe.name}' in {out}")
            self.started_new = True
            self._write_run_files()
            return
        if not saved.exists():
            raise CorexError(f"{flags['resume']}: '{out}' holds no run to resume (no recipe.yaml); drop {flags['resume']} to start one")
        stale = rundir.remove_temporaries(out)
        if stale:
            log(f"corex: removed {len(stale)} temporary file(s) left by an interrupted write")
        from corex.recipe import load_recipe

        try:
            previous = load_recipe(saved, registry=self.registry)
        except RecipeError as exc:
            raise CorexError(f"{flags['resume']}: the run's own recipe {saved} no longer loads:\n{exc}") from None
        if (out / "results.json").exists():
            try:
                self.results = rundir.read_json(out / "results.json")
            except (ValueError, OSError) as exc:
                raise CorexError(f"{flags['resume']}: '{out / 'results.json'}' is damaged ({exc}); start afresh with {flags['overwrite']}") from None
        differences = recipe_differences(previous, self.recipe)
        if differences:
            self._extend(differences, saved)
        self._write_provenance(resumed=True)
        self._announce_resume()

    def _extend(self, differences: list[tuple[str, Any, Any]], saved: Path) -> None:
        """Accept a changed recipe only when training stages grew longer; refuse anything else."""
        grown = {}
        for key, before, after in differences:
            parts = key.split(".")
            if (len(parts) == 3 and parts[0] == "stages" and parts[2] == "epochs" and isinstance(before, int)
                    and isinstance(after, int) and after > before and self.recipe.stages[parts[1]].kind != "evaluate"):
                grown[parts[1]] = (before, after)
            else:
                grown = None
                break
        if grown is None:
            def shown(value: Any) -> str:
                return "(absent)" if not isinstance(value, (str, int, float, bool, list, type(None))) else json.dumps(value, default=str)

            lines = "\n".join(f"  {key}: {shown(before)} in the run, {shown(after)} now" for key, before, after in differences)
            raise CorexError(
                f"{self.flags['resume']}: the recipe differs from the one the run in '{self.out}' started with:\n{lines}\n"
                f"Resume with the same recipe and --set values, start afresh with {self.flags['overwrite']}, or use another "
                f"{self.flags['out']}. (Only a longer stages.NAME.epochs can extend a run.)"
            )
        # The grown stage and every later one are redone from the grown stage's last checkpoint.
        names = list(self.recipe.stages)
        first = min(names.index(name) for name in grown)
        for name in names[first:]:
            self.results["stages"].pop(name, None)
            if name not in grown:
                shutil.rmtree(self.out / "checkpoints" / name, ignore_errors=True)
        rundir.atomic_write_text(saved, resolved_yaml(self.recipe))
        rundir.write_json(self.out / "results.json", self.results)
        for name, (before, after) in grown.items():
            log(f"corex: extending stage '{name}' from {before} to {after} epochs (the learning-rate schedule is re-planned "
                f"for {after} epochs from epoch {before + 1} on); later stages are redone")
        self.status = "extended"

    def _write_run_files(self) -> None:
        out = self.out
        rundir.atomic_write_text(out / "recipe.yaml", resolved_yaml(self.recipe))
        rundir.write_json(out / "plugins.json", describe_plugins(self.pm))
        recipe_path = self.recipe.source or "RECIPE"
        rundir.atomic_write_text(out / "README.md", rundir.RUN_README.format(name=self.recipe.name, recipe=recipe_path, out=out))
        self._write_provenance(resumed=False)

    def _write_provenance(self, resumed: bool) -> None:
        path = self.out / "provenance.json"
        record = rundir.provenance(str(self.device), self.recipe.source)
        history = rundir.read_json(path) if resumed and path.exists() else {}
        if resumed:
            history.setdefault("resumed", []).append(record)
        else:
            history = {"started": record}
        rundir.write_json(path, history)

    def _announce_resume(self) -> None:
        done = self.results.get("stages", {})
        remaining = [name for name in self.recipe.stages if name not in done]
        if not remaining:
            self.status = "complete"
            log(f"corex: the run in '{self.out}' is already complete (stages {', '.join(done)}); nothing to do. "
                f"Use {self.flags['overwrite']} to start afresh, or --set stages.NAME.epochs=N with {self.flags['resume']} to extend it")
            return
        stage = remaining[0]
        if self.status != "extended":
            self.status = "resumed"
        where = self._checkpoint_position(self.out / "checkpoints" / stage / "last.pt")
        if where is None:
            log(f"corex: resuming '{self.out}' at the start of stage '{stage}'" + (f" (finished: {', '.join(done)})" if done else ""))
            return
        epoch, step = where
        spec = self.recipe.stages[stage]
        total = f"of {spec.epochs}" if spec.steps is None else f"(a budget of {spec.steps} steps)"
        at = f"in epoch {epoch + 1} {total} after step {step}" if step else f"after epoch {epoch} {total}"
        log(f"corex: resuming '{self.out}' at stage '{stage}' {at}")

    @staticmethod
    def _checkpoint_position(path: Path) -> tuple[int, int] | None:
        """(epochs done, step within the next) of a ``last.pt``, read lazily; None if unreadable (the
        restore then says why)."""
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            within = state.get("within") or {}
            return int(state["epoch"]), int(within.get("step", 0))
        except Exception:  # a damaged file: the restore names the problem
            return None


__all__ = ["API_FLAGS", "CLI_FLAGS", "RunDirectory", "recipe_differences", "resolved_yaml"]
