"""corex_study: studies over arms, seeds and label fractions; paired comparisons; deploy-readiness reports.

* ``corex study RECIPE... --seeds 0 1 2 3 4 --label-fractions 1.0 0.1 --out runs/study``: every
  arm x seeds x fraction (data and training seeds apart with ``--data-seeds``/``--train-seeds``),
  pre-training shared across arms and fractions, equal optimisation steps at every fraction,
  resumable, ``--jobs N`` runs at once or a Ray cluster (:mod:`corex_study.study`,
  :mod:`corex_study.executors`); ends with the comparison and the study report.
* ``corex compare RUN_OR_STUDY_DIR... [--baseline ARM] [--metric NAME] [--out DIR]``: the
  headline test metrics per arm and paired differences to a baseline, Holm-corrected, with power and
  variance components (:mod:`corex_study.compare`, statistics in :mod:`corex_study.stats`).
* After every run with an evaluate stage (the ``corex_run_end`` hook), report.html, report.md and
  report.json in the run directory (:func:`write_report`, findings in :mod:`corex_study.findings`).

See docs/study.md.

This module imports no numpy or torch: ``corex --help`` builds the commands' parsers from it, and
the handlers and the ``corex_run_end`` hook import the implementation when they run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from corex import hookimpl
from corex.lazy import lazy_exports


@hookimpl
def corex_run_end(run, results):
    """Write the deploy-readiness report of a run that evaluated something."""
    if not any(stage.get("kind") == "evaluate" for stage in results.get("stages", {}).values()):
        return
    try:
        from corex_study.report import write_report

        write_report(run.out)
    except Exception as exc:  # noqa: BLE001 -- the run itself succeeded; a report problem must not hide that
        print(f"corex_study: report.html not written ({type(exc).__name__}: {exc}); "
              f"retry with: python -c \"import corex_study; corex_study.write_report('{run.out}')\"", file=sys.stderr)


@hookimpl
def corex_cli(commands):
    study = commands.add_parser(
        "study", help="run arms x seeds x label fractions, then compare them",
        description="Run every arm (recipe) for every seed and label fraction, sharing pre-training; resumable: run "
                    "the same command again to continue. Ends by writing compare.md/csv/png and report.html.",
    )
    study.add_argument("recipes", nargs="+", metavar="RECIPE", help="one recipe per arm (the arm is the file name)")
    seeds = study.add_argument_group("seeds", "the data seed draws the phantom, the split and the label subset (data.seed); "
                                              "the training seed the initialisation, batch order and augmentation (seed)")
    seeds.add_argument("--seeds", type=int, nargs="+", help="equal data and training seeds, one run per seed (default 0 1 2 3 4)")
    seeds.add_argument("--data-seeds", type=int, nargs="+", metavar="D", help="data seeds (default 0 when --train-seeds is given)")
    seeds.add_argument("--train-seeds", type=int, nargs="+", metavar="T", help="training seeds (default 0 when --data-seeds is given)")
    seeds.add_argument("--pairing", choices=["crossed", "paired"], default="crossed",
                       help="crossed: every data seed with every training seed (default); paired: the i-th with the i-th")
    study.add_argument("--label-fractions", type=float, nargs="+", default=[1.0, 0.1])
    study.add_argument("--out", type=Path, default=Path("runs/study"), help="the study directory (default runs/study)")
    study.add_argument("--arms", nargs="+", metavar="NAME", help="only these arms (recipe file names without .yaml)")
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value in every arm's recipe (repeatable)")
    study.add_argument("--no-reduce-val", dest="reduce_val", action="store_false",
                       help="select models on the full validation split even with a label fraction below 1")
    study.add_argument("--no-equal-steps", dest="equal_steps", action="store_false",
                       help="do not give a label fraction below 1 the optimisation steps (and warm-up) of fraction 1")
    study.add_argument("--baseline", help="the arm to compare against: its file name, recipe name or compare label (default: the first arm)")
    study.add_argument("--metric", help="the test metric to compare (default: the first headline metric the plugins declare)")
    where = study.add_argument_group("where runs execute")
    where.add_argument("--jobs", type=int, help="runs at once (default 1: in this process; N: N worker processes, "
                                                "torch threads divided between them)")
    where.add_argument("--devices", help="GPUs for the runs at once, e.g. cuda:0,cuda:1: each run gets its own (default --jobs: their number)")
    where.add_argument("--executor", choices=["local", "ray"], default="local", help="local processes (default) or tasks of a Ray cluster")
    where.add_argument("--address", help="--executor ray: the cluster's address (default auto: the cluster this machine belongs to)")
    where.add_argument("--cpus-per-run", type=float, help="CPUs (torch threads) per run (ray default 1; local default cores // jobs)")
    where.add_argument("--gpus-per-run", type=float, help="--executor ray: GPUs per run (default 0)")
    study.set_defaults(handler=_study)

    compare = commands.add_parser(
        "compare", help="compare runs: headline test metrics per arm and paired differences",
        description="Group runs into arms (recipe name and label fraction), tabulate the test metrics (mean ± sd over seeds) "
                    "and test each arm against the baseline, paired by seed and by test study, Holm-corrected.",
    )
    compare.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_STUDY_DIR")
    compare.add_argument("--baseline", help="the baseline arm: its label, recipe name, or file name in a study "
                                             "(default: the first label in alphabetical order)")
    compare.add_argument("--metric", help="the test metric to compare (default: the first headline metric the plugins declare)")
    compare.add_argument("--out", type=Path, help="write compare.md/csv/png/json and report.html here "
                                                 "(default: the directory given, when there is one)")
    compare.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples (default 2000)")
    compare.set_defaults(handler=_compare)


def _study(args: argparse.Namespace) -> int:
    from corex_study.study import study_command

    return study_command(args)


def _compare(args: argparse.Namespace) -> int:
    from corex_study.compare import compare_runs, markdown, write_comparison
    from corex_study.report import write_study_report

    comparison = compare_runs(args.paths, baseline=args.baseline, metric=args.metric, resamples=args.resamples)
    print(markdown(comparison))
    # One study directory: write beside its runs; never into a single run's own directory.
    single = args.paths[0] if len(args.paths) == 1 and not (args.paths[0] / "results.json").exists() else None
    out = args.out or single
    if out is None:
        print("corex compare: pass --out DIR to write compare.md, compare.csv, compare.png and report.html", file=sys.stderr)
        return 0
    write_comparison(comparison, out)
    write_study_report(out, comparison)
    print(f"wrote {out}/compare.md, compare.csv, compare.png, compare.json and report.html", file=sys.stderr)
    return 0


__getattr__ = lazy_exports(__name__, {
    "compare_runs": "corex_study.compare",
    "write_comparison": "corex_study.compare",
    "write_report": "corex_study.report",
    "write_study_report": "corex_study.report",
})
__all__ = ["compare_runs", "corex_cli", "corex_run_end", "write_comparison", "write_report", "write_study_report"]
