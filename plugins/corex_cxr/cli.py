"""``corex data phantom``: the command line of :func:`corex_cxr.phantom.write_siim_phantom`.

Building the parser imports nothing heavy (``corex --help`` builds every plugin's parsers); the
handler imports the generator when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from corex import hookimpl


@hookimpl
def corex_cli(data_commands: argparse._SubParsersAction) -> None:
    """Add ``corex data phantom OUT --studies N [--seed S] [--size PX] [--difficulty D]
    [--label-noise P] [--hard-subgroup none|ap_portable] [--hard-subgroup-strength X]``."""
    parser = data_commands.add_parser(
        "phantom",
        help="write a synthetic chest X-ray data set in the SIIM-FISABIO-RSNA layout",
        description="Write synthetic chest radiographs (DICOM) with study-level labels and opacity "
        "boxes in the SIIM-FISABIO-RSNA COVID-19 layout, readable by the SIIM loader.",
    )
    parser.add_argument("out", type=Path, help="folder to create (must not exist or be empty)")
    parser.add_argument("--studies", type=int, required=True, help="number of studies")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument(
        "--difficulty", type=float, default=0.5,
        help="0 = strong canonical findings, 1 = faint, overlapping findings (default 0.5)",
    )
    parser.add_argument(
        "--label-noise", type=float, default=0.0,
        help="fraction of studies relabelled to a random other class (default 0)",
    )
    parser.add_argument(
        "--hard-subgroup", choices=("none", "ap_portable"), default="none",
        help="plant a harder subgroup: AP portable images rendered foggier and noisier (default none)",
    )
    parser.add_argument(
        "--hard-subgroup-strength", type=float, default=0.5,
        help="how much harder, 0 to 1 (default 0.5)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from corex_cxr.phantom import write_siim_phantom

    try:
        out = write_siim_phantom(
            args.out, studies=args.studies, seed=args.seed, size=args.size,
            difficulty=args.difficulty, label_noise=args.label_noise,
            hard_subgroup=args.hard_subgroup, hard_subgroup_strength=args.hard_subgroup_strength,
        )
    except (ValueError, FileExistsError) as error:
        print(f"corex data phantom: error: {error}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "phantom.json").read_text())
    print(f"wrote {manifest['studies']} studies ({manifest['images']} images) to {out}")
    return 0


__all__ = ["corex_cli"]
