"""The ``corex`` command line.

Every user-fixable problem (bad recipe, bad data, plugin conflict) prints a message and exits
with code 2; a traceback means a bug in corex or a plugin.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from corex import __version__
from corex.errors import CorexError



EXAMPLES = """\
examples:
  corex run recipes/quickstart.yaml                      multi-task run on the embedded phantom data
  corex run recipes/quickstart.yaml --set stages.train.epochs=2 --out runs/short
  corex run recipes/quickstart.yaml --out runs/short --resume   continue an interrupted run
  corex --progress lines run quickstart                  plain progress lines, for a log file
  corex validate recipes/siim/multitask_scratch.yaml --no-build --set data.root=/data/siim
  corex plugins --json                                   what every plugin provides
  corex recipes                                          the shipped recipes
  corex data info recipes/quickstart.yaml                images and studies per split and class
  corex export runs/quickstart model.pt                  the whole model, for predict and evaluate
  corex predict model.pt scans/ --out predictions        DICOM/PNG/JPEG files, per image and per study
  corex evaluate runs/quickstart --tta hflip,scale       evaluate again, with and without TTA
  corex study recipes/phantom/*.yaml --seeds 0 1 2 --label-fractions 1.0 0.1 --out runs/study
  corex compare runs/study --baseline classification_scratch   paired differences between arms
"""


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe (see `corex recipes`)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value by its dotted path, e.g. stages.train.epochs=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corex", description="Chest X-ray deep-learning studies from YAML recipes and plugins.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"corex {__version__}")
    parser.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default=None,
                        help="how long work shows progress: a live bar (a terminal's default), plain lines every "
                             "COREX_PROGRESS_INTERVAL seconds (default 10; a log's default), or nothing")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run a recipe", description="Run every stage of a recipe into a run directory.")
    _add_recipe_args(run)
    run.add_argument("--out", type=Path, help="run directory (default: the recipe's `output`, else runs/<name>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out where it stopped; with a larger stages.NAME.epochs, extend a finished one")
    run.add_argument("--overwrite", action="store_true", help="delete what --out holds and start afresh")
    run.add_argument("--json", action="store_true", help="print results.json on stdout (for scripts) instead of the summary table")
    run.add_argument("--no-progress", action="store_true", help="same as --progress off")
    run.add_argument("--nproc", type=int, default=None, metavar="N",
                     help="train with N processes on this machine (torch.distributed: gloo on CPU, nccl on GPU); "
                          "the same as `torchrun --nproc_per_node N -m corex run ...`")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check a recipe without running it",
                                   description="Report every problem in a recipe with its path; exit 0 when there is none.")
    _add_recipe_args(validate)
    validate.add_argument("--no-build", dest="build", action="store_false",
                          help="check the recipe's schema and option types only; by default every component is also built and "
                               "the encoder run once on a tiny input (the data set is opened to learn its size)")
    validate.add_argument("--build", dest="build", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts
    validate.set_defaults(handler=cmd_validate)

    plugins = commands.add_parser("plugins", help="list plugins and what they provide")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(handler=cmd_plugins)

    recipes = commands.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(handler=cmd_recipes)

    data = commands.add_parser("data", help="prepare and inspect data sets")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    prepare = data_commands.add_parser("prepare", help="build the decoded-image cache of a recipe's data ahead of time")
    _add_recipe_args(prepare)
    prepare.set_defaults(handler=cmd_data_prepare)
    info = data_commands.add_parser("info", help="images, studies and patients per split and class")
    _add_recipe_args(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_data_info)
    data.set_defaults(handler=lambda args: _usage(data))

    from corex.plugins import call_each, get_plugin_manager

    call_each(get_plugin_manager(), "corex_cli", commands=commands, data_commands=data_commands)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _load(args: argparse.Namespace):
    from corex.recipe import find_recipe, load_recipe

    return load_recipe(find_recipe(args.recipe), overrides=args.overrides)


def launch_processes(nproc: int, argv: Sequence[str]) -> int:
    """``corex run --nproc N ...``: torchrun starts N copies of ``corex run ...`` (without --nproc)."""
    import subprocess

    rest, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            rest.append(word)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "corex", *rest]
    print(f"corex: starting {nproc} processes: {' '.join(command[1:])}", file=sys.stderr)
    return subprocess.call(command, env=os.environ.copy())


def cmd_run(args: argparse.Namespace) -> int:
    from corex.engine import CLI_FLAGS, default_out, run

    if args.nproc is not None and args.nproc < 1:
        raise CorexError(f"--nproc: expected at least 1 process, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(args.nproc, args.argv)
    recipe = _load(args)
    out = args.out or default_out(recipe)
    try:
        results = run(recipe, out=out, resume=args.resume, overwrite=args.overwrite, progress=False if args.no_progress else None, flags=CLI_FLAGS)
    except KeyboardInterrupt as stop:
        what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        if (out / "recipe.yaml").exists():
            print(f"corex: {what}; the last checkpoint is kept. Continue with: {resume_command(args, out)}", file=sys.stderr)
        else:
            print(f"corex: {what} before the run started; nothing was written", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torch.distributed rank 0 alone reports
        print(json.dumps(results, indent=2) if args.json else summary_table(results, out))
    return 0


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command that continues this run, typed as shown: the environment it depends on, its --set values."""
    import shlex

    from corex.rundir import RUN_ENVIRONMENT

    needed = [*RUN_ENVIRONMENT, *(["PYTHONPATH"] if "COREX_PLUGINS" in os.environ else [])]  # where COREX_PLUGINS' modules are found
    words = [f"{key}={shlex.quote(os.environ[key])}" for key in needed if key in os.environ]
    words += ["corex", "run", shlex.quote(str(args.recipe))]
    words += [f"--set {shlex.quote(value)}" for value in args.overrides]
    return " ".join([*words, "--out", shlex.quote(str(out)), "--resume"])


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm, Kubernetes and most schedulers send), handled like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def summary_table(results: dict, out: Path) -> str:
    """The end of a run: each evaluate stage's headline metrics (as the plugins declare them, corex.metrics)
    with their 95% intervals, and where to look."""
    from corex.metrics import catalog, headline_rows

    headline = catalog().headline()
    lines = []
    for name, stage in results.get("stages", {}).items():
        if stage.get("kind") != "evaluate":
            continue
        metrics, intervals = stage.get("metrics", {}), stage.get("intervals", {})
        rows = [(key, metrics[key], intervals.get(key)) for key in headline_rows(metrics, headline)]
        count = metrics.get("n")
        lines.append(f"\n{name}: {stage.get('split')} split" + (f", {int(count)} studies" if isinstance(count, (int, float)) else ""))
        lines.append(f"  {'metric':20s} {'value':>7s}   95% interval")
        for key, value, interval in rows:
            shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval and None not in interval else ""
            lines.append(f"  {key:20s} {value:7.3f}   {shown}")
    lines.append("")
    for label, path in (("results", out / "results.json"), ("report", out / "report.html"), ("metrics", out / "metrics.jsonl"), ("curves", out / "curves.png")):
        if path.exists():
            lines.append(f"{label + ':':9s} {path}")
    lines.append(f"{'run:':9s} {out}")
    return "\n".join(lines).lstrip("\n")


def cmd_validate(args: argparse.Namespace) -> int:
    from corex.plugins import Registry

    recipe = _load(args)
    if args.build:
        from corex.build import build_data, build_stage_data, check_components

        registry = Registry()
        source = build_data(recipe, registry)
        check_components(recipe, source, registry, build_stage_data(recipe, source, registry))
    stages = ", ".join(f"{s.name} ({s.kind})" for s in recipe.stages.values())
    checked = "components built, encoder checked on a forward pass" if args.build else "schema only (--no-build)"
    print(f"{args.recipe}: valid ({checked}); stages: {stages}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from corex.plugins import describe_plugins

    rows = describe_plugins()
    if args.json:
        from corex.kinds import KINDS
        from corex.plugins import Registry

        registry = Registry()
        components = {kind: {name: c.plugin for name, c in sorted(registry.components(kind).items())} for kind in KINDS}
        print(json.dumps({"plugins": rows, "components": components}, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']} {row['version'] or ''}  ({row['module']}, {row['origin']})")
        for kind, names in row["components"].items():
            print(f"    {kind:14s} {', '.join(names)}")
        other = [h for h in row["hooks"] if h not in {f"corex_{k}" for k in row["components"]}]
        if other:
            print(f"    {'hooks':14s} {', '.join(other)}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from corex.recipe import first_comment, shipped_recipes

    shipped = shipped_recipes()
    for path in sorted(shipped.rglob("*.yaml")):
        name = path.relative_to(shipped).with_suffix("").as_posix()
        print(f"{name:36s} {first_comment(path)}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Build the cache of the recipe's data and of every stage's own data."""
    from corex.build import build_data
    from corex.plugins import Registry

    recipe, registry = _load(args), Registry()
    blocks = [("data", None)] + [(f"stages.{s.name}.data", s) for s in recipe.stages.values() if s.data is not None]
    for where, stage in blocks:
        source = build_data(recipe, registry, stage)
        from corex.interfaces import Preparable

        if isinstance(source, Preparable):
            source.prepare()
        else:
            print(f"{where}: this data set has nothing to prepare", file=sys.stderr)
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from corex.build import build_data

    from collections.abc import Mapping

    from corex.checks import culprit_of, shown

    source = build_data(_load(args))
    description = source.describe()
    if not isinstance(description, Mapping):
        raise culprit_of(source, "data", "dataset").fail("describe() to return a dict with one entry per split", shown(description))
    if args.json:
        print(json.dumps(description, indent=2, default=str))
        return 0
    names = list(source.class_names)
    print(f"{'split':6s} {'studies':>8s} {'images':>8s} {'patients':>9s}  " + "  ".join(f"{n:>13s}" for n in names))
    for split, info in description.items():
        if not isinstance(info, dict) or "classes" not in info:
            continue
        counts = "  ".join(f"{info['classes'].get(n, 0):>13}" for n in names)
        print(f"{split:6s} {info.get('studies', ''):>8} {info.get('images', ''):>8} {info.get('patients', ''):>9}  {counts}")
    unusable = description.get("unusable")
    if isinstance(unusable, dict) and unusable.get("note"):
        print(unusable["note"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    rank, world = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    if rank > 0:  # under torch.distributed only rank 0 speaks; the others report only their errors
        real_stderr = sys.stderr
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
        try:
            return _main(argv, lambda text: print(f"[rank {rank}/{world}] {text}", file=real_stderr, flush=True))
        except BaseException:
            import traceback

            print(f"[rank {rank}/{world}] " + traceback.format_exc(), file=real_stderr, flush=True)
            raise
    return _main(argv, lambda text: print(text, file=sys.stderr))


def _main(argv: Sequence[str] | None, error: Callable[[str], None]) -> int:
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):  # leave a host program's own handler alone
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _handle(argv, error)
    finally:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


def _handle(argv: Sequence[str] | None, error: Callable[[str], None]) -> int:
    try:
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = argv
        if not getattr(args, "handler", None):
            parser.print_help(sys.stderr)
            return 2
        from corex.progress import set_mode

        set_mode(args.progress)
        return int(args.handler(args) or 0)
    except CorexError as exc:  # the one place where a user's, the data's or the machine's problem becomes a message
        error(f"corex: {exc}")
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt as stop:
        error("corex: terminated (SIGTERM)" if isinstance(stop, Terminated) else "corex: interrupted")
        return 143 if isinstance(stop, Terminated) else 130
    except BrokenPipeError:  # `corex recipes | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
