"""Mutation testing of the modules that hold corex's promises (issue 23; docs/testing.md).

    pip install cosmic-ray==8.7.0
    nice -n 19 python benchmarks/mutation.py [MODULE ...] [--out runs/mutation] [--update-scores]

For each module of benchmarks/mutation.toml, cosmic-ray (the mutation tool) makes every mutant of
the module, one at a time, and runs THAT module's tests against it (pytest -x); a mutant the
tests do not fail "survives". The job prints each module's score (killed / (killed + survived))
and its time, writes OUT/mutation-report.md and OUT/mutation-report.json (every survivor with its
diff), and fails (exit 1) when a module's score fell below the one recorded in
docs/mutation-scores.json, or when a module's own tests fail before any mutation.
``--update-scores`` records this run's scores there instead (after a review of the survivors).

Two things make it safe and tractable on a shared 2-core machine:

* The mutants are made in a copy of the working tree (OUT/tree; cosmic-ray edits files in place),
  which the tests import through PYTHONPATH, so nobody working in the checkout sees a mutant.
* The tests of each mutant run in a process forked from a warm server that has already imported
  torch, pytest, hypothesis and the other third-party modules (but nothing of corex): a mutant costs
  its tests, not 7 s of imports. cosmic-ray's test command is this script's thin ``test`` client.

Not part of the regular test command: it takes tens of minutes (docs/testing.md says how long).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "benchmarks" / "mutation.toml"
SCORES = REPO / "docs" / "mutation-scores.json"
# Packages the mutants live in: the warm server must not have imported any of them.
OWN_PACKAGES = ("corex", "corex_")
# Third-party modules the server imports once, so each mutant's pytest run starts warm.
PRELOAD = ("torch", "torch.nn.functional", "torch.utils.data", "numpy", "yaml", "attrs", "pluggy", "pytest", "_pytest.python",
           "hypothesis", "hypothesis.strategies", "torchmetrics", "kornia", "pydicom", "PIL.Image", "matplotlib",
           "matplotlib.figure", "matplotlib.backends.backend_agg", "scipy.stats", "sklearn.metrics", "statsmodels.stats.multitest",
           "tqdm", "xdist", "pytest_benchmark")
STATUS = {"tests-fail": "its tests fail before any mutation", "no-tests": "none of its test files is in the tree"}
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:benchmark", "--no-header"]


def load_config(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import toml as tomllib  # type: ignore[no-redef]  # comes with cosmic-ray
    with open(path, "rb") as handle:
        return tomllib.load(handle)


# --- the warm test server and its client ------------------------------------------------------

def serve(socket_path: str, tree: str) -> int:
    """Import the third-party modules once; for each request fork, run pytest in the tree, answer."""
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 -- an optional module missing only costs time
            pass
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "corex" or m.startswith("corex_"))
    if leaked:
        print(f"mutation server: preloading imported {leaked}: a mutant of them would not be seen", file=sys.stderr)
        return 2
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            request = json.loads(_read_line(conn) or "{}")
            if request.get("stop"):
                return 0
            answer = _run_forked(conn, server, request, tree)
            if answer is not None:
                try:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    pass


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _run_forked(conn: socket.socket, server: socket.socket, request: dict[str, Any], tree: str) -> dict[str, Any] | None:
    log = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: a fresh import of corex (and of the mutant) from the tree
        code = 3
        try:
            os.setsid()  # its own process group: a timeout kills the test's subprocesses too
            conn.close()
            server.close()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os.chdir(tree)
            import pytest

            code = int(pytest.main(list(request["args"])))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + float(request.get("timeout", 3600))
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
            break
        readable, _, _ = select.select([conn], [], [], 0.2)
        gone = bool(readable) and not conn.recv(1, socket.MSG_PEEK)
        if gone or time.monotonic() > deadline:  # the client was killed (cosmic-ray's timeout), or ours
            with _suppress():
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None if gone else {"code": 124, "output": "timeout"}
    with _suppress():  # subprocesses a test left behind
        os.killpg(pid, signal.SIGKILL)
    log.seek(0)
    return {"code": status, "output": log.read().decode(errors="replace")}


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)


def request(socket_path: str, payload: dict[str, Any]) -> dict[str, Any]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(socket_path)
    with conn:
        conn.sendall(json.dumps(payload).encode() + b"\n")
        line = _read_line(conn)
    return json.loads(line) if line else {"code": 1, "output": "the mutation server closed the connection"}


def client(socket_path: str, args: list[str]) -> int:
    """cosmic-ray's test command: run pytest ``args`` in the warm server; exit with its status."""
    answer = request(socket_path, {"args": args})
    sys.stdout.write(answer["output"][-20000:])
    return 0 if answer["code"] == 0 else 1


# --- the working-tree copy --------------------------------------------------------------------

def stage_tree(dest: Path, exclude: list[str] = ()) -> None:
    """Copy the working tree (tracked and untracked, not ignored files) to ``dest``, less ``exclude``."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    if dest.exists():
        shutil.rmtree(dest)
    for name in filter(None, listed):
        source = REPO / name
        if not source.is_file() or name.startswith(("runs/", "build/")) or any(fnmatch.fnmatch(name, e) for e in exclude):
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    # pyproject maps corex.recipes to recipes/: the copy's corex package finds it the same way.
    (dest / "corex" / "recipes").symlink_to(Path("..") / "recipes")


def start_server(tree: Path, socket_path: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "plugins")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.Popen([sys.executable, __file__, "serve", "--socket", socket_path, "--tree", str(tree)], env=env,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise SystemExit(f"the mutation server did not start ({line!r})")
    return proc


# --- one module -------------------------------------------------------------------------------

def function_ranges(path: Path, names: list[str]) -> list[tuple[int, int]]:
    tree = ast.parse(path.read_text())
    found = [(node.lineno, node.end_lineno) for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names]
    if len({n for n in names}) > len(found):
        raise SystemExit(f"{path}: functions {names} not all found")
    return found


def mutate_module(module: dict[str, Any], settings: dict[str, Any], tree: Path, sessions: Path, socket_path: str,
                  previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mutate one module against its tests. ``previous``: this module's entry in an earlier report of
    the same source; then only its survivors are run again (its killed mutants stay killed, as long
    as the tests that killed them are unchanged)."""
    from cosmic_ray.commands import init
    from cosmic_ray.config import ConfigDict, serialize_config
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    name, source = module["name"], tree / module["path"]
    tests = [t for t in module["tests"] if (tree / t.split("::")[0]).exists()]
    if len(tests) < len(module["tests"]):
        print(f"{name}: no {sorted(set(module['tests']) - set(tests))} in the tree", flush=True)
    if not tests:
        return {"name": name, "path": module["path"], "status": "no-tests", "output": "none of its test files is in the tree"}
    args = PYTEST_ARGS + tests
    started = time.monotonic()
    baseline = request(socket_path, {"args": args})
    baseline_s = time.monotonic() - started
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    result: dict[str, Any] = {"name": name, "path": module["path"], "functions": module.get("functions"), "tests": tests,
                              "sha256": digest, "baseline_s": round(baseline_s, 1)}
    if previous is not None and (previous.get("sha256") != digest or previous.get("status") != "measured"):
        print(f"{name}: the source changed since the earlier report (or it was not measured): every mutant runs", flush=True)
        previous = None
    if baseline["code"] != 0:
        print(f"{name}: its tests fail before any mutation; not measured", flush=True)
        return {**result, "status": "tests-fail", "output": baseline["output"][-4000:]}
    timeout = max(float(settings["timeout_minimum"]), float(settings["timeout_factor"]) * baseline_s)
    command = " ".join([sys.executable, str(Path(__file__).resolve()), "test", "--socket", socket_path, "--", *args])
    config = ConfigDict({"module-path": str(source), "timeout": timeout, "excluded-modules": [], "test-command": command,
                         "distributor": ConfigDict({"name": "local"})})
    (sessions / f"{name}.toml").write_text(serialize_config(config))  # `cosmic-ray exec` can replay it by hand
    session = sessions / f"{name}.sqlite"
    session.unlink(missing_ok=True)
    earlier = {(s["line"], s["operator"], s["occurrence"]) for s in previous["survivors"]} if previous else set()
    lines = source.read_text().splitlines()
    annotations = _annotation_spans(source)
    keep = re.compile("|".join(f"(?:{p})" for p in settings["operators"]) + "$")
    ranges = function_ranges(source, module["functions"]) if module.get("functions") else None
    with use_db(str(session)) as db:
        init([source], db, {})
        skipped: dict[str, list[str]] = {}
        for item in db.pending_work_items:
            m = item.mutations[0]
            if not keep.match(m.operator_name):
                skipped.setdefault("operator not in the set", []).append(item.job_id)
            elif m.operator_name == "core/NumberReplacer" and m.occurrence % 2:
                skipped.setdefault("the -1 twin of a number mutant", []).append(item.job_id)
            elif any(a <= tuple(m.start_pos) < b for a, b in annotations):
                skipped.setdefault("inside a type annotation (never evaluated, or failing at import)", []).append(item.job_id)
            elif m.operator_name.startswith("core/ReplaceBinaryOperator_Mul_") and _bare_star(lines, m.start_pos):
                skipped.setdefault("the * of a signature's keyword-only marker (not an operator)", []).append(item.job_id)
            elif ranges and not any(a <= m.start_pos[0] <= b for a, b in ranges):
                skipped.setdefault(f"outside {', '.join(module['functions'])}", []).append(item.job_id)
            elif previous is not None and (m.start_pos[0], m.operator_name.removeprefix("core/"), m.occurrence) not in earlier:
                skipped.setdefault("killed in the earlier report", []).append(item.job_id)
        for reason, jobs in skipped.items():
            db.set_multiple_results(jobs, WorkResult(output=reason, worker_outcome=WorkerOutcome.SKIPPED))
        pending = list(db.pending_work_items)
        print(f"{name}: {len(pending)} mutants of {module['path']}"
              + (f" ({', '.join(module['functions'])})" if ranges else "")
              + f", tests {baseline_s:.1f} s unmutated (timeout {timeout:.0f} s)", flush=True)
        mutated_started = time.monotonic()
        for index, item in enumerate(pending, 1):
            outcome = mutate_and_test(item.mutations, command, timeout)
            db.set_result(item.job_id, outcome)
            if index % 25 == 0:
                print(f"  {name}: {index}/{len(pending)}, {time.monotonic() - mutated_started:.0f} s", flush=True)
        survivors, killed, timeouts, incompetent = [], 0, 0, 0
        for item, res in db.completed_work_items:
            if res.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            m = item.mutations[0]
            if res.worker_outcome != WorkerOutcome.NORMAL or res.test_outcome == TestOutcome.INCOMPETENT:
                incompetent += 1
            elif res.test_outcome == TestOutcome.SURVIVED:
                survivors.append({"line": m.start_pos[0], "operator": m.operator_name.removeprefix("core/"), "occurrence": m.occurrence,
                                  "function": m.definition_name, "diff": _short_diff(res.diff or "")})
            else:
                killed += 1
                timeouts += (res.output or "") == "timeout"
    survivors.sort(key=lambda s: (s["line"], s["operator"]))
    if previous is not None:
        killed += previous["killed"]
        result["survivors_of_earlier_report"] = True
    measured = killed + len(survivors)
    score = killed / measured if measured else 1.0
    elapsed = time.monotonic() - started
    print(f"{name}: score {score:.3f} ({killed} killed, {len(survivors)} survived"
          + (f", {incompetent} not run" if incompetent else "") + f") in {elapsed:.0f} s", flush=True)
    return {**result, "status": "measured", "score": round(score, 4), "mutants": measured, "killed": killed, "timeouts": timeouts,
            "incompetent": incompetent, "survived": len(survivors), "time_s": round(elapsed, 1), "survivors": survivors}


def _annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of every type annotation: ``int | None`` is not code to mutate."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        annotated = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            annotated = [a.annotation for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                                                arguments.vararg, arguments.kwarg) if a is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            annotated = [node.annotation]
        spans += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in annotated if a is not None]
    return spans


def _bare_star(lines: list[str], position: tuple[int, int]) -> bool:
    """Whether the ``*`` at ``position`` (1-based line, 0-based column) is a signature's ``*,``."""
    rest = lines[position[0] - 1][position[1]:]
    return re.match(r"\*\s*(,|\)|$)", rest) is not None


def _short_diff(diff: str) -> str:
    """The changed lines of a unified diff, without its file header."""
    return "\n".join(line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---")))


# --- reports and the floor --------------------------------------------------------------------

def write_reports(out: Path, results: list[dict[str, Any]], total_s: float, version: str) -> None:
    (out / "mutation-report.json").write_text(json.dumps({"tool": f"cosmic-ray {version}", "time_s": round(total_s, 1),
                                                          "modules": results}, indent=2) + "\n")
    lines = [f"# Mutation report (cosmic-ray {version}, {total_s / 60:.1f} min)", "",
             "| module | score | killed | survived | mutants | time |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] == "measured":
            lines.append(f"| {r['name']} | {r['score']:.3f} | {r['killed']} | {r['survived']} | {r['mutants']} | {r['time_s']:.0f} s |")
        else:
            lines.append(f"| {r['name']} | {STATUS[r['status']]} | | | | |")
    for r in results:
        if r["status"] != "measured":
            lines += ["", f"## {r['name']}: {STATUS[r['status']]}", "", "```", r["output"][-2000:], "```"]
            continue
        if not r["survivors"]:
            continue
        lines += ["", f"## {r['name']} ({r['path']}): {r['survived']} survivors", ""]
        for s in r["survivors"]:
            lines += [f"- line {s['line']} in `{s['function']}`, {s['operator']}", "", "```diff", s["diff"], "```"]
    (out / "mutation-report.md").write_text("\n".join(lines) + "\n")


def check_floor(results: list[dict[str, Any]], recorded: dict[str, Any]) -> list[str]:
    problems = []
    for r in results:
        if r["status"] != "measured":
            problems.append(f"{r['name']}: {STATUS[r['status']]}, so it cannot be measured")
            continue
        floor = recorded.get(r["name"], {}).get("score")
        if floor is not None and r["score"] < floor - 1e-9:
            problems.append(f"{r['name']}: score {r['score']:.4f} fell below the recorded {floor:.4f} "
                            f"({r['survived']} survivors; see mutation-report.md)")
    return problems


def record_scores(path: Path, results: list[dict[str, Any]], tool_version: str) -> None:
    """Write the measured modules' scores into the floor file (other modules keep theirs)."""
    recorded = json.loads(path.read_text()) if path.exists() else {}
    scores = recorded.get("modules", {})
    for r in results:
        if r["status"] == "measured":
            scores[r["name"]] = {"path": r["path"], "score": r["score"], "killed": r["killed"], "mutants": r["mutants"]}
    recorded = {"tool": f"cosmic-ray {tool_version}", "how": "python benchmarks/mutation.py --update-scores (docs/testing.md)",
                "modules": dict(sorted(scores.items()))}
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"recorded the scores of {', '.join(r['name'] for r in results if r['status'] == 'measured')} in {path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--socket", required=True)
        parser.add_argument("--tree", required=True)
        ns = parser.parse_args(argv[1:])
        return serve(ns.socket, ns.tree)
    if argv[:1] == ["test"]:
        rest = argv[1:]
        split = rest.index("--")
        return client(rest[rest.index("--socket") + 1], rest[split + 1:])

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="module names of the config (default: all, in its order)")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "mutation", help="where the report and the sessions go")
    parser.add_argument("--scores", type=Path, default=SCORES, help="the recorded scores (the floor)")
    parser.add_argument("--update-scores", action="store_true", help="record this run's scores as the new floor")
    parser.add_argument("--record", type=Path, metavar="REPORT_JSON",
                        help="record the scores of an earlier mutation-report.json in --scores (after its review), run nothing")
    parser.add_argument("--survivors-of", type=Path, metavar="REPORT_JSON",
                        help="run only the survivors of an earlier mutation-report.json (modules whose source is unchanged): "
                             "a quick check of new tests; record scores from full runs")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="leave these files of the working tree out of the copy (e.g. to measure the suite without a new test file)")
    ns = parser.parse_args(argv)
    try:
        from importlib.metadata import version

        tool_version = version("cosmic-ray")
    except Exception:  # noqa: BLE001
        print("cosmic-ray is not installed: pip install cosmic-ray==8.7.0", file=sys.stderr)
        return 2
    if ns.record:
        record_scores(ns.scores, json.loads(ns.record.read_text())["modules"], tool_version)
        return 0
    config = load_config(ns.config)
    modules = config["module"]
    unknown = set(ns.modules) - {m["name"] for m in modules}
    if unknown:
        print(f"unknown modules {sorted(unknown)}; the config has {[m['name'] for m in modules]}", file=sys.stderr)
        return 2
    chosen = [m for m in modules if not ns.modules or m["name"] in ns.modules]
    earlier = {r["name"]: r for r in json.loads(ns.survivors_of.read_text())["modules"]} if ns.survivors_of else {}
    out = ns.out.resolve()
    sessions = out / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stage_tree(out / "tree", ns.exclude)
    socket_path = tempfile.mktemp(prefix="corex-mutation-", suffix=".sock", dir="/tmp")
    server = start_server(out / "tree", socket_path)
    results = []
    try:
        for module in chosen:
            results.append(mutate_module(module, config["tool"], out / "tree", sessions, socket_path, earlier.get(module["name"])))
    finally:
        with _suppress():
            request(socket_path, {"stop": True})
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        Path(socket_path).unlink(missing_ok=True)
    total = time.monotonic() - started
    write_reports(out, results, total, tool_version)
    print(f"\n{'module':20s} score   killed/mutants  time")
    for r in results:
        if r["status"] == "measured":
            print(f"{r['name']:20s} {r['score']:.3f}  {r['killed']:4d}/{r['mutants']:<4d}      {r['time_s']:6.0f} s")
        else:
            print(f"{r['name']:20s} {STATUS[r['status']]}")
    print(f"total {total / 60:.1f} min; report: {out / 'mutation-report.md'}")
    if ns.update_scores:
        record_scores(ns.scores, results, tool_version)
        return 0
    recorded = json.loads(ns.scores.read_text()) if ns.scores.exists() else {}
    problems = check_floor(results, recorded.get("modules", {}))
    for problem in problems:
        print(f"FLOOR: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
