"""``corex study``: every arm x seeds x label fraction, pre-training shared, resumable, in parallel.

Layout of a study directory::

    OUT/pretrain/<objective>-<hash>/<seeds>/    one pre-training per distinct pretrain stage and seeds
    OUT/<arm>/frac-<F>/<seeds>/                 one fine-tuning run per arm, label fraction and seeds
    OUT/<arm>/frac-<F>/<seeds>.log              what the engine printed while running it
    OUT/compare.{md,csv,png,json}, OUT/report.{html,md,json}

``<seeds>`` is ``seed-S`` when the data seed and the training seed are both S (``--seeds``), else
``data-D-seed-T``. The data seed (``data.seed``) draws the phantom, the split and the label subset;
the training seed (``seed``) the initialisation, the order of the batches and the augmentation.

An arm is a recipe file (its name without ``.yaml``). Arms whose leading ``pretrain`` stages are
identical (objective, options, augmentation, data, model, optimiser; the label fraction does not
matter, pre-training uses no labels) pre-train once per pair of seeds in ``OUT/pretrain`` (once per
training seed when every pretrain stage reads its own data, so that the data seed cannot change it);
each arm's run then starts its encoder from that run's ``checkpoints/<stage>/model.pt``.

Equal optimisation steps: at a label fraction below 1 every train stage gets a step budget
(``steps``) of its epochs times the steps of an epoch at label fraction 1, and a warm-up of
``warmup_epochs`` times those steps (``schedule.warmup_steps``), so each fraction takes exactly the
same number of steps with the same schedule.

Resuming: a run whose results.json holds every stage is not redone; a run directory with a
recipe.yaml is continued with ``resume=True``; so running the same command again after a kill
continues where it stopped. Runs execute in this process (``--jobs 1``), in N local processes
(``--jobs N``, :mod:`corex_study.executors`) or as tasks of a Ray cluster (``--executor ray``); a run
whose directory another process has locked is left to it and looked at again later.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs

import corex
from corex.errors import CorexError, did_you_mean
from corex.progress import format_duration
from corex.recipe import Data

PRETRAIN_DIR = "pretrain"


@dataclass
class Job:
    """One run of the study: a shared pre-training or an arm's fine-tuning."""

    kind: str  # "pretrain" or "arm"
    name: str  # the arm, or the pre-training group
    seed: int  # the training seed
    fraction: float
    recipe: dict[str, Any]  # resolved; loaded when run (its encoder_from file exists only then)
    out: Path
    needs: list[Job] = field(default_factory=list)
    data_seed: int | None = None  # None: the training seed

    def seeds(self) -> str:
        data = self.seed if self.data_seed is None else self.data_seed
        return f"seed {self.seed}" if data == self.seed else f"data seed {data} seed {self.seed}"

    def label(self) -> str:
        if self.kind == "pretrain":
            return f"pre-training {self.name} {self.seeds()}"
        return f"{self.name} frac {self.fraction:g} {self.seeds()}"

    def spec(self, threads: int | None = None) -> dict[str, Any]:
        """What a worker needs to run it (plain data: it travels to another process or machine)."""
        return {"label": self.label(), "recipe": self.recipe, "out": str(self.out), "log": str(log_path(self)),
                "stages": list(self.recipe["stages"]), "threads": threads}


def fraction_dir(fraction: float) -> str:
    return f"frac-{fraction:g}"


def seed_dir(data_seed: int, seed: int) -> str:
    """``seed-S`` when both seeds are S (the layout of studies before data seeds), else ``data-D-seed-T``."""
    return f"seed-{seed}" if data_seed == seed else f"data-{data_seed}-seed-{seed}"


def seed_pairs(seeds: list[int] | None = None, data_seeds: list[int] | None = None, train_seeds: list[int] | None = None,
               pairing: str = "crossed") -> list[tuple[int, int]]:
    """The (data seed, training seed) pairs of a study.

    ``seeds`` is the shortcut for equal pairs (S, S). Otherwise ``data_seeds`` and ``train_seeds`` (a
    missing one is ``[0]``) are ``crossed`` (every pair) or ``paired`` (the i-th with the i-th).
    """
    if seeds is not None and (data_seeds is not None or train_seeds is not None):
        raise CorexError("--seeds is the shortcut for equal data and training seeds; give either --seeds or --data-seeds/--train-seeds")
    if pairing not in ("crossed", "paired"):
        raise CorexError(f"--pairing: '{pairing}' is neither 'crossed' nor 'paired'")
    if data_seeds is None and train_seeds is None:
        seeds = [0, 1, 2, 3, 4] if seeds is None else seeds
        pairs = [(s, s) for s in seeds]
    else:
        data_seeds = [0] if data_seeds is None else data_seeds
        train_seeds = [0] if train_seeds is None else train_seeds
        if pairing == "paired":
            if len(data_seeds) != len(train_seeds):
                raise CorexError(f"--pairing paired: {len(data_seeds)} data seeds and {len(train_seeds)} training seeds; "
                                 "give as many of each, or --pairing crossed")
            pairs = list(zip(data_seeds, train_seeds))
        else:
            pairs = [(d, t) for d in data_seeds for t in train_seeds]
    if not pairs:
        raise CorexError("--seeds (or --data-seeds and --train-seeds) needs at least one value")
    for d, t in pairs:
        for value in (d, t):
            if not 0 <= value <= 2**63 - 1:
                raise CorexError(f"seed {value} is not in [0, 2**63 - 1]")
    return list(dict.fromkeys(pairs))


def arm_names(recipes: list[Path]) -> list[str]:
    names = [Path(p).stem for p in recipes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CorexError(f"two recipes share the arm name {', '.join(duplicates)} (the file name without .yaml); rename one")
    return names


def leading_pretrain(stages: dict[str, Any]) -> list[str]:
    """The names of the pretrain stages before the first other stage."""
    names = []
    for name, stage in stages.items():
        if stage["kind"] != "pretrain":
            break
        names.append(name)
    return names


def pretrain_recipe(resolved: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Only the pretrain stages, with everything that does not affect them normalised away (the
    label fraction; the data seed too when every pretrain stage reads its own data)."""
    recipe = copy.deepcopy(resolved)
    recipe["stages"] = {n: recipe["stages"][n] for n in names}
    recipe["data"]["label_fraction"] = 1.0
    recipe["data"].pop("reduce_val", None)
    if not uses_recipe_data(recipe, names):
        recipe["data"]["seed"] = None
    objectives = "+".join(recipe["stages"][n]["objective"]["name"] for n in names)
    recipe["name"] = f"pretrain-{objectives}"
    for key in ("description", "output", "source"):
        recipe.pop(key, None)
    return recipe


def uses_recipe_data(recipe: dict[str, Any], names: list[str]) -> bool:
    """Whether a pretrain stage reads the recipe's data (rather than a data block of its own)."""
    return any(not recipe["stages"][n].get("data") for n in names)


def pretrain_key(recipe: dict[str, Any]) -> str:
    """A hash of what a pre-training depends on, seeds aside (they name its folder)."""
    without_seed = {k: v for k, v in recipe.items() if k != "seed"}
    without_seed["data"] = {k: v for k, v in recipe["data"].items() if k != "seed"}
    return hashlib.sha256(json.dumps(without_seed, sort_keys=True, default=str).encode()).hexdigest()[:8]


def plan(recipes: list[Path], seeds: list[int] | None, fractions: list[float], out: Path, *, overrides: list[str] = (),
         arms: list[str] | None = None, reduce_val: bool = True, equal_steps: bool = True,
         pairs: list[tuple[int, int]] | None = None) -> list[Job]:
    """The study's jobs in running order: per pair of seeds, each pre-training before the arms that need it.

    ``pairs`` lists (data seed, training seed) pairs (:func:`seed_pairs`); without it ``seeds`` gives
    equal pairs.
    """
    names = arm_names(recipes)
    if arms:
        unknown = [a for a in arms if a not in names]
        if unknown:
            raise CorexError(f"--arms: no recipe for arm '{unknown[0]}'{did_you_mean(unknown[0], names)}; the arms are {', '.join(names)}")
    chosen = [(n, p) for n, p in zip(names, recipes) if not arms or n in arms]
    extra = list(overrides)
    if reduce_val and "reduce_val" in attrs.fields_dict(Data):
        extra.append("data.reduce_val=true")
    pairs = pairs if pairs is not None else seed_pairs(seeds)
    if not pairs or not fractions:
        raise CorexError("--seeds and --label-fractions need at least one value each")
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise CorexError(f"--label-fractions: {fraction:g} is not in (0, 1]")

    jobs: list[Job] = []
    groups: dict[str, str] = {}  # pre-training key -> directory name
    sources: dict[str, Any] = {}  # data sources built to count training images, by data block and seed
    shared: dict[tuple[str, int, int], Job] = {}  # (pre-training key, its data seed, training seed) -> its job
    for data_seed, seed in pairs:
        seed_overrides = [f"seed={seed}", "data.seed=null" if data_seed == seed else f"data.seed={data_seed}"]
        for name, path in chosen:
            for fraction in sorted(fractions, reverse=True):
                loaded = corex.load_recipe(path, [*extra, *seed_overrides, f"data.label_fraction={fraction}"])
                resolved = loaded.to_dict()
                if equal_steps:
                    equal_step_budget(loaded, resolved, sources)
                names_pre = leading_pretrain(resolved["stages"])
                needs = []
                pretrain_out = out
                if names_pre:
                    pre = pretrain_recipe(resolved, names_pre)
                    key = pretrain_key(pre)
                    depends = uses_recipe_data(pre, names_pre)
                    # The key in the name: another pre-training can never take this one's folder.
                    groups.setdefault(key, f"{pre['name'].removeprefix('pretrain-')}-{key}")
                    shared_key = (key, data_seed if depends else seed, seed)
                    if shared_key not in shared:
                        pre_out = out / PRETRAIN_DIR / groups[key] / seed_dir(shared_key[1], seed)
                        shared[shared_key] = Job("pretrain", groups[key], seed, 1.0, pre, pre_out, data_seed=shared_key[1])
                        jobs.append(shared[shared_key])
                    needs = [shared[shared_key]]
                    pretrain_out = shared[shared_key].out
                finetune = arm_recipe(resolved, names_pre, pretrain_out)
                jobs.append(Job("arm", name, seed, fraction, finetune, out / name / fraction_dir(fraction) / seed_dir(data_seed, seed),
                                needs, data_seed=data_seed))
    return jobs


def equal_step_budget(loaded: Any, resolved: dict[str, Any], sources: dict[str, Any]) -> None:
    """Give each train stage below label fraction 1 the optimisation steps it takes at fraction 1.

    ``stages.S.steps = epochs x steps_per_epoch(training images at fraction 1)`` and
    ``schedule.warmup_steps = round(warmup_epochs x the same steps per epoch)``, so every fraction
    takes exactly the same steps with the same warm-up and decay (a stage that already has a step
    budget or a warm-up in steps keeps it). At fraction 1 the recipe is left as it is: its epochs
    already take those steps. ``sources`` caches the data sources built to count the images.
    """
    for name, stage in loaded.stages.items():
        data = loaded.stage_data(stage)
        if stage.kind != "train" or data.label_fraction >= 1.0:
            continue
        entry = resolved["stages"][name]
        block = dict(entry["data"] if entry.get("data") else resolved["data"])
        block.pop("label_fraction", None)
        block.pop("reduce_val", None)
        block["seed"] = loaded.seed if data.seed is None else data.seed
        key = json.dumps(block, sort_keys=True, default=str)
        if key not in sources:
            sources[key] = corex.build_data(loaded, stage=stage)
        images = len(sources[key].split("train"))
        per_epoch = corex.steps_per_epoch(images, loaded.stage_batch_size(stage), stage.max_steps_per_epoch)
        if stage.steps is None:
            entry["steps"] = stage.epochs * per_epoch
        schedule = loaded.stage_schedule(stage)
        if schedule.warmup_steps is None:
            entry["schedule"] = {**copy.deepcopy(entry.get("schedule") or resolved["schedule"]),
                                 "warmup_steps": round(schedule.warmup_epochs * per_epoch)}


def arm_recipe(resolved: dict[str, Any], pretrain_stages: list[str], pretrain_out: Path) -> dict[str, Any]:
    """The arm without its pretrain stages, starting from the shared pre-training's encoder."""
    recipe = copy.deepcopy(resolved)
    for name in pretrain_stages:
        del recipe["stages"][name]
    for stage in recipe["stages"].values():
        if stage.get("encoder_from") in pretrain_stages:
            stage["encoder_from"] = str((pretrain_out / "checkpoints" / stage["encoder_from"] / "model.pt").resolve())
    recipe.pop("output", None)
    return recipe


def finished(job: Job) -> dict[str, Any] | None:
    """The job's results when every stage of its recipe has them, else ``None``."""
    path = job.out / "results.json"
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not all(s in results.get("stages", {}) for s in job.recipe["stages"]):
        return None
    saved = job.out / "recipe.yaml"
    if saved.exists() and corex.load_recipe(saved).digest() != corex.load_recipe(job.recipe).digest():
        raise CorexError(f"'{job.out}' holds a finished run of another recipe than this study's {job.label()} "
                         f"(compare {saved}); use another --out, or delete that run to redo it")
    return results


def log_path(job: Job) -> Path:
    return job.out.parent / f"{job.out.name}.log"


def headline(results: dict[str, Any], metric: str | list[str]) -> str:
    """The run's test ``metric`` (the first of a list it has), else its first stage's loss."""
    names = [metric] if isinstance(metric, str) else metric
    for stage in reversed(list(results.get("stages", {}).values())):
        found = next((n for n in names if isinstance(stage.get("metrics", {}).get(n), (int, float))), None)
        if stage.get("kind") == "evaluate" and found is not None:
            return f"{found} {stage['metrics'][found]:.3f}"
    stage = next(iter(results.get("stages", {}).values()), {})
    loss = stage.get("metrics", {}).get("loss")
    return f"loss {loss:.3f}" if loss is not None else "done"


def run_time(results: dict[str, Any]) -> float:
    return float(sum(s.get("time_s", 0.0) for s in results.get("stages", {}).values()))


class Eta:
    """Estimates the remaining time from the recorded times of finished jobs (results.json time_s),
    per arm and fraction (or pre-training group) where known, else the mean over finished jobs of that
    kind, divided by the runs that execute at once."""

    def __init__(self, parallel: int = 1) -> None:
        self.times: dict[tuple[str, str, float], list[float]] = {}
        self.parallel = max(1, parallel)

    def record(self, job: Job, seconds: float) -> None:
        self.times.setdefault((job.kind, job.name, job.fraction), []).append(seconds)

    def estimate(self, job: Job) -> float | None:
        same = self.times.get((job.kind, job.name, job.fraction))
        if same:
            return sum(same) / len(same)
        kind = [t for (k, _, _), ts in self.times.items() if k == job.kind for t in ts]
        return sum(kind) / len(kind) if kind else None

    def remaining(self, jobs: list[Job]) -> str:
        estimates = [self.estimate(j) for j in jobs]
        if any(e is None for e in estimates):
            return "?"  # a kind of job that has not run yet
        return format_duration(sum(estimates) / min(self.parallel, max(1, len(jobs))))


class StudyFailed(CorexError):
    """Some runs of a study failed; the others finished (or were left to their dependants' fate)."""


def run_study(jobs: list[Job], *, metric: str | None = None, echo: Callable[[str], None] | None = None,
              executor: Any = None, poll: float | None = None) -> list[Job]:
    """Run every job not yet finished, one plain progress line each; returns the arm jobs.

    ``executor`` runs the jobs (:mod:`corex_study.executors`; default: one at a time in this process).
    A job starts once the pre-training it needs has finished. A job whose run directory another process
    holds (another ``corex study`` on the same directory, a worker elsewhere) is looked at again every
    ``poll`` seconds: when that process finishes it, it is done; when it dies, its lock goes with it and
    the run is resumed here. Raises :class:`StudyFailed` after the others ran when some failed.
    """
    from corex_study.executors import InProcess

    echo = echo or (lambda line: print(line, flush=True))
    executor = executor or InProcess()
    poll = float(os.environ.get("COREX_STUDY_POLL", "5")) if poll is None else poll
    shown: str | list[str] = metric or _headline_metrics()
    arms = [j for j in jobs if j.kind == "arm"]
    eta = Eta(executor.capacity)
    done = {id(j) for j in jobs if finished(j) is not None}
    for job in jobs:
        if id(job) in done:
            eta.record(job, run_time(finished(job)))
    skipped = sum(1 for j in arms if id(j) in done)
    if skipped:
        echo(f"study: {skipped} of {len(arms)} runs already finished; continuing")
    failed: dict[int, str] = {}
    running: set[int] = set()
    retry_at: dict[int, float] = {}
    by_id = {id(j): j for j in jobs}

    def wanted(job: Job) -> bool:
        if id(job) in done or id(job) in failed:
            return False
        return job.kind == "arm" or any(id(a) not in done and id(a) not in failed for a in arms if job in a.needs)

    try:
        while True:
            for job in jobs:
                broken = next((n for n in job.needs if id(n) in failed), None)
                if broken is not None and id(job) not in failed and id(job) not in done:
                    failed[id(job)] = f"its pre-training failed ({broken.label()})"
                    echo(f"{job.label()}: not run, {failed[id(job)]}")
            pending = [j for j in jobs if wanted(j)]
            if not pending and not running:
                break
            now = time.monotonic()
            for job in pending:
                if not executor.free():
                    break
                if id(job) in running or retry_at.get(id(job), 0.0) > now or any(id(n) not in done for n in job.needs):
                    continue
                running.add(id(job))
                executor.launch(job)
            if not running:  # every pending job waits for a run another process holds
                wake = min((retry_at[id(j)] for j in pending if id(j) in retry_at), default=now + poll)
                time.sleep(max(0.05, wake - now))
                continue
            for job, result in executor.wait(timeout=poll):
                running.discard(id(job))
                status = result.get("status")
                if status == "done":
                    results = result.get("results") or finished(job) or {}
                    done.add(id(job))
                    retry_at.pop(id(job), None)
                    eta.record(job, run_time(results) or result.get("elapsed", 0.0))
                    left = [j for j in jobs if wanted(j)]
                    prefix = f"[{sum(1 for a in arms if id(a) in done)}/{len(arms)}]" if job.kind == "arm" else "[pretrain]"
                    how = "finished by another process" if result.get("elsewhere") else f"({result.get('elapsed', 0.0):.0f} s)"
                    echo(f"{prefix} {job.label()}: {headline(results, shown)} {how}; study ETA {eta.remaining(left)}")
                    for message in result.get("warnings", []):
                        echo(f"    warning from {job.out}: {message}")
                elif status == "busy":
                    if id(job) not in retry_at:
                        echo(f"{job.label()}: {job.out} is in use by another process; looking again every {poll:g} s")
                    retry_at[id(job)] = time.monotonic() + poll
                else:
                    failed[id(job)] = result.get("error") or "failed"
                    echo(f"{job.label()}: FAILED: {failed[id(job)]} (log: {log_path(job)})")
    finally:
        executor.close()
    if failed:
        lines = [f"  {by_id[i].label()}: {reason}" for i, reason in failed.items()]
        raise StudyFailed(f"{len(failed)} of {len(jobs)} jobs failed:\n" + "\n".join(lines)
                          + "\nfix the cause and run the same command again: finished runs are kept, interrupted ones resumed")
    return arms


def _headline_metrics() -> list[str]:
    from corex.metrics import catalog

    return catalog().headline()


def study_command(args) -> int:
    """``corex study``: run the grid, then write the comparison and the study report."""
    from corex_study.compare import compare_runs, markdown, write_comparison
    from corex_study.executors import make_executor
    from corex_study.report import write_study_report

    out = Path(args.out)
    recipes = [resolve(path) for path in args.recipes]
    pairs = seed_pairs(args.seeds, args.data_seeds, args.train_seeds, args.pairing)
    executor = make_executor(args.executor, jobs=args.jobs, devices=args.devices, address=args.address,
                             cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
    jobs = plan(recipes, None, args.label_fractions, out, overrides=args.overrides, arms=args.arms,
                reduce_val=args.reduce_val, equal_steps=args.equal_steps, pairs=pairs)
    executor.check(jobs)
    arms = [j for j in jobs if j.kind == "arm"]
    data_seeds, train_seeds = sorted({d for d, _ in pairs}), sorted({t for _, t in pairs})
    seeds = (f"{len(pairs)} seeds" if all(d == t for d, t in pairs)
             else f"{len(pairs)} seed pairs ({len(data_seeds)} data x {len(train_seeds)} training seeds, {args.pairing})")
    print(f"study: {len({j.name for j in arms})} arms x {seeds} x {len(args.label_fractions)} label fractions "
          f"= {len(arms)} runs, {sum(1 for j in jobs if j.kind == 'pretrain')} shared pre-trainings, in {out}; {executor.describe()}",
          flush=True)
    try:
        run_study(jobs, metric=args.metric, executor=executor)
    except KeyboardInterrupt:
        print(f"study interrupted; run the same command again to continue where it stopped ({out})", file=sys.stderr)
        return 130
    baseline = args.baseline or arms[0].name  # default: the first arm given (its file name names it in compare too)
    comparison = compare_runs([j.out for j in arms], baseline=baseline, metric=args.metric)
    write_comparison(comparison, out)
    write_study_report(out, comparison)
    print(markdown(comparison))
    print(f"study directory: {out} (compare.md, compare.csv, compare.png, report.html)", file=sys.stderr)
    return 0


def resolve(path: str) -> Path:
    resolved = corex.find_recipe(path)
    if not resolved.exists():
        raise CorexError(f"recipe '{path}' does not exist (give a YAML file or a shipped recipe name, see `corex recipes`)")
    return resolved
