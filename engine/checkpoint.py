"""Checkpoints: one DCP directory per step, committed atomically, resolved with fallback.

Layout: `<run>/checkpoints/step_00000100/` holding the DCP shards of model + optimizer,
`trainer_state.json` (step, counters, schedule and sampler state: world-size independent),
`rng_rank<r>.bin`, and `COMPLETE` (written last, lists every file's size). A directory
without a valid `COMPLETE` is never loaded; `latest()` falls back to the previous good one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from engine.dist import DistContext, barrier

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_tree(path: Path) -> dict[str, int]:
    sizes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
        sizes[str(file.relative_to(path))] = file.stat().st_size
    return sizes


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker"
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable completion marker"
    for rel, size in sizes.items():
        file = path / rel
        if not file.is_file():
            return f"missing file {rel}"
        if file.stat().st_size != size:
            return f"file {rel} has {file.stat().st_size} bytes, expected {size}"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Committed step directories, newest first (temp directories excluded)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]), reverse=True)


def latest_checkpoint(root: Path) -> Path | None:
    """Newest intact checkpoint under `root`, warning about each broken one it skips."""
    for path in list_checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
        print(f"warning: skipping checkpoint {path}: {problem}; using the previous one", flush=True)
    return None


def resolve_checkpoint(source: str | Path) -> Path:
    """A run directory, a checkpoints directory or one step directory -> an intact step dir."""
    source = Path(source)
    if (source / MARKER).exists() or source.name.startswith("step_"):
        problem = verify(source)
        if problem:
            raise FileNotFoundError(f"checkpoint {source} is not usable: {problem}")
        return source
    for root in (source / "checkpoints", source):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no intact checkpoint under {source}")


class Checkpointer:
    def __init__(self, root: Path, ctx: DistContext, keep_last: int = 3):
        self.root, self.ctx, self.keep_last = Path(root), ctx, keep_last

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        """Writes everything into a temp dir on all ranks, then commits it with a rename."""
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.ctx)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        (tmp / f"rng_rank{self.ctx.rank}.bin").write_bytes(bytes(torch.get_rng_state().tolist()))
        if self.ctx.is_main:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        barrier(self.ctx)
        if self.ctx.is_main:
            sizes = _fsync_tree(tmp)
            (tmp / MARKER).write_text(json.dumps({"step": step, "files": sizes}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        barrier(self.ctx)
        return final

    def _prune(self) -> None:
        good = [p for p in list_checkpoints(self.root) if verify(p) is None]
        for old in good[self.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Restores model (+ optimizer) resharded to this run's mesh; returns the trainer state."""
        if optimizer is None:
            model_sd = get_state_dict(model, [], options=StateDictOptions())[0]
            dcp.load({"model": model_sd}, checkpoint_id=str(path))
            set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / f"rng_rank{self.ctx.rank}.bin"
        if not rng_file.exists():
            rng_file = path / "rng_rank0.bin"
        torch.set_rng_state(torch.tensor(list(rng_file.read_bytes()), dtype=torch.uint8))
        return json.loads((path / STATE_FILE).read_text())
