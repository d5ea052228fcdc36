"""`strata train CONFIG`: train in this process (or as one rank under torchrun / a launcher)."""

from __future__ import annotations

import argparse

from launch.arguments import add_set_argument, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config on this machine",
        description="Train from a YAML config. Under torchrun or a Strata launcher each process is one rank "
        "(RANK/WORLD_SIZE from the environment). Writes the run directory (train.run_dir): config.yaml, "
        "metrics.jsonl, tb/, report.png, checkpoints/.",
    )
    p.add_argument("config", nargs="?", help="YAML config file (optional with --resume: the run's saved config is used)")
    add_set_argument(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest intact checkpoint")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="spawn this many local processes (gloo on CPU, nccl on GPU); same as `strata submit --launcher local`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.entry import check_new_run_dir, resolve_config

    if args.resume is None:  # a new run: never on top of another one's checkpoints
        check_new_run_dir(resolve_config(args.config, args.overrides, None).train.run_dir)
    if args.nproc > 1:
        from launch.local import check_before_spawning, launch_local

        check_before_spawning(resolve_config(args.config, args.overrides, args.resume), args.nproc)

        forwarded = ["train"] + ([args.config] if args.config else [])
        forwarded += [x for o in args.overrides for x in ("--set", o)]
        forwarded += ["--resume", args.resume] if args.resume else []
        return launch_local(forwarded, nproc=args.nproc)
    from engine.entry import run_training

    return run_training(args.config, args.overrides, args.resume).exit_code
