"""Checkpoint averaging: the weights of several checkpoints of one run, averaged (uniformly or
with given weights) into a new run directory whose checkpoint every other command takes.

Averaging the last checkpoints of a constant- or high-LR phase (LAWA, Sanyal et al. 2023;
"latest weight averaging") gives much of an anneal's gain without spending steps: an anytime
model from a WSD / infinite-schedule run. The new checkpoint is a full one: the averaged
weights, with the newest source checkpoint's optimizer moments, trainer state and config, so
`strata eval`, `export`, `generate` and `resume` (e.g. `--optimizer reset`) all take it.
Averages accumulate in float64, one checkpoint in memory at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

AVERAGED_FILE = "averaged.json"


def checkpoints_to_average(run_or_steps: Sequence[str | Path], last: int | None) -> list[Path]:
    """Intact step directories, oldest first: every one named, or a run's last `last` (all when None)."""
    from engine.checkpoint import list_checkpoints, verify

    paths = [Path(p) for p in run_or_steps]
    if len(paths) == 1 and (paths[0] / "checkpoints").is_dir():
        steps = [p for p in reversed(list_checkpoints(paths[0] / "checkpoints")) if verify(p) is None]
        steps = steps[-last:] if last else steps
    else:
        if last:
            raise ValueError("--last: give one run directory, not step directories")
        steps = paths
        for step in steps:
            problem = verify(step) if step.is_dir() else "no such directory"
            if problem:
                raise ValueError(f"{step}: not an intact checkpoint ({problem})")
    if len(steps) < 2:
        raise ValueError(f"{len(steps)} checkpoint(s) found: averaging needs at least 2")
    runs = {step.parent.parent.resolve() for step in steps}
    if len(runs) > 1:
        raise ValueError(f"checkpoints of {len(runs)} different runs: average one run's checkpoints")
    return sorted(steps, key=lambda p: int(p.name.removeprefix("step_")))


def average_checkpoints(steps: Sequence[Path], out_dir: str | Path, weights: Sequence[float] | None = None) -> Path:
    """Writes OUT_DIR (config.yaml, averaged.json, checkpoints/step_N of the newest step N) and
    returns the new step directory. `weights` (default uniform) are normalized to sum 1."""
    from engine.checkpoint import Checkpointer, step_dir_name
    from engine.config import load_config
    from engine.dist import DistContext
    from engine.export import load_checkpoint_weights
    from engine.optim import build_optimizer
    from models.spec import get_spec

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: pick a new output directory")
    weights = [1.0] * len(steps) if weights is None else [float(w) for w in weights]
    if len(weights) != len(steps) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights: {len(steps)} non-negative numbers with a positive sum expected, got {weights}")
    weights = [w / sum(weights) for w in weights]

    sums: dict[str, torch.Tensor] = {}
    for step, weight in zip(steps, weights, strict=True):
        state, model_cfg, run_dir = load_checkpoint_weights(step)
        for name, tensor in state.items():
            value = tensor.to(torch.float64) * weight
            sums[name] = sums[name] + value if name in sums else value
    newest = steps[-1]
    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        model = get_spec(model_cfg.family).build(model_cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # non-persistent buffers; every parameter is overwritten
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim, float(cfg.optim.lr), ctx.device)
    trainer_state = Checkpointer(newest.parent, ctx).load(newest, model, optimizer)  # moments, counters
    with torch.no_grad():
        own = model.state_dict()
        model.load_state_dict({name: sums[name].to(own[name].dtype) for name in own}, strict=True)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
    if (run_dir / "tokenizer.json").is_file():
        shutil.copy2(run_dir / "tokenizer.json", tmp / "tokenizer.json")
    step = trainer_state.pop("step")
    Checkpointer(tmp / "checkpoints", ctx).save(step, model, optimizer, trainer_state, blocking=True)
    record = {
        "method": "uniform" if len(set(weights)) == 1 else "weighted",
        "checkpoints": [str(p.resolve()) for p in steps],
        "weights": weights,
        "optimizer_and_state_from": str(newest.resolve()),
    }
    (tmp / AVERAGED_FILE).write_text(json.dumps(record, indent=1))
    tmp.rename(out_dir)
    return out_dir / "checkpoints" / step_dir_name(step)
