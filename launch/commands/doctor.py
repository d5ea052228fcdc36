"""`strata doctor [CONFIG.yaml]`: what this machine can run, and whether a config can run here.

Prints engine.preflight's checks (machine, packages, launchers; with a config: parallel degrees,
kernels, model size, data, disk, GPU memory) as a table or JSON. Exit 0 when nothing failed,
1 when a check failed (a script can gate `strata submit` on it), 2 for a config that does not load.
"""

from __future__ import annotations

import argparse
import json

from launch.arguments import add_set_argument, positive_int

STYLE = {"ok": "[green]ok[/]", "warning": "[yellow]warning[/]", "failure": "[red]FAIL[/]", "info": "[dim]info[/]"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check this machine (and a config) before a long run",
        description="Checks Python/torch, GPUs, NCCL, optional kernels and launchers; with CONFIG also the "
        "parallel degrees for --nproc, the kernels the model asks for, its size, the data (paths, "
        "tokenizers, vocab), free disk for checkpoints and GPU memory. Exit 1 when a check fails.",
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config to check (optional)")
    add_set_argument(parser)
    parser.add_argument("--nproc", type=positive_int, default=None,
                        help="processes the run will use (default: the config's launch.nproc)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.preflight import FAIL, config_checks, machine_checks

    checks = machine_checks()
    if args.config:
        cfg = load_config(args.config, args.overrides)  # a ConfigError exits 2 naming the field
        nproc = args.nproc or cfg.launch.nproc
        if nproc < 1:
            print("doctor error: --nproc must be >= 1")
            return 2
        checks += config_checks(cfg, nproc)
    failed = [c for c in checks if c.status == FAIL]
    if args.json:
        print(json.dumps({"failed": len(failed), "checks": [c.as_dict() for c in checks]}, indent=1))
    else:
        _print_table(checks, failed)
    return 1 if failed else 0


def _print_table(checks, failed) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="strata doctor")
    for column in ("area", "check", "status", "detail", "hint"):
        table.add_column(column, overflow="fold")
    for c in checks:
        table.add_row(c.area, c.name, STYLE[c.status], escape(c.detail), escape(c.hint))
    console = Console()
    console.print(table)
    console.print(f"{len(failed)} check(s) failed" if failed else "no check failed")
