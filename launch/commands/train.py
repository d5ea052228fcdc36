"""`strata train CONFIG`: train in this process (or as one rank under torchrun / a launcher)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config on this machine",
        description="Train from a YAML config. Under torchrun or a Strata launcher each process is one rank "
        "(RANK/WORLD_SIZE from the environment). Writes the run directory (train.run_dir): config.yaml, "
        "metrics.jsonl, tb/, report.png, checkpoints/.",
    )
    p.add_argument("config", nargs="?", help="YAML config file (optional with --resume: the run's saved config is used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 (repeatable; values parsed as YAML)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest intact checkpoint")
    p.add_argument("--nproc", type=int, default=1,
                   help="spawn this many local processes (gloo on CPU, nccl on GPU); same as `strata submit --launcher local`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.nproc > 1:
        from launch.local import launch_local

        forwarded = ["train"] + ([args.config] if args.config else [])
        forwarded += [x for o in args.overrides for x in ("--set", o)]
        forwarded += ["--resume", args.resume] if args.resume else []
        return launch_local(forwarded, nproc=args.nproc)
    from engine.entry import run_training

    return run_training(args.config, args.overrides, args.resume).exit_code
