"""`strata average RUN_DIR --last K --out DIR` (or STEP_DIR... --out DIR): checkpoint averaging.

Argument parsing and exit codes only; the averaging is engine/average.py.
"""

from __future__ import annotations

import argparse
import sys

from launch.arguments import positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "average",
        help="average the weights of a run's checkpoints into a new checkpoint (LAWA)",
        description="Average the model weights of several checkpoints of one run (its last K, or the step "
        "directories given) into a new run directory with one full checkpoint (the newest source's optimizer "
        "and counters), which strata eval / export / generate / resume take like any other.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="RUN_OR_STEP", help="one run directory, or two or more step directories")
    p.add_argument("--out", required=True, help="new run directory for the averaged checkpoint (must not exist)")
    p.add_argument("--last", type=positive_int, default=None, help="with a run directory: its newest K checkpoints (default all)")
    p.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="weights in the checkpoints' order, oldest first (default uniform; normalized)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.average import average_checkpoints, checkpoints_to_average

    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        print(f"average: error: --weights {args.weights!r}: comma-separated numbers expected", file=sys.stderr)
        return 2
    try:
        steps = checkpoints_to_average(args.checkpoints, args.last)
        step_dir = average_checkpoints(steps, args.out, weights)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"average: error: {err}", file=sys.stderr)
        return 2
    names = ", ".join(p.name for p in steps)
    print(f"averaged {len(steps)} checkpoints ({names}) -> {step_dir}")
    return 0
