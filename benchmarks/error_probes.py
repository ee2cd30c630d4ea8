"""Bad inputs and faults from issue 10, each run as a real ``corex`` command line: the probe table.

    python benchmarks/error_probes.py [--tree DIR] [--markdown] [--json OUT.json]
    python benchmarks/error_probes.py --before OLD_TREE [--markdown]    # the before/after table

Every probe runs ``python -m corex.cli ...`` in a subprocess against the code in DIR (default: this
checkout), inside a fresh temporary folder, with a 60 s timeout, and gives one row: the exit code,
whether stderr holds a Python traceback, and the first line of the message. A tree that is not the
installed one (an old commit checked out with ``git worktree add``) is run from PYTHONPATH (DIR and
DIR/plugins first; the installed metadata still provides the entry points, whose module names are
the same); plugins the tree does not have are blocked with COREX_DISABLE_PLUGINS.

Data: a ``toy`` dataset module (``corex.testing.ToyPlugin``) for the recipe, run and resume probes,
and a 24-study phantom written in the SIIM layout for the DICOM and data-folder probes. The
``image_size=65536`` probe runs with its address space capped at 4 GB and deletes any file over
1 GB it leaves (saying so in its row); the concurrent ``--resume`` probe slows each epoch with a
sleeping observer and allows its two processes 120 s each.
About 4-5 minutes per tree on a busy 2-core machine (``--jobs`` probes at a time).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60
MESSAGE_CHARS = 90
TRACEBACK = "Traceback (most recent call last)"
# `python -c LIMITED BYTES ARGS...`: run `python ARGS...` with its address space capped at BYTES.
LIMITED = ("import os, resource, sys; limit = int(sys.argv[1]); "
           "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")

TOY_PLUGIN = '''\
"""The toy dataset for the probes; COREX_PROBE_EPOCH_SLEEP slows each epoch (concurrency probe)."""
import os
import time

from corex.hookspecs import hookimpl
from corex.testing import ToyPlugin

corex_datasets = ToyPlugin.corex_datasets

if os.environ.get("COREX_PROBE_EPOCH_SLEEP"):
    @hookimpl
    def corex_epoch_end():
        time.sleep(float(os.environ["COREX_PROBE_EPOCH_SLEEP"]))
'''

BAD_PLUGINS = {
    "probe_import_error": 'raise RuntimeError("probe plugin fails at import")\n',
    "probe_syntax_error": "def corex_encoders(:\n    return {}\n",
    "probe_hook_raises": textwrap.dedent('''\
        from corex.hookspecs import hookimpl

        @hookimpl
        def corex_encoders():
            raise RuntimeError("probe plugin's registration hook fails")
        '''),
    "probe_factory_typeerror": textwrap.dedent('''\
        from corex.hookspecs import hookimpl

        def probe_bad_encoder(width: int = 8):
            raise TypeError(f"probe_bad_encoder: width {width} is not supported")

        @hookimpl
        def corex_encoders():
            return {"probe_bad_encoder": probe_bad_encoder}
        '''),
}

TINY_RECIPE = textwrap.dedent("""\
    name: probe-tiny
    seed: 0
    data: {name: toy, image_size: 32, batch_size: 8, studies: 24}
    model: {encoder: {name: resnet18, width: 8}}
    optimizer: {name: adamw, lr: 0.003}
    schedule: {name: cosine, warmup_epochs: 0}
    stages:
      train:
        kind: train
        epochs: 1
        heads: {classification: {weight: 1.0}}
        evaluators: [{name: classification, bootstrap: 0}]
        select: macro_f1
      test:
        kind: evaluate
        split: test
        evaluators: [{name: classification, bootstrap: 0}]
    """)

SIIM_RECIPE = textwrap.dedent("""\
    name: probe-siim
    seed: 0
    data: {{name: siim, root: {root}, image_size: 64, batch_size: 8, cache_dir: {cache}, workers: 1}}
    model: {{encoder: {{name: resnet18, width: 8}}}}
    stages:
      train: {{kind: train, epochs: 1, heads: {{classification: {{weight: 1.0}}}}}}
    """)

# (probe label, --set value) run on the tiny toy recipe; the recipe schema's range checks.
SET_PROBES = [
    "optimizer.lr=-1", "optimizer.lr=.nan", "optimizer.betas=[1.5,2]", "stages.train.batch_size=-3",
    "data.num_workers=-1", "seed=1e23", "device=tpu", "stages.train.batch_size=0", "stages.train.grad_clip=-1",
    "optimizer.weight_decay=-1", "schedule.warmup_epochs=-2", "schedule.min_lr_ratio=5",
    "stages.train.max_steps_per_epoch=0", "stages.train.epochs=1e12",
    # YAML reads 1e23 as a string (no dot, no exponent sign); these two are the numbers themselves.
    "seed=1.0e+23", "stages.train.epochs=1.0e+12",
]


class Result:
    """One command's outcome: exit code (or 'timeout'), traceback or not, the message's first line."""

    def __init__(self, code: int | str, stderr: str, stdout: str, seconds: float, note: str = ""):
        self.code, self.stderr, self.stdout, self.seconds, self.note = code, stderr, stdout, seconds, note
        self.message_from: Result | None = None  # a probe of two commands reports one's message

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stderr

    def message(self) -> str:
        if self.message_from is not None:
            return self.message_from.message()
        return first_message(self.stderr, self.stdout, self.traceback, self.code != 0)


def first_message(stderr: str, stdout: str, traceback: bool, failed: bool = True) -> str:
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    if traceback:
        # The exception line that ends the (last) traceback says what went wrong.
        start = max(i for i, line in enumerate(lines) if TRACEBACK in line)
        tail = [line for line in lines[start + 1:] if not line.startswith((" ", "\t", "^", "~"))]
        return tail[0] if tail else lines[-1]
    # A run logs "corex: ..." lines as it goes; the error is the last unindented one.
    said = [i for i, line in enumerate(lines) if line.startswith("corex") and not line.startswith(" ")]
    if failed and said:
        i = said[-1]
        # "corex: 2 problems in x.yaml:" or "1 unusable sample(s)" says little alone: add the first detail.
        if i + 1 < len(lines) and lines[i + 1].startswith(" "):
            return f"{lines[i]}{' ' if lines[i].endswith(':') else ' — '}{lines[i + 1].strip()}"
        return lines[i]
    if not failed:
        # Accepted: the last epoch's log line shows what the run made of the value (loss nan ...).
        epochs = [line for line in lines if line.startswith("[") and " epoch " in line]
        if epochs:
            return epochs[-1]
    if lines:
        return lines[-1]
    out = [line for line in stdout.splitlines() if line.strip()]
    return out[0] if out else ""


def shorten(text: str, limit: int = MESSAGE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Probes:
    """Runs every probe against one source tree in one temporary folder."""

    def __init__(self, tree: Path, jobs: int, only: str | None = None):
        self.tree = tree.resolve()
        self.jobs = jobs
        self.only = only
        self.tmp = Path(tempfile.mkdtemp(prefix="corex-probes-"))
        self.mods = self.tmp / "mods"
        self.mods.mkdir()
        (self.mods / "corex_toy_plugin.py").write_text(TOY_PLUGIN)
        for name, source in BAD_PLUGINS.items():
            (self.mods / f"{name}.py").write_text(source)
        self.tiny = self.tmp / "tiny.yaml"
        self.tiny.write_text(TINY_RECIPE)
        self.env = self._environment()
        self.phantom: Path | None = None
        self.base_run: Path | None = None
        self.setup_errors: dict[str, str] = {}

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COREX_")}
        paths = [str(self.tree), str(self.tree / "plugins"), str(self.mods)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        missing = [name for name in ("predict", "study") if not (self.tree / "plugins" / f"corex_{name}").is_dir()]
        if missing:
            env["COREX_DISABLE_PLUGINS"] = ",".join(missing)
        env["COREX_PLUGINS"] = "corex_toy_plugin"
        env["KERAS_HOME"] = str(self.tmp / "keras")  # never the user's ~/.keras
        env["PYTHONWARNINGS"] = "ignore"  # warnings are not the messages we are after
        env["OMP_NUM_THREADS"] = "1"  # probes run side by side on a small machine
        return env

    def sub(self, name: str) -> Path:
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def start(self, args: list[str], *, cwd: Path, env: dict[str, str] | None = None,
              memory_limit: int | None = None) -> subprocess.Popen:
        command = [sys.executable, "-m", "corex.cli", *map(str, args)]
        if memory_limit:
            # setrlimit then exec: a preexec_fn is not safe while other threads start processes.
            command = [sys.executable, "-c", LIMITED, str(memory_limit), *command[1:]]
        return subprocess.Popen(
            command, cwd=cwd, env={**self.env, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )

    @staticmethod
    def finish(process: subprocess.Popen, started: float, timeout: float = TIMEOUT_S) -> Result:
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
            code: int | str = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: decode workers too
            stdout, stderr = process.communicate()
            code = "timeout"
        return Result(code, stderr, stdout, time.monotonic() - started, f"killed after {timeout:.0f} s" if code == "timeout" else "")

    def cli(self, *args, cwd: Path, timeout: float = TIMEOUT_S, **options) -> Result:
        started = time.monotonic()
        return self.finish(self.start(list(args), cwd=cwd, **options), started, timeout)

    # -- shared inputs --------------------------------------------------------------------------

    def setup(self) -> None:
        def phantom():
            out = self.tmp / "phantom"
            result = self.cli("data", "phantom", out, "--studies", 24, "--size", 64, cwd=self.tmp, timeout=180)
            if result.code != 0:
                raise RuntimeError(f"corex data phantom exit {result.code}: {shorten(result.message())}")
            self.phantom = out

        def base_run():
            out = self.tmp / "base-run"
            result = self.cli("run", self.tiny, "--out", out, "--no-progress", cwd=self.tmp, timeout=180)
            if result.code != 0:
                raise RuntimeError(f"tiny 1-epoch run exit {result.code}: {shorten(result.message())}")
            self.base_run = out

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {pool.submit(phantom): "phantom", pool.submit(base_run): "base run"}
            for future, name in futures.items():
                if future.exception():
                    self.setup_errors[name] = str(future.exception())

    def need(self, what: str) -> Path:
        path = {"phantom": self.phantom, "base run": self.base_run}[what]
        if path is None:
            raise SetupFailed(f"not run: {what} setup failed ({self.setup_errors.get(what, '?')})")
        return path

    def siim_recipe(self, folder: Path, damage: Callable[[Path], None] | None = None) -> Path:
        """A copy of the phantom in ``folder``, one DICOM damaged, and a recipe reading it."""
        root = folder / "siim"
        shutil.copytree(self.need("phantom"), root)
        if damage:
            damage(min((root / "train").rglob("*.dcm")))
        recipe = folder / "siim.yaml"
        recipe.write_text(SIIM_RECIPE.format(root=root, cache=folder / "cache"))
        return recipe

    def run_copy(self, folder: Path, keep_stages: tuple[str, ...] = ()) -> Path:
        """A copy of the finished tiny run whose results.json forgets the stages not in keep_stages."""
        run = folder / "run"
        shutil.copytree(self.need("base run"), run)
        results = json.loads((run / "results.json").read_text())
        results["stages"] = {k: v for k, v in results.get("stages", {}).items() if k in keep_stages}
        (run / "results.json").write_text(json.dumps(results))
        return run

    # -- the probes -----------------------------------------------------------------------------

    def probes(self) -> list[tuple[str, Callable[[Path], Result]]]:
        rows: list[tuple[str, Callable[[Path], Result]]] = []
        for damage_name, damage in (("truncated DICOM", truncate), ("DICOM without pixel data", drop_pixel_data)):
            rows.append((f"{damage_name}: corex data prepare", lambda d, damage=damage: self.cli(
                "data", "prepare", self.siim_recipe(d, damage), cwd=d)))
            rows.append((f"{damage_name}: corex run", lambda d, damage=damage: self.cli(
                "run", self.siim_recipe(d, damage), "--out", d / "run", "--no-progress", cwd=d)))
        rows.append(("DICOM with RescaleSlope NaN: corex data prepare", lambda d: self.cli(
            "data", "prepare", self.siim_recipe(d, nan_slope), cwd=d)))
        rows.append(("image_size=65536 on SIIM data (4 GB address-space limit)", self.huge_image))
        rows.append(("--out inside an existing file", self.out_in_file))
        rows.append(("--out /proc/x", lambda d: self.cli("run", self.tiny, "--out", "/proc/x", "--no-progress", cwd=d)))
        rows.append(("recipe output: /proc/y", self.output_in_proc))
        rows.append(("--set data.cache_dir=/proc/z (SIIM)", lambda d: self.cli(
            "run", self.siim_recipe(d), "--out", d / "run", "--no-progress", "--set", "data.cache_dir=/proc/z", cwd=d)))
        for value in SET_PROBES:
            rows.append((f"--set {value}", lambda d, value=value: self.cli(
                "run", self.tiny, "--out", d / "run", "--no-progress", "--set", value, cwd=d)))
        for label, damage in (("a truncated", truncate), ("an empty", empty), ("a foreign", foreign_checkpoint)):
            rows.append((f"--resume with {label} last.pt", lambda d, damage=damage: self.resume_with(
                d, "last.pt", damage)))
        rows.append(("--resume with a truncated model.pt", lambda d: self.resume_with(d, "model.pt", truncate, keep=("train",))))
        rows.append(("corex export of a truncated model.pt", self.export_truncated))
        rows.append(("encoder_from: a file holding a list", lambda d: self.encoder_from(d, [1, 2, 3])))
        rows.append(("encoder_from: a file holding a tensor", lambda d: self.encoder_from(d, "tensor")))
        rows.append(("encoder_from: a pickled object (code on load)", self.encoder_from_pickle))
        for module, label in (("probe_import_error", "raises at import"), ("probe_syntax_error", "has a syntax error"),
                              ("probe_hook_raises", "registration hook raises")):
            rows.append((f"COREX_PLUGINS module that {label}", lambda d, module=module: self.cli(
                "run", self.tiny, "--out", d / "run", "--no-progress", cwd=d,
                env={"COREX_PLUGINS": f"corex_toy_plugin,{module}"})))
        rows.append(("plugin factory raises TypeError", lambda d: self.cli(
            "run", self.tiny, "--out", d / "run", "--no-progress", "--set", "model.encoder.name=probe_bad_encoder", cwd=d,
            env={"COREX_PLUGINS": "corex_toy_plugin,probe_factory_typeerror"})))
        rows.append(("--resume while the same run is still going", self.concurrent_resume))
        return rows

    def huge_image(self, folder: Path) -> Result:
        result = self.cli("run", self.siim_recipe(folder), "--out", folder / "run", "--no-progress",
                          "--set", "data.image_size=65536", cwd=folder, memory_limit=4 << 30)
        big = [(p, p.stat().st_size) for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 1 << 30]
        if big:
            result.note = "left " + ", ".join(f"{p.name} ({size / 2**30:.0f} GiB apparent)" for p, size in big)
            for path, _ in big:
                path.unlink()
        return result

    def out_in_file(self, folder: Path) -> Result:
        (folder / "a-file").write_text("not a folder\n")
        return self.cli("run", self.tiny, "--out", folder / "a-file" / "run", "--no-progress", cwd=folder)

    def output_in_proc(self, folder: Path) -> Result:
        recipe = folder / "tiny-output.yaml"
        recipe.write_text(TINY_RECIPE + "output: /proc/y\n")
        return self.cli("run", recipe, "--no-progress", cwd=folder)

    def resume_with(self, folder: Path, name: str, damage: Callable[[Path], None], keep: tuple[str, ...] = ()) -> Result:
        run = self.run_copy(folder, keep)
        damage(run / "checkpoints" / "train" / name)
        return self.cli("run", self.tiny, "--out", run, "--resume", "--no-progress", cwd=folder)

    def export_truncated(self, folder: Path) -> Result:
        run = self.run_copy(folder, ("train", "test"))
        truncate(run / "checkpoints" / "train" / "model.pt")
        return self.cli("export", run, "--stage", "train", folder / "exported.pt", cwd=folder)

    def encoder_from(self, folder: Path, payload) -> Result:
        import torch

        path = folder / "encoder.pt"
        torch.save(torch.zeros(3) if payload == "tensor" else payload, path)
        return self.cli("run", self.tiny, "--out", folder / "run", "--no-progress",
                        "--set", f"stages.train.encoder_from={path}", cwd=folder)

    def encoder_from_pickle(self, folder: Path) -> Result:
        import torch

        marker = folder / "MARKER-code-ran"
        path = folder / "encoder.pt"
        torch.save(_MakesMarker(str(marker)), path)
        result = self.cli("run", self.tiny, "--out", folder / "run", "--no-progress",
                          "--set", f"stages.train.encoder_from={path}", cwd=folder)
        result.note = "marker file CREATED: code ran" if marker.exists() else "no marker: no code ran"
        return result

    def concurrent_resume(self, folder: Path) -> Result:
        out = folder / "run"
        slow = {"COREX_PROBE_EPOCH_SLEEP": "1.5"}
        args = ["run", self.tiny, "--out", out, "--no-progress", "--set", "stages.train.epochs=16"]
        started = time.monotonic()
        first = self.start(args, cwd=folder, env=slow)
        while not (out / "recipe.yaml").exists() and first.poll() is None and time.monotonic() - started < TIMEOUT_S:
            time.sleep(0.2)
        resumed_at = time.monotonic()
        second = self.start([*args, "--resume"], cwd=folder, env=slow)
        # Two processes, each up to 16 slow epochs: twice the usual limit.
        b = self.finish(second, resumed_at, 2 * TIMEOUT_S)
        a = self.finish(first, started, 2 * TIMEOUT_S)
        pairs = []
        if (out / "metrics.jsonl").exists():
            for line in (out / "metrics.jsonl").read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                pairs.append((row.get("stage"), row.get("epoch")))
        duplicates = len(pairs) - len(set(pairs))
        result = Result(b.code, a.stderr + "\n" + b.stderr, b.stdout, time.monotonic() - started)
        result.note = (f"first run exit {a.code}, --resume exit {b.code}; metrics.jsonl: {len(pairs)} rows, "
                       f"{duplicates} duplicated (stage, epoch)")
        result.message_from = b  # the --resume's message is the one that matters
        return result

    # -- running --------------------------------------------------------------------------------

    def run_all(self) -> list[dict]:
        started = time.monotonic()
        self.setup()
        rows = []
        lock = threading.Lock()

        def one(index: int, name: str, probe: Callable[[Path], Result]) -> None:
            try:
                result = probe(self.sub(f"p{index:02d}"))
                row = {"probe": name, "exit": result.code, "traceback": result.traceback,
                       "message": self.clean(result.message()), "note": self.clean(result.note),
                       "seconds": round(result.seconds, 1)}
            except SetupFailed as exc:
                row = {"probe": name, "exit": "-", "traceback": None, "message": str(exc), "note": "", "seconds": 0}
            except Exception as exc:  # noqa: BLE001 - the probe's own set-up broke: say so in its row
                row = {"probe": name, "exit": "-", "traceback": None, "note": "",
                       "message": f"probe could not be set up: {type(exc).__name__}: {exc}", "seconds": 0}
            row["index"] = index
            with lock:
                rows.append(row)
                print(f"  [{len(rows)}/{len(probes)}] {row['exit']!s:>7} {name}", file=sys.stderr, flush=True)

        probes = [p for p in self.probes() if not self.only or re.search(self.only, p[0])]
        # The slow one first, so that it overlaps the rest.
        order = sorted(range(len(probes)), key=lambda i: probes[i][0] != "--resume while the same run is still going")
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            for future in [pool.submit(one, i, *probes[i]) for i in order]:
                future.result()
        rows.sort(key=lambda r: r["index"])
        self.seconds = time.monotonic() - started
        return rows

    def clean(self, text: str) -> str:
        return text.replace(str(self.tmp), "$TMP").replace(str(self.tree), "$TREE")

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class SetupFailed(Exception):
    pass


class _MakesMarker:
    """Unpickling this object creates a file: proof that loading a checkpoint ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def foreign_checkpoint(path: Path) -> None:
    """A valid torch file of another model: keys this run's model does not have."""
    import torch

    torch.save({"epoch": 1, "model": {"backbone.stem.weight": torch.zeros(4, 3, 3, 3)}}, path)


def drop_pixel_data(path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def nan_slope(path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.RescaleSlope = "NaN"
    ds.save_as(path)


# -- output ------------------------------------------------------------------------------------------


def cell_exit(row: dict) -> str:
    return str(row["exit"])


def cell_traceback(row: dict) -> str:
    return {True: "traceback", False: "no", None: "-"}[row["traceback"]]


def compact_paths(text: str) -> str:
    """A path in the probe's temporary folder says nothing beyond its file name (UIDs cut short)."""
    def name(match: re.Match) -> str:
        base = match.group(1)
        return "…/" + (base if len(base) <= 24 else "…" + base[-16:])

    return re.sub(r"(?:\$TMP|…)/(?:[^\s'\"]*/)?([^/\s'\"]+)", name, text)


def cell_message(row: dict, width: int) -> str:
    text = shorten(compact_paths(row["message"].removeprefix("corex: ")), width) if row["message"] else ""
    if row.get("note"):
        text = f"{text} [{row['note']}]" if text else f"[{row['note']}]"
    return text


def md(text: str) -> str:
    return text.replace("|", "\\|")


def table(rows: list[dict], markdown: bool, width: int = MESSAGE_CHARS) -> str:
    if markdown:
        lines = ["| probe | exit | traceback? | message |", "|---|---|---|---|"]
        lines += [f"| {md(r['probe'])} | {cell_exit(r)} | {cell_traceback(r)} | {md(cell_message(r, width))} |" for r in rows]
        return "\n".join(lines)
    column = max(len(r["probe"]) for r in rows)
    return "\n".join(f"{r['probe']:{column}s}  {cell_exit(r):>7s}  {cell_traceback(r):9s}  {cell_message(r, width)}" for r in rows)


def compare(before: list[dict], after: list[dict], markdown: bool, width: int = MESSAGE_CHARS) -> str:
    old = {r["probe"]: r for r in before}
    missing = {"exit": "-", "traceback": None, "message": "", "note": ""}
    if markdown:
        lines = ["| probe | before: exit, traceback? | after: exit, traceback? | after: message | before: message |",
                 "|---|---|---|---|---|"]
        for r in after:
            b = old.get(r["probe"], missing)
            lines.append(f"| {md(r['probe'])} | {cell_exit(b)}, {cell_traceback(b)} | {cell_exit(r)}, {cell_traceback(r)} "
                         f"| {md(cell_message(r, width))} | {md(cell_message(b, width // 2))} |")
        return "\n".join(lines)
    column = max(len(r["probe"]) for r in after)
    lines = [f"{'probe':{column}s}  {'before':18s}  {'after':18s}  message (after)"]
    for r in after:
        b = old.get(r["probe"], missing)
        lines.append(f"{r['probe']:{column}s}  {cell_exit(b) + ', ' + cell_traceback(b):18s}  "
                     f"{cell_exit(r) + ', ' + cell_traceback(r):18s}  {cell_message(r, width)}")
    return "\n".join(lines)


def probe_tree(tree: Path, jobs: int, keep: bool, only: str | None) -> tuple[list[dict], float]:
    probes = Probes(tree, jobs, only)
    print(f"probing {tree} in {probes.tmp} ({jobs} at a time)", file=sys.stderr, flush=True)
    try:
        rows = probes.run_all()
    finally:
        if not keep:
            probes.close()
    print(f"{tree}: {len(rows)} probes in {probes.seconds:.0f} s", file=sys.stderr, flush=True)
    return rows, probes.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=HERE, help="the corex source tree to probe (default: this checkout)")
    parser.add_argument("--before", type=Path, help="also probe this (older) tree and print the before/after table")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    parser.add_argument("--json", type=Path, help="also write the rows (and the before rows) to this JSON file")
    parser.add_argument("--jobs", type=int, default=3, help="probes run at a time (default 3)")
    parser.add_argument("--width", type=int, default=MESSAGE_CHARS, help=f"characters of each message shown (default {MESSAGE_CHARS})")
    parser.add_argument("--from-json", type=Path, metavar="REPORT.json", help="print the table of a report written by --json")
    parser.add_argument("--only", metavar="REGEX", help="only the probes whose name matches (for debugging a probe)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (to look at what a probe left)")
    args = parser.parse_args(argv)
    for tree in filter(None, (args.tree, args.before)):
        if not (tree / "corex" / "cli.py").is_file():
            parser.error(f"{tree} is not a corex source tree (no corex/cli.py)")
    report: dict = {}
    if args.from_json:  # render a saved report again (another width or format) without running anything
        report = json.loads(args.from_json.read_text())
    elif args.before:
        report["before"], report["before_seconds"] = probe_tree(args.before, args.jobs, args.keep, args.only)
    if not args.from_json:
        report["after"], report["after_seconds"] = probe_tree(args.tree, args.jobs, args.keep, args.only)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if "before" in report:
        print(compare(report["before"], report["after"], args.markdown, args.width))
    else:
        print(table(report["after"], args.markdown, args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
