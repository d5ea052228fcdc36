"""`strata schedule plot CONFIG`: draws the config's learning-rate schedule to a PNG.

Reads the `schedule`, `optim.lr` and `train.steps` of a full config (Step-Law `auto` resolved),
builds the schedule exactly as the trainer does (engine/schedules.py) and plots LR over steps.
With `--mixture` it also plots the `data.mixture` source weights over steps (data_pipeline/mixture.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ConfigError
from launch.arguments import add_set_argument

if TYPE_CHECKING:
    from data_pipeline.mixture import MixtureSchedule
    from engine.schedules import Schedule

MAX_PLOT_POINTS = 4000


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("schedule", help="inspect learning-rate schedules")
    actions = parser.add_subparsers(dest="schedule_action", required=True, metavar="ACTION")
    plot = actions.add_parser("plot", help="write a PNG of the LR over steps")
    plot.add_argument("config", help="run config YAML")
    plot.add_argument("--steps", type=int, default=None, help="total steps (default: train.steps)")
    plot.add_argument("--out", default=None, help="PNG path (default: <config stem>_schedule.png)")
    add_set_argument(plot)
    plot.add_argument(
        "--current-lr",
        type=float,
        default=None,
        help='LR the run was at, for a rewarm with start_lr: "current"',
    )
    plot.add_argument(
        "--mixture",
        action="store_true",
        help="also plot the data.mixture source weights to <out stem>_mixture.png "
        "(opens data.sources to count their tokens)",
    )
    plot.set_defaults(func=run)


def schedule_from_config(
    config: str, overrides: list[str], steps: int | None, current_lr: float | None
) -> Schedule:
    from engine.config import apply_overrides, load_config, read_yaml
    from engine.hparams import resolve_auto_hparams
    from engine.schedules import build_schedule

    tree = apply_overrides(read_yaml(config), overrides)
    try:
        tree, _ = resolve_auto_hparams(tree)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # --steps after Step Law (`auto` uses the config's train.steps): the schedule is checked over it
    cfg = load_config(tree, _steps_override(steps))
    total = cfg.train.steps
    try:
        return build_schedule(cfg.schedule, float(cfg.optim.lr), total, current_lr=current_lr)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _steps_override(steps: int | None) -> list[str]:
    """`--steps N` as the override it stands for: the schedule spans N steps, not train.steps."""
    return [] if steps is None else [f"train.steps={steps}"]


def sampled_steps(schedule: Schedule, max_points: int = MAX_PLOT_POINTS) -> list[int]:
    """Every step of a short schedule; ~max_points evenly spaced ones (ends included) of a long one."""
    return _spread_steps(schedule.start_step, schedule.total_steps, max_points)


def _spread_steps(first: int, count: int, max_points: int = MAX_PLOT_POINTS) -> list[int]:
    stride = max(1, -(-count // max_points))
    return sorted({*range(first, first + count, stride), first + count - 1})


def mixture_from_config(
    config: str, overrides: list[str], steps: int | None
) -> tuple[list[str], MixtureSchedule, int]:
    """(source names, the mixture the loader would build, total steps) of a full config."""
    from data_pipeline.formats import open_shardset
    from data_pipeline.loader import source_names
    from data_pipeline.mixture import build_mixture
    from engine.config import load_config

    cfg = load_config(config, [*overrides, *_steps_override(steps)])
    if not cfg.data.sources:
        raise ConfigError("data.sources: --mixture needs at least one source")
    total = cfg.train.steps
    counts = []
    for k, source in enumerate(cfg.data.sources):
        try:
            shardset = open_shardset(source.path, cache_dir=cfg.data.cache_dir)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.sources.{k}.path: cannot open {source.path}: {err}") from None
        counts.append(int(shardset.lengths.sum()))
    try:
        names = source_names(cfg.data)
        mixture = build_mixture(
            cfg.data.mixture, counts, [s.weight for s in cfg.data.sources], total
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return names, mixture, total


def plot_mixture(
    names: list[str], mixture: MixtureSchedule, total_steps: int, out: str | Path
) -> Path:
    """Writes each source's weight over [0, total_steps) to `out` (atomically); returns the path."""
    import matplotlib

    from engine.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = _spread_steps(0, total_steps)
    weights = [mixture.weights_at(s) for s in steps]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for k, name in enumerate(names):
        ax.plot(steps, [w[k] for w in weights], linewidth=1.5, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("source weight")
    describe = getattr(getattr(mixture, "cooldown", None), "describe", None)
    ax.set_title(f"mixture: {describe()}" if describe else "mixture: fixed", fontsize=8)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_schedule(schedule: Schedule, out: str | Path, title: str = "") -> Path:
    """Writes LR over [0, total_steps) to `out` (atomically); returns the path."""
    import matplotlib

    from engine.report import save_figure

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
    return save_figure(fig, out)


def run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps <= 0:
        print("config error: --steps: must be > 0", file=sys.stderr)
        return 2
    try:
        schedule = schedule_from_config(args.config, args.overrides, args.steps, args.current_lr)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
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
    if args.mixture:
        try:
            names, mixture, total = mixture_from_config(args.config, args.overrides, args.steps)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
        mixture_path = plot_mixture(
            names, mixture, total, path.with_name(f"{path.stem}_mixture.png")
        )
        first, last = mixture.weights_at(0), mixture.weights_at(total - 1)
        for k, name in enumerate(names):
            print(f"mixture {name}: step 0 = {first[k]:.4f}, step {total - 1} = {last[k]:.4f}")
        print(f"wrote {mixture_path}")
    return 0
