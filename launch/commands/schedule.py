"""`strata schedule plot CONFIG`: draws the config's learning-rate schedule to a PNG.

Reads the `schedule`, `optim.lr` and `train.steps` of a full config (Step-Law `auto` resolved),
builds the schedule exactly as the trainer does (engine/schedules.py) and plots LR over steps.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engine.config import ConfigError, apply_overrides, load_config, read_yaml
from engine.hparams import resolve_auto_hparams
from engine.schedules import Schedule, build_schedule

MAX_PLOT_POINTS = 4000


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("schedule", help="inspect learning-rate schedules")
    actions = parser.add_subparsers(dest="schedule_action", required=True, metavar="ACTION")
    plot = actions.add_parser("plot", help="write a PNG of the LR over steps")
    plot.add_argument("config", help="run config YAML")
    plot.add_argument("--steps", type=int, default=None, help="total steps (default: train.steps)")
    plot.add_argument("--out", default=None, help="PNG path (default: <config stem>_schedule.png)")
    plot.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable (e.g. schedule.name=wsd)",
    )
    plot.add_argument(
        "--current-lr",
        type=float,
        default=None,
        help='LR the run was at, for a rewarm with start_lr: "current"',
    )
    plot.set_defaults(func=run)


def schedule_from_config(
    config: str, overrides: list[str], steps: int | None, current_lr: float | None
) -> Schedule:
    tree = apply_overrides(read_yaml(config), overrides)
    try:
        tree, _ = resolve_auto_hparams(tree)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg = load_config(tree)
    total = steps if steps is not None else cfg.train.steps
    try:
        return build_schedule(cfg.schedule, float(cfg.optim.lr), total, current_lr=current_lr)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def sampled_steps(schedule: Schedule, max_points: int = MAX_PLOT_POINTS) -> list[int]:
    """Every step of a short schedule; ~max_points evenly spaced ones (ends included) of a long one."""
    first, count = schedule.start_step, schedule.total_steps
    stride = max(1, -(-count // max_points))
    return sorted({*range(first, first + count, stride), first + count - 1})


def plot_schedule(schedule: Schedule, out: str | Path, title: str = "") -> Path:
    """Writes LR over [0, total_steps) to `out` (atomically); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sampled_steps(schedule)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.plot(steps, [schedule(s) for s in steps], linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title or schedule.describe(), fontsize=8, wrap=True)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps <= 0:
        print("config error: --steps: must be > 0")
        return 2
    try:
        schedule = schedule_from_config(args.config, args.overrides, args.steps, args.current_lr)
    except ConfigError as err:
        print(f"config error: {err}")
        return 2
    out = args.out or f"{Path(args.config).stem}_schedule.png"
    path = plot_schedule(schedule, out)
    last = schedule.start_step + schedule.total_steps - 1
    print(schedule.describe())
    print(
        f"lr: step 0 = {schedule(0):.4g}, peak = {max(schedule(s) for s in range(last + 1)):.4g}, "
        f"step {last} = {schedule(last):.4g}"
    )
    print(f"wrote {path}")
    return 0
