"""`strata resume SOURCE [--config NEW.yaml]`: continual pretraining from a checkpoint in a new run.

Builds the new run's config (NEW.yaml, or the source run's own config, + --set), writes the
policy (what is kept / reset) into its `continual:` section and trains through the same path as
`strata train --resume NEW_RUN`, so a requeue resumes from the new run's own checkpoints.
`--anneal STEPS` forks an anneal branch; `--from-hf DIR` starts from Hugging Face weights.
The policy itself lives in engine/continual.py; this module only assembles the config.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError
from launch.arguments import add_set_argument, non_negative_int

if TYPE_CHECKING:
    from engine.config import StrataConfig

EPILOG = """policy defaults (a flag beats NEW.yaml's `continual:` section, which beats these):
  optimizer  keep
  step       continue (train.steps of NEW.yaml / --steps = steps to train from the start step)
  schedule   restart with --config (NEW.yaml's schedule from the start step), else continue
  data       continue when the sources are the source run's, else new
--anneal STEPS: optimizer keep, data continue, step continue, schedule = exp/linear anneal from the
  current LR to the infinite schedule's lr_min over STEPS, in <run>-anneal-<step> (source untouched).
--from-hf DIR: weights only (optimizer reset, schedule restart, data new, step reset); needs --config.
After a loss spike: `strata resume RUN/checkpoints/step_N --skip-data 200` (N before the spike)
  goes on with everything continued but the next 200 global batches, never trained on."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "resume",
        help="continue pretraining from a checkpoint (rewarm, new mixture, replay, anneal branch)",
        description="Start a new run from SOURCE (a run dir, its checkpoints/ dir or a step dir) under an "
        "explicit policy: weights always; optimizer keep|reset; schedule continue|restart; data "
        "continue|new; step continue|reset. Prints what was kept and what was reset, writes the policy "
        "into the new run's config.yaml (`continual:`) and trains. Replay = list the old sources with a "
        "weight in NEW.yaml's data.sources.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", nargs="?", help="Strata run dir / checkpoints dir / step dir to start from")
    p.add_argument("--config", help="the new run's YAML (data mixture, schedule, ...); default: the source run's config")
    add_set_argument(p)
    p.add_argument("--run-dir", help="the new run's directory (default: NEW.yaml's train.run_dir, "
                   "<run>-anneal-<step> for --anneal, <run>-resume-<step> without --config)")
    p.add_argument("--steps", type=int, help="steps to train from the start step (default: NEW.yaml's train.steps, "
                   "or what the source run had left)")
    p.add_argument("--optimizer", choices=("keep", "reset"), help="AdamW moments: keep the source's, or reset to zero")
    p.add_argument("--schedule", choices=("continue", "restart"),
                   help="LR: continue the source's schedule, or restart with the new config's (rewarm, infinite...)")
    p.add_argument("--data", choices=("continue", "new"),
                   help="continue the source's sampler position (sources matched by name), or a fresh sampler")
    p.add_argument("--step", choices=("continue", "reset"), help="step counter: go on from the source's, or 0")
    p.add_argument("--skip-data", type=non_negative_int, metavar="STEPS",
                   help="move the data position STEPS global batches on first; they are never trained on "
                   "(after a loss spike: SOURCE = a checkpoint before it)")
    p.add_argument("--anneal", type=int, metavar="STEPS", help="fork an anneal branch of STEPS steps")
    p.add_argument("--anneal-to", type=float, metavar="LR", help="anneal target LR (default: the infinite schedule's lr_min)")
    p.add_argument("--anneal-shape", choices=("exp", "linear"), help="anneal shape (default: the infinite schedule's)")
    p.add_argument("--from-hf", metavar="DIR", help="start from a local Hugging Face Llama directory instead of SOURCE")
    p.add_argument("--nproc", type=int, default=1, help="spawn this many local processes")
    p.add_argument("--no-train", action="store_true",
                   help="only create the new run (config, summary, its first checkpoint); train later with "
                   "`strata train --resume RUN_DIR`")
    p.set_defaults(func=run)


def _same_sources(a: dict, b: dict) -> bool:
    """Whether two config trees' data.sources name the same ShardSets (weights may differ)."""

    def key(tree: dict) -> set[tuple[str, str]]:
        sources = (tree.get("data") or {}).get("sources") or []
        return {
            (s.get("name") or os.path.basename(os.path.normpath(s["path"])), os.path.abspath(s["path"]))
            for s in sources
        }

    return key(a) == key(b)


def build_resume_config(args: argparse.Namespace) -> tuple[StrataConfig, list[str]]:
    """The new run's resolved config (policy pinned in `continual:`) and notes on the choices made."""
    from engine.config import apply_overrides, load_config, read_yaml
    from engine.continual import (
        anneal_schedule,
        default_anneal_run_dir,
        read_source,
        resolve_continual,
    )

    if (args.source is None) == (args.from_hf is None):
        raise ConfigError("give a SOURCE checkpoint or --from-hf DIR (exactly one)")
    flags = {name: getattr(args, name) for name in ("optimizer", "schedule", "data", "step")}
    if args.anneal is not None and args.steps is not None:
        raise ConfigError("--steps: an anneal branch runs --anneal STEPS steps; give one of them")
    notes: list[str] = []
    if args.from_hf is not None:
        return _from_hf_config(args, flags), notes

    source = read_source(args.source)
    source_config = source.run_dir / "config.yaml"
    if not source_config.is_file():
        raise ConfigError(f"{args.source}: no config.yaml in its run directory {source.run_dir}")
    source_tree = read_yaml(source_config)
    source_tree.pop("continual", None)  # the source's own lineage; this run gets its own policy
    tree = read_yaml(args.config) if args.config else copy.deepcopy(source_tree)
    source_model = dict(source_tree.get("model") or {})
    if "model" not in tree:  # the architecture (and so the tokenizer's vocab) is the source's
        tree["model"] = source_model
        notes.append("model: the source run's (the new config has no model section)")
    elif set(source_model) - set(tree["model"] or {}):  # a partial section changes just those fields
        given = dict(tree["model"] or {})
        tree["model"] = {**source_model, **given}
        notes.append(f"model: the source run's, with this config's {', '.join(sorted(given)) or 'nothing'}")
    tree = apply_overrides(tree, list(args.overrides))
    from_yaml = dict(tree.pop("continual", None) or {})
    stray = sorted(set(from_yaml) - {"optimizer", "schedule", "data", "step", "skip_data_steps"})
    if stray:
        raise ConfigError(
            f"continual.{stray[0]}: a config given to `strata resume` sets only the policy "
            "(optimizer, schedule, data, step, skip_data_steps); the source is the SOURCE argument"
        )
    defaults = {
        "optimizer": "keep",
        "step": "continue",
        "schedule": "restart" if args.config else "continue",
        "data": "continue" if _same_sources(tree, source_tree) else "new",
    }
    if args.anneal is not None:
        for name, allowed in (("schedule", "restart"), ("step", "continue")):
            if flags[name] not in (None, allowed):
                raise ConfigError(f"--{name} {flags[name]}: an anneal branch needs {name} {allowed!r}")
        defaults.update(schedule="restart", data="continue")
        from_yaml = {k: v for k, v in from_yaml.items() if k not in ("schedule", "step")}
    policy = {name: flags[name] or from_yaml.get(name) or defaults[name] for name in defaults}
    load_config({"continual": {"source": str(source.path), **policy}})  # contradictions first
    for name in ("schedule", "data") if args.anneal is None else ():
        if not flags[name] and name not in from_yaml:
            why = {
                "schedule": "a new config was given" if args.config else "no new config was given",
                "data": "same sources as the source run" if policy["data"] == "continue" else "the mixture changed",
            }[name]
            notes.append(f"{name}: {policy[name]!r} by default ({why})")

    start = source.step if policy["step"] == "continue" else 0
    if args.anneal is not None:
        section, warning = anneal_schedule(source, args.anneal, args.anneal_to, args.anneal_shape)
        if args.config and "schedule" in (read_yaml(args.config) or {}):
            notes.append("the schedule section of --config is replaced by the anneal")
        tree["schedule"] = section
        phase = section["phases"][0]
        notes.append(
            f"anneal branch: {phase['anneal_shape']} anneal of the LR from {phase['lr_max']:.4g} to "
            f"{phase['lr_max'] * phase['min_ratio']:.4g} over {args.anneal} steps"
        )
        notes += [warning] if warning else []
        length = args.anneal
    elif args.anneal_to is not None or args.anneal_shape is not None:
        raise ConfigError("--anneal-to / --anneal-shape: only with --anneal STEPS")
    elif args.steps is not None:
        length = args.steps
    elif args.config:
        length = load_config(tree).train.steps
    else:
        length = int((source_tree.get("train") or {}).get("steps", 0)) - source.step
        if length <= 0:
            raise ConfigError(
                f"--steps: the source run's train.steps is reached at step {source.step}; give --steps N"
            )
    if length <= 0:
        raise ConfigError(f"--steps: needs a positive number of steps, got {length}")

    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.anneal is not None:
        run_dir = default_anneal_run_dir(source)
    elif args.config:  # judged with this run's length: its schedule must fit the steps it will run
        run_dir = Path(load_config(apply_overrides(tree, [f"train.steps={start + length}"])).train.run_dir)
    else:
        run_dir = source.run_dir.parent / f"{source.run_dir.name}-resume-{source.step}"
    if run_dir.resolve() == source.run_dir.resolve():
        raise ConfigError(f"train.run_dir: {run_dir} is the source run; a continual run needs its own (--run-dir)")
    tree = apply_overrides(tree, [f"train.run_dir={run_dir}", f"train.steps={start + length}"])
    skip = args.skip_data if args.skip_data is not None else from_yaml.get("skip_data_steps", 0)
    tree["continual"] = {"source": str(source.path), **policy, "skip_data_steps": skip}
    return resolve_continual(load_config(tree)), notes


def _from_hf_config(args: argparse.Namespace, flags: dict[str, Any]) -> StrataConfig:
    from engine.config import apply_overrides, load_config, read_yaml
    from engine.continual import resolve_continual
    from launch.commands.import_hf import merge_hf_architecture

    if args.anneal is not None:
        raise ConfigError("--anneal: needs a Strata checkpoint SOURCE (an HF directory has no schedule)")
    if not args.config:
        raise ConfigError("--from-hf: needs --config NEW.yaml (data, optim, schedule, train)")
    tree = apply_overrides(read_yaml(args.config), list(args.overrides))
    tree.pop("continual", None)
    tree = merge_hf_architecture(tree, args.from_hf)
    length = args.steps if args.steps is not None else load_config(tree).train.steps
    overrides = [f"train.steps={length}"] + ([f"train.run_dir={args.run_dir}"] if args.run_dir else [])
    tree = apply_overrides(tree, overrides)
    policy = {"optimizer": "reset", "schedule": "restart", "data": "new", "step": "reset"}
    policy.update({k: v for k, v in flags.items() if v})
    tree["continual"] = {"from_hf": str(Path(args.from_hf).resolve()), **policy, "skip_data_steps": args.skip_data or 0}
    return resolve_continual(load_config(tree))


def run(args: argparse.Namespace) -> int:
    from engine.checkpoint import latest_checkpoint
    from engine.config import dump_config

    cfg, notes = build_resume_config(args)
    run_dir = Path(cfg.train.run_dir)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        print(f"resume error: {run_dir} already has checkpoints; continue it with `strata train --resume {run_dir}`", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    hf_tokenizer = Path(cfg.continual.from_hf or "") / "tokenizer.json"
    if cfg.continual.from_hf and hf_tokenizer.is_file():  # what `strata export` will ship
        shutil.copyfile(hf_tokenizer, run_dir / "tokenizer.json")
    for note in notes:
        print(f"note: {note}", flush=True)
    if args.no_train:
        from engine.dist import init_distributed, shutdown
        from engine.trainer import Trainer

        ctx = init_distributed(cfg.train.device)
        try:
            Trainer(cfg, ctx, resume=True).loader.close()
        finally:
            shutdown()
        print(f"created {run_dir}; train it with `strata train --resume {run_dir}`", flush=True)
        return 0
    if args.nproc > 1:
        from launch.local import launch_local

        return launch_local(["train", "--resume", str(run_dir)], nproc=args.nproc)
    from engine.entry import run_training

    return run_training(None, [], resume=str(run_dir)).exit_code
