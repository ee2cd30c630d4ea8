"""``corex study``: every arm x seed x label fraction, pre-training shared, resumable.

Layout of a study directory::

    OUT/pretrain/<objective>-<hash>/seed-<S>/   one pre-training per distinct pretrain stage and seed
    OUT/<arm>/frac-<F>/seed-<S>/                one fine-tuning run per arm, label fraction and seed
    OUT/<arm>/frac-<F>/seed-<S>.log            what the engine printed while running it
    OUT/compare.{md,csv,png,json}, OUT/report.{html,md,json}

An arm is a recipe file (its name without ``.yaml``). Arms whose leading ``pretrain`` stages are
identical (objective, options, augmentation, data, model, optimiser and seed; the label fraction
does not matter, pre-training uses no labels) pre-train once per seed in ``OUT/pretrain``; each
arm's run then starts its encoder from that run's ``checkpoints/<stage>/model.pt`` instead of
pre-training again.

Resuming: a run whose results.json holds every stage is not redone; a run directory with a
recipe.yaml is continued with ``resume=True``; so running the same command again after a kill
continues where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import sys
import time
import warnings
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
    seed: int
    fraction: float
    recipe: dict[str, Any]  # resolved; loaded when run (its encoder_from file exists only then)
    out: Path
    needs: list[Job] = field(default_factory=list)

    def label(self) -> str:
        if self.kind == "pretrain":
            return f"pre-training {self.name} seed {self.seed}"
        return f"{self.name} frac {self.fraction:g} seed {self.seed}"


def fraction_dir(fraction: float) -> str:
    return f"frac-{fraction:g}"


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
    """Only the pretrain stages, with everything that does not affect them normalised away."""
    recipe = copy.deepcopy(resolved)
    recipe["stages"] = {n: recipe["stages"][n] for n in names}
    recipe["data"]["label_fraction"] = 1.0
    recipe["data"].pop("reduce_val", None)
    objectives = "+".join(recipe["stages"][n]["objective"]["name"] for n in names)
    recipe["name"] = f"pretrain-{objectives}"
    for key in ("description", "output", "source"):
        recipe.pop(key, None)
    return recipe


def pretrain_key(recipe: dict[str, Any]) -> str:
    without_seed = {k: v for k, v in recipe.items() if k != "seed"}
    return hashlib.sha256(json.dumps(without_seed, sort_keys=True, default=str).encode()).hexdigest()[:8]


def plan(recipes: list[Path], seeds: list[int], fractions: list[float], out: Path, *, overrides: list[str] = (),
         arms: list[str] | None = None, reduce_val: bool = True, equal_steps: bool = True) -> list[Job]:
    """The study's jobs in running order: per seed, each pre-training before the arms that need it."""
    names = arm_names(recipes)
    if arms:
        unknown = [a for a in arms if a not in names]
        if unknown:
            raise CorexError(f"--arms: no recipe for arm '{unknown[0]}'{did_you_mean(unknown[0], names)}; the arms are {', '.join(names)}")
    chosen = [(n, p) for n, p in zip(names, recipes) if not arms or n in arms]
    extra = list(overrides)
    if reduce_val and "reduce_val" in attrs.fields_dict(Data):
        extra.append("data.reduce_val=true")
    if not seeds or not fractions:
        raise CorexError("--seeds and --label-fractions need at least one value each")
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise CorexError(f"--label-fractions: {fraction:g} is not in (0, 1]")

    jobs: list[Job] = []
    groups: dict[str, str] = {}  # pre-training key -> directory name
    for seed in seeds:
        shared: dict[str, Job] = {}
        for name, path in chosen:
            for fraction in sorted(fractions, reverse=True):
                resolved = corex.load_recipe(path, [*extra, f"seed={seed}", f"data.label_fraction={fraction}"]).to_dict()
                names_pre = leading_pretrain(resolved["stages"])
                needs = []
                if names_pre:
                    pre = pretrain_recipe(resolved, names_pre)
                    key = pretrain_key(pre)
                    # The key in the name: another pre-training can never take this one's folder.
                    groups.setdefault(key, f"{pre['name'].removeprefix('pretrain-')}-{key}")
                    if key not in shared:
                        pre_out = out / PRETRAIN_DIR / groups[key] / f"seed-{seed}"
                        shared[key] = Job("pretrain", groups[key], seed, 1.0, pre, pre_out)
                        jobs.append(shared[key])
                    needs = [shared[key]]
                    finetune = arm_recipe(resolved, names_pre, shared[key].out, fraction if equal_steps else 1.0)
                else:
                    finetune = arm_recipe(resolved, [], out, fraction if equal_steps else 1.0)
                jobs.append(Job("arm", name, seed, fraction, finetune, out / name / fraction_dir(fraction) / f"seed-{seed}", needs))
    return jobs


def arm_recipe(resolved: dict[str, Any], pretrain_stages: list[str], pretrain_out: Path, fraction: float) -> dict[str, Any]:
    """The arm without its pretrain stages, starting from the shared pre-training's encoder.

    With ``fraction < 1`` train stages run ``ceil(epochs / fraction)`` epochs: every fraction then
    takes the same number of optimisation steps, so a 10% arm measures label scarcity, not
    under-training (the best epoch is still chosen on validation).
    """
    recipe = copy.deepcopy(resolved)
    for name in pretrain_stages:
        del recipe["stages"][name]
    for stage in recipe["stages"].values():
        if stage.get("encoder_from") in pretrain_stages:
            stage["encoder_from"] = str((pretrain_out / "checkpoints" / stage["encoder_from"] / "model.pt").resolve())
        if stage["kind"] == "train" and fraction < 1.0:
            stage["epochs"] = math.ceil(stage["epochs"] / fraction)
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


def run_job(job: Job) -> tuple[dict[str, Any], list[str]]:
    """Run (or resume) one job with the engine's own log beside it in ``seed-N.log``; returns its
    results and the warnings it raised (shown on the study's output: MoCo's queue warning, ...)."""
    job.out.parent.mkdir(parents=True, exist_ok=True)
    resume = (job.out / "recipe.yaml").exists()
    with log_path(job).open("a") as log, contextlib.redirect_stderr(log), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = corex.run(corex.load_recipe(job.recipe), out=job.out, resume=resume, progress=False)
    # UserWarnings are the plugins' own advice; library deprecations would only be noise here.
    messages = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    return results, messages


def log_path(job: Job) -> Path:
    return job.out.parent / f"{job.out.name}.log"


def headline(results: dict[str, Any], metric: str) -> str:
    for stage in reversed(list(results.get("stages", {}).values())):
        if stage.get("kind") == "evaluate" and metric in stage.get("metrics", {}):
            return f"{metric} {stage['metrics'][metric]:.3f}"
    stage = next(iter(results.get("stages", {}).values()), {})
    loss = stage.get("metrics", {}).get("loss")
    return f"loss {loss:.3f}" if loss is not None else "done"


def run_time(results: dict[str, Any]) -> float:
    return float(sum(s.get("time_s", 0.0) for s in results.get("stages", {}).values()))


class Eta:
    """Estimates the remaining time from the recorded times of finished jobs (results.json time_s),
    per arm and fraction (or pre-training group) where known, else the mean over finished jobs of that kind."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str, float], list[float]] = {}

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
        return format_duration(sum(estimates))


def run_study(jobs: list[Job], *, metric: str = "macro_f1", echo: Callable[[str], None] | None = None) -> list[Job]:
    """Run every job not yet finished, one plain progress line each; returns the arm jobs."""
    echo = echo or (lambda line: print(line, flush=True))
    arms = [j for j in jobs if j.kind == "arm"]
    eta = Eta()
    done = {id(j) for j in jobs if finished(j) is not None}
    for job in jobs:
        if id(job) in done:
            eta.record(job, run_time(finished(job)))
    skipped = sum(1 for j in arms if id(j) in done)
    if skipped:
        echo(f"study: {skipped} of {len(arms)} runs already finished; continuing")
    for job in jobs:
        if id(job) in done:
            continue
        if job.kind == "pretrain" and all(id(a) in done for a in arms if job in a.needs):
            continue  # every arm that needs it has finished
        started = time.perf_counter()
        results, messages = run_job(job)
        elapsed = time.perf_counter() - started
        eta.record(job, run_time(results) or elapsed)
        done.add(id(job))
        left = [j for j in jobs if id(j) not in done
                and not (j.kind == "pretrain" and all(id(a) in done for a in arms if j in a.needs))]
        prefix = f"[{sum(1 for a in arms if id(a) in done)}/{len(arms)}]" if job.kind == "arm" else "[pretrain]"
        echo(f"{prefix} {job.label()}: {headline(results, metric)} ({elapsed:.0f} s); study ETA {eta.remaining(left)}")
        for message in messages:
            echo(f"    warning from {job.out}: {message}")
    return arms


def study_command(args) -> int:
    """``corex study``: run the grid, then write the comparison and the study report."""
    from corex_study.compare import compare_runs, markdown, write_comparison
    from corex_study.report import write_study_report

    out = Path(args.out)
    recipes = [resolve(path) for path in args.recipes]
    jobs = plan(recipes, args.seeds, args.label_fractions, out, overrides=args.overrides, arms=args.arms,
                reduce_val=args.reduce_val, equal_steps=args.equal_steps)
    arms = [j for j in jobs if j.kind == "arm"]
    print(f"study: {len({j.name for j in arms})} arms x {len(args.seeds)} seeds x {len(args.label_fractions)} label fractions "
          f"= {len(arms)} runs, {sum(1 for j in jobs if j.kind == 'pretrain')} shared pre-trainings, in {out}", flush=True)
    try:
        run_study(jobs, metric=args.metric)
    except KeyboardInterrupt:
        print(f"study interrupted; run the same command again to continue where it stopped ({out})", file=sys.stderr)
        return 130
    baseline = args.baseline or arms[0].name  # default: the first arm given
    if baseline in {j.name for j in arms}:
        baseline = next(j.recipe["name"] for j in arms if j.name == baseline)
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
