"""Where a study's runs execute: in this process, in N local processes, or as tasks of a Ray cluster.

Every executor runs a job through :func:`attempt`, which leaves a run whose directory another process
holds to that process: the engine's run directory lock (``corex.rundir.RunLock``, an OS lock the kernel
releases when its process dies) is the only coordination, so two workers (two ``corex study`` processes
on one directory, two Ray tasks, a task retried after its worker died) never run the same run, and a
killed worker's run is resumed by the next one that looks at it.

* :class:`InProcess` (``--jobs 1``): one run at a time in this process, as the Python API does.
* :class:`LocalProcesses` (``--jobs N``): N runs at once, each in its own ``python -m
  corex_study.worker`` process with ``cores // N`` torch threads (``OMP_NUM_THREADS``,
  ``MKL_NUM_THREADS`` and ``torch.set_num_threads``), and with ``--devices`` its own GPU
  (``CUDA_VISIBLE_DEVICES``: the run sees one GPU, as ``cuda``/``cuda:0``).
* :class:`RayTasks` (``--executor ray --address ADDR``): each run a task of an existing Ray cluster
  (``--cpus-per-run``, ``--gpus-per-run`` resources; Ray retries a task whose worker died). The
  study directory must be on a file system every node sees at the same path, and corex installed on
  every node; the driver's ``COREX_*`` environment variables travel with each task.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import corex
from corex.errors import CorexError
from corex.rundir import RunLock, atomic_write_text

WORKER = "corex_study.worker"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- one job ------------------------------------------------------------------------------------------


def held_elsewhere(out: Path) -> bool:
    """Whether another process holds the run directory's lock (probing takes and drops it at once)."""
    if not (Path(out) / RunLock.NAME).exists():
        return False
    lock = RunLock(Path(out))
    try:
        lock.acquire()
    except CorexError:
        return True
    except OSError:
        return False
    lock.release()
    return False


def complete(spec: dict[str, Any]) -> dict[str, Any] | None:
    path = Path(spec["out"]) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if all(s in results.get("stages", {}) for s in spec["stages"]) else None


def attempt(spec: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) one job, its engine output appended to ``spec["log"]``, unless another process
    holds its run directory. Returns ``{"status": "done" | "busy", "results", "warnings", "elapsed",
    "elsewhere"}``; a failure raises. ``spec`` is :meth:`corex_study.study.Job.spec`."""
    out = Path(spec["out"])
    results = complete(spec)
    if results is not None:
        return {"status": "done", "results": results, "warnings": [], "elapsed": 0.0, "elsewhere": True}
    if held_elsewhere(out):
        return {"status": "busy"}
    out.parent.mkdir(parents=True, exist_ok=True)
    resume = (out / "recipe.yaml").exists()
    started = time.perf_counter()
    try:
        with open(spec["log"], "a") as log, contextlib.redirect_stderr(log), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = corex.run(corex.load_recipe(spec["recipe"]), out=out, resume=resume, progress=False)
    except CorexError:
        # Another worker took the directory between the probe and the engine's own lock, or finished it.
        results = complete(spec)
        if results is not None:
            return {"status": "done", "results": results, "warnings": [], "elapsed": 0.0, "elsewhere": True}
        if held_elsewhere(out):
            return {"status": "busy"}
        raise
    # UserWarnings are the plugins' own advice; library deprecations would only be noise here.
    messages = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    return {"status": "done", "results": results, "warnings": messages, "elapsed": time.perf_counter() - started}


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`attempt` in a worker (a child process, a Ray task): with ``spec["threads"]`` torch threads,
    and a failure turned into ``{"status": "failed", "error"}`` (the traceback goes to the run's log)."""
    threads = spec.get("threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    try:
        return attempt(spec)
    except Exception as exc:  # noqa: BLE001 -- reported to the study, which carries on with the other runs
        with contextlib.suppress(OSError), open(spec["log"], "a") as log:
            log.write(traceback.format_exc())
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, CorexError) else str(exc)}


# -- executors ------------------------------------------------------------------------------------------


class InProcess:
    """One job at a time, in this process (exceptions other than a run's own failure propagate:
    Ctrl-C stops the study)."""

    capacity = 1

    def __init__(self) -> None:
        self._result: tuple[Any, dict[str, Any]] | None = None

    def describe(self) -> str:
        return "one run at a time in this process"

    def check(self, jobs: list[Any]) -> None:
        pass

    def free(self) -> bool:
        return self._result is None

    def launch(self, job: Any) -> None:
        try:
            result = attempt(job.spec())
        except Exception as exc:  # noqa: BLE001 -- the study reports it and runs the others
            result = {"status": "failed", "error": str(exc) if isinstance(exc, CorexError) else f"{type(exc).__name__}: {exc}"}
        self._result = (job, result)

    def wait(self, timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        finished, self._result = self._result, None
        return [finished] if finished else []

    def close(self) -> None:
        pass


def parse_devices(devices: str | None) -> list[str]:
    """``cuda:0,cuda:1`` (or ``0,1``) as the GPU indices ``["0", "1"]``."""
    if not devices:
        return []
    found = []
    for item in devices.split(","):
        item = item.strip()
        index = item.split(":", 1)[1] if item.startswith("cuda:") else item
        if not index.isdigit():
            raise CorexError(f"--devices: '{item}' is not a GPU (give cuda:0,cuda:1,...)")
        found.append(index)
    if len(set(found)) != len(found):
        raise CorexError(f"--devices: a GPU is named twice in '{devices}'")
    return found


class LocalProcesses:
    """Up to ``jobs`` runs at once, each in its own worker process with ``threads`` torch threads and,
    given ``devices``, its own GPU."""

    def __init__(self, jobs: int, devices: list[str] | None = None, threads: int | None = None) -> None:
        self.capacity = jobs
        self.devices = list(devices or [])
        self.threads = threads or max(1, available_cores() // jobs)
        self.folder = Path(tempfile.mkdtemp(prefix="corex-study-"))
        self.running: dict[int, tuple[Any, subprocess.Popen, Path, str | None, Any]] = {}
        self.count = 0

    def describe(self) -> str:
        gpus = f", each on its own GPU ({', '.join('cuda:' + d for d in self.devices)})" if self.devices else ""
        runs = "1 run at a time in a worker process" if self.capacity == 1 else f"{self.capacity} runs at once in worker processes"
        return f"{runs}, {self.threads} torch thread{'s' if self.threads != 1 else ''} each{gpus}"

    def check(self, jobs: list[Any]) -> None:
        if not self.devices:
            return
        for job in jobs:
            device = job.recipe.get("device", "auto")
            if device not in ("auto", "cuda", "cuda:0"):
                raise CorexError(f"--devices: {job.label()} runs on device '{device}'; with --devices each run sees only its "
                                 "own GPU, so its recipe needs device auto or cuda (--set device=cuda)")

    def free(self) -> bool:
        return len(self.running) < self.capacity

    def launch(self, job: Any) -> None:
        self.count += 1
        spec = job.spec(self.threads)
        spec_file, status_file = self.folder / f"job-{self.count}.json", self.folder / f"job-{self.count}.status.json"
        spec_file.write_text(json.dumps(spec, default=str))
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        used = {entry[3] for entry in self.running.values()}
        device = next((d for d in self.devices if d not in used), None)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        Path(spec["log"]).parent.mkdir(parents=True, exist_ok=True)
        log = open(spec["log"], "a")  # noqa: SIM115 -- closed when the worker ends
        process = subprocess.Popen([sys.executable, "-m", WORKER, str(spec_file), str(status_file)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.running[process.pid] = (job, process, status_file, device, log)

    def wait(self, timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while True:
            ended = [(pid, entry) for pid, entry in self.running.items() if entry[1].poll() is not None]
            if ended or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        results = []
        for pid, (job, process, status_file, _, log) in ended:
            del self.running[pid]
            log.close()
            try:
                result = json.loads(status_file.read_text())
            except (OSError, ValueError):
                how = f"killed by signal {-process.returncode}" if process.returncode < 0 else f"exit code {process.returncode}"
                result = {"status": "failed", "error": f"its worker process ended without a result ({how}); run the study again to resume it"}
            results.append((job, result))
        return results

    def close(self) -> None:
        for _, process, _, _, log in self.running.values():
            if process.poll() is None:
                process.terminate()
        for _, process, _, _, log in self.running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        self.running.clear()
        for path in self.folder.glob("*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()


class RayTasks:
    """Each run a task of the Ray cluster at ``address`` (``auto``: the one this machine belongs to),
    at most ``jobs`` at once (default: as many as the cluster's resources take)."""

    def __init__(self, address: str | None, jobs: int | None = None, cpus: float = 1, gpus: float = 0) -> None:
        try:
            import ray
        except ImportError as exc:
            raise CorexError("--executor ray needs the ray package on this machine and on the cluster's nodes (pip install ray)") from exc
        self.ray = ray
        self.owned = not ray.is_initialized()
        if self.owned:
            try:
                ray.init(address=address or "auto", log_to_driver=False, configure_logging=False)
            except Exception as exc:  # noqa: BLE001 -- ray raises many kinds; the user needs the address named
                raise CorexError(f"--address {address or 'auto'}: cannot connect to a Ray cluster: {exc}") from exc
        self.capacity = jobs or 1_000_000
        self.cpus, self.gpus = cpus, gpus
        env = {k: v for k, v in os.environ.items() if k.startswith("COREX_")}
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 3}
        if env:
            options["runtime_env"] = {"env_vars": env}
        self.task = ray.remote(run_spec).options(**options)
        self.running: dict[Any, Any] = {}
        self.address = address

    def describe(self) -> str:
        limit = "" if self.capacity >= 1_000_000 else f", at most {self.capacity} at once"
        return f"each run a task of the Ray cluster at {self.address or 'auto'} ({self.cpus:g} CPU, {self.gpus:g} GPU per run{limit})"

    def check(self, jobs: list[Any]) -> None:
        pass

    def free(self) -> bool:
        return len(self.running) < self.capacity

    def launch(self, job: Any) -> None:
        threads = max(1, int(self.cpus))
        self.running[self.task.remote(job.spec(threads))] = job

    def wait(self, timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        if not self.running:
            return []
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
        results = []
        for ref in ready:
            job = self.running.pop(ref)
            try:
                result = self.ray.get(ref)
            except Exception as exc:  # noqa: BLE001 -- a task that Ray gave up on (its worker died more than max_retries times)
                result = {"status": "failed", "error": f"the Ray task failed: {type(exc).__name__}: {exc}"}
            results.append((job, result))
        return results

    def close(self) -> None:
        for ref in list(self.running):
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)
        self.running.clear()
        if self.owned:
            self.ray.shutdown()


def make_executor(kind: str = "local", *, jobs: int | None = None, devices: str | None = None, address: str | None = None,
                  cpus_per_run: float | None = None, gpus_per_run: float | None = None) -> Any:
    """The executor ``corex study`` options ask for (see the module's docstring)."""
    if jobs is not None and jobs < 1:
        raise CorexError(f"--jobs: {jobs} is not a number of runs (at least 1)")
    if kind == "ray":
        if devices:
            raise CorexError("--devices is for --executor local; on Ray give --gpus-per-run and let the cluster place the runs")
        return RayTasks(address, jobs, cpus_per_run or 1, gpus_per_run or 0)
    if kind != "local":
        raise CorexError(f"--executor: '{kind}' is neither 'local' nor 'ray'")
    if address or gpus_per_run:
        raise CorexError("--address and --gpus-per-run are for --executor ray")
    gpus = parse_devices(devices)
    if gpus and jobs is None:
        jobs = len(gpus)
    if gpus and jobs > len(gpus):
        raise CorexError(f"--jobs {jobs} with {len(gpus)} devices: each run at once needs a GPU of its own")
    jobs = jobs or 1
    if jobs == 1 and not gpus and cpus_per_run is None:
        return InProcess()
    return LocalProcesses(jobs, gpus, int(cpus_per_run) if cpus_per_run else None)


def write_status(path: Path, result: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(result, default=str))


__all__ = ["InProcess", "LocalProcesses", "RayTasks", "attempt", "make_executor", "run_spec", "write_status"]
