"""`strata jobs`: the SLURM jobs submitted with `strata submit --launcher slurm` and their state.

Reads the job registry ($STRATA_HOME/slurm_jobs.jsonl) and asks SLURM (scontrol, then sacct)
for each job's state; formatting only, the work is launch.slurm.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "jobs",
        help="list SLURM jobs submitted by `strata submit --launcher slurm` and their state",
        description="Lists the jobs in the registry ($STRATA_HOME/slurm_jobs.jsonl, default ~/.strata) with "
        "their SLURM state, run time, exit code, restarts and output file.",
    )
    p.add_argument("--all", action="store_true", help="every recorded job (default: the last 20)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from launch.slurm import SlurmError, job_states, read_registry

    records = read_registry()
    if not args.all:
        records = records[-20:]
    if not records:
        print("no jobs submitted yet (strata submit CONFIG --launcher slurm)")
        return 0
    try:
        states = job_states([r.job_id for r in records])
    except SlurmError as err:
        print(f"jobs: error: {err}", file=sys.stderr)
        return 2
    rows = []
    for record in records:
        keys = sorted((k for k in states if k == record.job_id or k.startswith(f"{record.job_id}_")),
                      key=lambda k: [int(x) for x in k.split("_")])
        for key in keys or [record.job_id]:
            state = states.get(key, {"state": "UNKNOWN (SLURM no longer remembers it)"})
            rows.append({"job": key, "name": record.job_name, "state": state.get("state", "?"),
                         "elapsed": state.get("elapsed", ""), "exit": state.get("exit", ""),
                         "restarts": state.get("restarts", ""), "run_dir": record.run_dir})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = ("JOB", "NAME", "STATE", "ELAPSED", "EXIT", "RESTARTS", "RUN_DIR")
    table = [header] + [tuple(str(row[k]) for k in ("job", "name", "state", "elapsed", "exit", "restarts", "run_dir"))
                        for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return 0
