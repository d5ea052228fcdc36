"""`strata`: the console entry point; discovers subcommands in launch/commands/.

Maps config errors to exit code 2 with a one-line message naming the field, a checkpoint save
that failed outside the training loop's own handling to 74, and a full disk (ENOSPC, EDQUOT) met
by any command to exit code 1 with a line saying how to go on.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys

from engine.errors import (  # not engine.config: building the parser stays torch-free
    CheckpointSaveError,
    ConfigError,
)
from engine.signals import CHECKPOINT_FAILED_EXIT_CODE

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

DESCRIPTION = """Strata: a distributed pretraining engine for Llama-style and GLA language models.

Typical flow: `strata prepare` (raw text -> token shards), `strata train CONFIG` (one machine)
or `strata submit CONFIG --launcher ray|slurm|local` (cluster), `strata resume` (continual
pretraining), `strata export` (Hugging Face). `strata demo` runs the whole path on the
Python standard library's source. Run `strata COMMAND --help` for each command's options."""


def build_parser() -> argparse.ArgumentParser:
    import launch.commands as commands

    parser = argparse.ArgumentParser(
        prog="strata", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"launch.commands.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    return parser


def _innermost_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command the user chose, e.g. the one of `strata select miniplm`."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = sub.choices.get(getattr(args, sub.dest, None) or "") if sub else None
        if chosen is None:
            return parser
        parser = chosen


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # name the command whose usage applies, not the top-level `strata COMMAND ...`
        _innermost_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except CheckpointSaveError as err:  # where no trainer loop reports it (a continual run's first save, say)
        print(f"strata {args.command}: error: {err}; the checkpoints before it are intact", file=sys.stderr)
        return CHECKPOINT_FAILED_EXIT_CODE
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"strata {args.command}: error: {err.strerror}{where}. What was written before it is kept: free space, "
              "then run the same command again (prepare and convert resume after their last committed shard; "
              "a training run resumes from its last checkpoint with --resume)", file=sys.stderr)  # fmt: skip
        return 1


def run() -> None:
    """The console script: `main` with the process's exit handled (launch/process_exit.py)."""
    from launch.process_exit import run_and_exit

    run_and_exit(main)


if __name__ == "__main__":
    run()
