"""The engine: one model, the recipe's stages in order, in one run directory.

The engine knows no architecture. It opens the run directory (:mod:`corex.lifecycle`), builds the
components the recipe names (:mod:`corex.build`), and runs each stage: ``train`` and ``pretrain``
stages in :mod:`corex.training`, ``evaluate`` stages in :mod:`corex.evaluation`. Every stage sees
the same model, so a ``train`` stage after a ``pretrain`` stage fine-tunes the pre-trained encoder.

Reproducibility: the seed fixes initialisation; each epoch's shuffling comes from a generator
seeded by (seed, stage, epoch) and the global RNG (augmentation, dropout) is saved with every
checkpoint, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corex import distributed, metrics, rundir
from corex.build import build_data, build_evaluators, build_stage_data, check_components
from corex.checks import blame, culprit_of, shown
from corex.curves import plot_curves
from corex.errors import CorexError
from corex.evaluation import evaluate_split, format_metric
from corex.interfaces import Preparable
from corex.lifecycle import API_FLAGS, CLI_FLAGS, RunDirectory
from corex.loaders import resolve_device, stage_plan, steps_per_epoch
from corex.plugins import Registry, get_plugin_manager
from corex.progress import log
from corex.schema import Recipe, Stage
from corex.seeding import seed_everything, tune_allocator
from corex.session import Session
from corex.tracking import attached_loggers
from corex.training import train_stage


def default_out(recipe: Recipe) -> Path:
    """Where a run goes without ``--out``: the recipe's ``output``, else ``runs/<name>``."""
    return Path(recipe.output) if recipe.output is not None else Path("runs") / recipe.name


def run(recipe: Recipe, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False, progress: bool | None = None,
        registry: Registry | None = None, flags: Mapping[str, str] = API_FLAGS) -> dict[str, Any]:
    """Run ``recipe`` into ``out`` (default: the recipe's ``output``, else ``runs/<name>``); returns results.json's content."""
    out = Path(out) if out is not None else default_out(recipe)
    runner = Runner(recipe, out, resume=resume, overwrite=overwrite, progress=progress, registry=registry or Registry(get_plugin_manager()), flags=flags)
    return runner.run()


class Runner:
    """Runs a recipe's stages into a run directory. ``corex run`` and :func:`corex.run` use it."""

    def __init__(self, recipe: Recipe, out: Path, *, resume: bool = False, overwrite: bool = False, progress: bool | None = None,
                 registry: Registry | None = None, flags: Mapping[str, str] = API_FLAGS):
        self.recipe, self.out = recipe, Path(out)
        self.registry = registry or Registry()
        self.quiet = progress is False
        self.launched = distributed.launched()
        self.device = distributed.setup(recipe.device) or resolve_device(recipe.device)
        self.directory = RunDirectory(recipe, self.out, resume=resume, overwrite=overwrite, registry=self.registry, device=str(self.device),
                                      flags=flags)
        self.session: Session | None = None
        self.started = False  # a stage has begun: from then on the run directory is kept, whatever happens

    @property
    def status(self) -> str:
        """new | resumed | complete | extended"""
        return self.directory.status

    def run(self) -> dict[str, Any]:
        tune_allocator()
        try:
            # Rank 0 alone opens (and locks) the run directory; the others learn what is done from it.
            distributed.main_first(lambda: self.directory.open() if distributed.is_main() else None)
            results = distributed.broadcast(self.directory.results)
            return self._run(results)
        except BaseException:
            if not self.started and distributed.is_main():
                self.directory.discard()
            raise
        finally:
            self.directory.close()
            if self.launched:
                distributed.teardown()

    def _run(self, results: dict[str, Any]) -> dict[str, Any]:
        recipe, registry = self.recipe, self.registry
        seed_everything(recipe.seed, recipe.deterministic)
        # Rank 0 first: a source may write files (the phantom, the cache) that the others then reuse.
        source = distributed.main_first(lambda: build_data(recipe, registry))
        stage_sources = distributed.main_first(lambda: build_stage_data(recipe, source, registry))
        # Rank 0 first here too: an objective's check reads its split's size, which may decode a cache.
        model = distributed.main_first(lambda: check_components(recipe, source, registry, stage_sources))
        session = self.session = Session(recipe, self.out, self.device, registry, model, source, stage_sources, results,
                                         resume=self.directory.resume, flags=self.directory.flags, quiet=self.quiet)
        self._place_model(session)
        distributed.main_first(lambda: write_data_report(session))
        announce_stages(session)
        with attached_loggers(session, resumed=self.directory.status != "new"):
            return self._stages(session, results)

    def _stages(self, session: Session, results: dict[str, Any]) -> dict[str, Any]:
        recipe = self.recipe
        if session.main:
            session.hook.corex_run_start(run=session.context)
        done = results["stages"]
        for stage in recipe.stages.values():
            if stage.name in done:  # finished before an interruption: take its final model
                if stage.kind != "evaluate":  # evaluation changes neither the model nor the RNG
                    self._take_finished_model(session, stage)
                continue
            started, self.started = time.perf_counter(), True
            if stage.kind == "evaluate":
                session.start_encoder(stage)
                result = distributed.broadcast(evaluate_stage(session, stage))  # every rank predicts its share; rank 0 scores
            else:
                result = train_stage(session, stage)
            result["time_s"] = round(time.perf_counter() - started, 3)
            done[stage.name] = result
            if session.main:
                rundir.fault_point("before_results", stage.name)
                rundir.write_json(self.out / "results.json", results)
                session.hook.corex_stage_end(run=session.context, stage=stage.name, results=result)
            distributed.barrier()
        if session.main:
            write_curves(session)
            session.hook.corex_run_end(run=session.context, results=results)
        return results

    def _place_model(self, session: Session) -> None:
        recipe = self.recipe
        if recipe.model.sync_batchnorm:
            if self.device.type != "cuda":
                raise CorexError(f"model.sync_batchnorm: torch's SyncBatchNorm runs only on CUDA devices, and this run is on "
                                 f"{self.device.type}; drop it (batch norm then sees each process's share of the batch)")
            if session.world > 1:
                session.model = nn.SyncBatchNorm.convert_sync_batchnorm(session.model)
        session.model.to(self.device)
        if recipe.model.channels_last:
            session.model.to(memory_format=torch.channels_last)
        if session.rank:  # the same initial model everywhere, but each rank its own augmentation draws
            seed_everything(recipe.seed + 7919 * session.rank, recipe.deterministic)

    def _take_finished_model(self, session: Session, stage: Stage) -> None:
        path = self.out / "checkpoints" / stage.name / "model.pt"
        where = f"stages.{stage.name} (finished earlier)"
        payload = session.load_model(path, where)
        if "rng" not in payload:
            raise CorexError(f"{where}: '{path}' is not a corex stage model (no RNG state)")
        session.set_rng(payload)  # as if the stage had just run


def evaluate_stage(session: Session, stage: Stage) -> dict[str, Any]:
    """An ``evaluate`` stage: its evaluators on its split (calibrated on the validation split first)."""
    evaluators = build_evaluators(stage, session.class_names, session.registry)
    found, intervals = evaluate_split(
        session.model, session.source_of(stage), session.recipe, stage, evaluators, session.device, weights=session.head_weights(stage),
        artefacts=session.out / stage.name, desc=session.progress_desc(f"[{stage.name}] evaluate {stage.split}"),
    )
    line = "  ".join(f"{k} {format_metric(k, v)}" for k, v in found.items() if "/" not in k)
    log(f"[{stage.name}] {stage.split}: {line}")
    result: dict[str, Any] = {"kind": "evaluate", "split": stage.split, "metrics": found}
    if intervals:
        result["intervals"] = {k: [float(lo), float(hi)] for k, (lo, hi) in intervals.items()}
    return result


def announce_stages(session: Session) -> None:
    """What the run will do: device, batch, stages with their epochs and steps."""
    recipe, device = session.recipe, session.device
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    log(f"corex: device {device}{threads}, seed {recipe.seed}; stages:")
    for stage in recipe.stages.values():
        if stage.kind == "evaluate":
            names = ", ".join(e.name for e in stage.evaluators)
            log(f"  {stage.name:12s} evaluate  on {stage.split}: {names}")
            continue
        fraction = 1.0 if stage.kind == "pretrain" else recipe.stage_data(stage).label_fraction
        images = len(session.source_of(stage).split("train", label_fraction=fraction))
        plan = stage_plan(stage, steps_per_epoch(images, recipe.stage_batch_size(stage), stage.max_steps_per_epoch))
        session.eta.planned[stage.name] = plan.total_steps
        what = stage.objective.name if stage.objective is not None else " + ".join(stage.heads)
        extra = f", {fraction:.0%} of the labels" if fraction < 1 else ""
        if stage.data is not None:
            extra += f", on data '{stage.data.name}'"
        length = f"{plan.epochs} epochs x {plan.steps_per_epoch} steps"
        if plan.total_steps != plan.epochs * plan.steps_per_epoch:
            length += f", {plan.total_steps} steps in all (stages.{stage.name}.steps)"
        log(f"  {stage.name:12s} {stage.kind:9s} {what}: {length}, global batch {recipe.stage_batch_size(stage)}{extra}")


def write_data_report(session: Session) -> None:
    """data.json (and skipped.json): decode (or find cached) every image now, so that a file that only
    fails when decoded is reported before training, and listed under ``on_bad_sample: skip``."""
    description = _describe(session.source, "data")
    if not session.main:  # rank 0 wrote the report; the others only find their caches
        for name, source in session.stage_sources.items():
            _describe(source, f"stages.{name}.data")
        return
    description["class_names"] = session.class_names
    if session.stage_sources:
        description["stages"] = {name: _describe(source, f"stages.{name}.data") for name, source in session.stage_sources.items()}
    rundir.write_json(session.out / "data.json", description)
    skipped = [*session.source.skipped(), *(item for source in session.stage_sources.values() for item in source.skipped())]
    if skipped:
        rundir.write_json(session.out / "skipped.json", skipped)
        log(f"data: skipped {len(skipped)} bad samples (on_bad_sample: skip); the list is in {session.out / 'skipped.json'}")


def _describe(source: Any, where: str) -> dict[str, Any]:
    culprit = culprit_of(source, where, "dataset")
    with blame(culprit, "preparing and describing its data"):
        if isinstance(source, Preparable):
            source.prepare()
        described = source.describe()
    if not isinstance(described, Mapping):
        raise culprit.fail("describe() to return a dict with one entry per split ({'train': {'images': ..., 'classes': {...}}, ...})",
                           shown(described))
    description = dict(described)
    if getattr(source, "normalization", None) is not None:
        description["normalization"] = source.normalization
    label = "data" if where == "data" else f"data of {where.split('.')[1]}"
    for split, info in description.items():
        if isinstance(info, Mapping) and "classes" in info:
            counts = ", ".join(f"{k} {v}" for k, v in info["classes"].items())
            log(f"{label}: {split:5s} {info.get('studies', '?')} studies, {info.get('images', '?')} images ({counts})")
    return description


def write_curves(session: Session) -> None:
    """curves.png with the declared headline metrics and each train stage's selected epoch."""
    catalog = metrics.catalog(session.registry.pm)
    plotted = [name for name in catalog.headline() if (m := catalog.get(name)) and m.higher_is_better and m.bounds == (0.0, 1.0)]
    selected = {name: (stage["selected_on"], stage.get("best_epoch")) for name, stage in session.results["stages"].items() if "selected_on" in stage}
    plot_curves(session.metrics.rows(), session.out / "curves.png", selected=selected, metrics=plotted)


__all__ = ["CLI_FLAGS", "Runner", "default_out", "evaluate_stage", "run"]
