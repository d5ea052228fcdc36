"""`strata logs JOB`: print (or follow) the output of a SLURM job submitted by Strata.

Finds the output file through scontrol, or the job registry once SLURM forgot the job; the
lookup lives in launch.slurm.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "logs",
        help="print the output of a SLURM job submitted by `strata submit --launcher slurm`",
        description="Print a job's output file (all ranks, and every requeued restart: the file is appended). "
        "Array elements are named ARRAYJOB_INDEX, e.g. 1234_0.",
    )
    p.add_argument("job", metavar="JOB", help="job id, or ARRAYJOB_INDEX for an array element")
    p.add_argument("-n", "--tail", type=int, default=0, metavar="N", help="only the last N lines (default: all)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the job ends")
    p.set_defaults(func=run)


def _job_finished(job_id: str) -> bool:
    """True once SLURM reports a final state (or no longer knows the job)."""
    from launch.slurm import job_states

    states = job_states([job_id])
    if not states:
        return True
    return all(s.get("state", "").split(" ")[0] in FINISHED for s in states.values())


def run(args: argparse.Namespace) -> int:
    from launch.slurm import SlurmError, find_log

    try:
        path = find_log(args.job)
    except SlurmError as err:
        print(f"logs: error: {err}", file=sys.stderr)
        return 2
    if path is None:
        print(f"logs: job {args.job} is neither known to SLURM nor in the Strata job registry", file=sys.stderr)
        return 1
    if not path.exists() and not args.follow:
        print(f"logs: {path} does not exist yet (the job may still be pending)", file=sys.stderr)
        return 1
    position = _print_existing(path, args.tail)
    while args.follow:
        finished = _job_finished(args.job)
        position = _print_from(path, position)
        if finished:
            break
        time.sleep(1.0)
    return 0


def _print_existing(path: Path, tail: int) -> int:
    if not path.exists():
        return 0
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    if tail:
        text = "".join(text.splitlines(keepends=True)[-tail:])
    sys.stdout.write(text)
    sys.stdout.flush()
    return len(data)


def _print_from(path: Path, position: int) -> int:
    if not path.exists():
        return position
    with path.open("rb") as handle:
        handle.seek(position)
        chunk = handle.read()
    sys.stdout.write(chunk.decode("utf-8", errors="replace"))
    sys.stdout.flush()
    return position + len(chunk)
