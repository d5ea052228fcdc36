"""Continual pretraining: the `continual:` config section and starting a run from another run's state.

Owns the policy of what a new run takes from its source (weights always; optimizer keep/reset;
schedule continue/restart; data position continue/new; step counter continue/reset), pinning it
in the run's config, applying it to a built Trainer, the kept/reset summary, and anneal branches
(METHODS.md §5-§7). It does not parse command lines (launch/commands/resume.py) nor run the loop.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.schedules import Schedule, ScheduleConfig, build_schedule, schedule_from_state_dict

if TYPE_CHECKING:  # engine.config imports this module (the `continual` field)
    from engine.config import StrataConfig
    from engine.trainer import Trainer

STRICT = ConfigDict(extra="forbid", validate_assignment=True)
SUMMARY_FILE = "continual.json"
_POLICY_FIELDS = ("optimizer", "schedule", "data", "step", "skip_data_steps")
_RESOLVED_FIELDS = ("start_step", "current_lr", "source_schedule")


class ContinualConfig(BaseModel):
    """What a run takes from the checkpoint (or HF model) it starts from; empty = a fresh run.

    A run's own checkpoints always win: `strata train --resume RUN` of a continual run resumes
    from them, and the policy only applies while the run has none. The last three fields are
    filled in when the run starts (from the source checkpoint) and pin it for later resumes.
    """

    model_config = STRICT

    source: str | None = Field(
        None, description="Strata checkpoint to start from: run dir, checkpoints dir or step dir"
    )
    from_hf: str | None = Field(
        None, description="local Hugging Face Llama directory to start from (weights only)"
    )
    optimizer: Literal["keep", "reset"] = Field(
        "keep", description="keep: AdamW moments/step counts from the source; reset: fresh (zero) moments"
    )
    schedule: Literal["continue", "restart"] = Field(
        "restart",
        description="continue: the source's LR schedule goes on; restart: this config's `schedule` "
        "starts at the start step (rewarm start_lr 'current' = the source's LR there)",
    )
    data: Literal["continue", "new"] = Field(
        "new",
        description="continue: sampler step and per-source cursors from the source (sources matched "
        "by name; a new source starts at its beginning); new: a fresh sampler over data.sources",
    )
    step: Literal["continue", "reset"] = Field(
        "continue",
        description="continue: the step counter goes on from the source's step (train.steps is the "
        "global end step); reset: count from 0",
    )
    skip_data_steps: int = Field(
        0,
        ge=0,
        description="global batches the data position moves on before the first step, never trained on "
        "(after a loss spike: start from a checkpoint before it and skip past the data, as PaLM did)",
    )
    start_step: int | None = Field(None, ge=0, description="resolved: the step this run starts at")
    current_lr: float | None = Field(
        None, ge=0, description="resolved: the LR the source would have used at its next step"
    )
    source_schedule: dict[str, Any] | None = Field(
        None, description="resolved, schedule=continue only: the source's schedule state"
    )

    @property
    def active(self) -> bool:
        return self.source is not None or self.from_hf is not None

    @property
    def resolved(self) -> bool:
        return self.start_step is not None

    @model_validator(mode="before")
    @classmethod
    def _hf_defaults(cls, data: Any) -> Any:
        """An HF directory has no optimizer state: from_hf defaults to optimizer 'reset'."""
        if isinstance(data, dict) and data.get("from_hf") is not None and "optimizer" not in data:
            return {**data, "optimizer": "reset"}
        return data

    @model_validator(mode="after")
    def _check_policy(self) -> ContinualConfig:
        if self.source is not None and self.from_hf is not None:
            raise ValueError("source: give either a Strata checkpoint (source) or from_hf, not both")
        if not self.active:
            fields = type(self).model_fields  # a dumped default section reloads cleanly
            stray = sorted(
                name
                for name in (*_POLICY_FIELDS, *_RESOLVED_FIELDS)
                if getattr(self, name) != fields[name].get_default(call_default_factory=True)
            )
            if stray:
                raise ValueError(
                    f"{stray[0]}: set, but no continual.source or continual.from_hf to apply it to "
                    "(start the run with `strata resume SOURCE --config THIS.yaml`)"
                )
            return self
        if self.from_hf is not None:
            checkpoint_only = {"optimizer": "keep", "schedule": "continue", "data": "continue"}
            for name, value in checkpoint_only.items():
                if getattr(self, name) == value:
                    raise ValueError(
                        f"{name}: {value!r} needs a Strata checkpoint; an HF directory (from_hf) holds weights only"
                    )
        if self.schedule == "continue" and self.step == "reset":
            raise ValueError(
                "schedule: 'continue' needs step 'continue' (the source's schedule is a function of its step counter)"
            )
        if self.schedule == "continue" and self.resolved and self.source_schedule is None:
            raise ValueError("source_schedule: schedule 'continue' needs the source's schedule state")
        return self


# --------------------------------------------------------------------------- the source checkpoint


@dataclass(frozen=True)
class SourceState:
    """The parts of a source checkpoint read without loading tensors."""

    path: Path  # the step directory
    step: int
    tokens_seen: int
    schedule: dict[str, Any] | None
    loader: dict[str, Any] | None

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent

    def lr_at_step(self) -> float | None:
        """The LR the source would have used for its next update (None without schedule state)."""
        if self.schedule is None:
            return None
        old = schedule_from_state_dict(self.schedule)
        return old(self.step) if self.step >= old.start_step else None


def read_source(source: str | Path) -> SourceState:
    """A run dir / checkpoints dir / step dir -> its newest intact checkpoint's step and states."""
    from engine.checkpoint import STATE_FILE, resolve_checkpoint
    from engine.config import ConfigError

    try:
        path = resolve_checkpoint(source).resolve()
    except FileNotFoundError as err:
        raise ConfigError(f"continual.source: {err}") from None
    state = json.loads((path / STATE_FILE).read_text())
    return SourceState(
        path=path,
        step=int(state["step"]),
        tokens_seen=int(state.get("tokens_seen", 0)),
        schedule=state.get("schedule"),
        loader=state.get("loader"),
    )


# --------------------------------------------------------------------------- config resolution


def resolve_continual(cfg: StrataConfig) -> StrataConfig:
    """Pins a continual run to its source: the step directory, start step, the source's LR there
    and (schedule=continue) its schedule state. A fresh or already resolved config is returned as is.

    `train.steps` stays the global step the run ends at; it must exceed the start step.
    """
    from engine.config import ConfigError

    policy = cfg.continual
    if not policy.active or policy.resolved:
        return cfg
    updates: dict[str, Any] = {"start_step": 0}
    if policy.source is not None:
        source = read_source(policy.source)
        if policy.schedule == "continue" and source.schedule is None:
            raise ConfigError(f"continual.schedule: 'continue', but {source.path} holds no schedule state")
        updates = {
            "source": str(source.path),
            "start_step": source.step if policy.step == "continue" else 0,
            "current_lr": source.lr_at_step(),
            "source_schedule": source.schedule if policy.schedule == "continue" else None,
        }
    resolved = cfg.model_copy(deep=True)
    resolved.continual = ContinualConfig.model_validate({**policy.model_dump(), **updates})
    run_schedule(resolved, resolved.optim.lr)  # fail now, naming the field, not mid-start
    return resolved


def run_schedule(cfg: StrataConfig, lr_max: float) -> Schedule:
    """The LR schedule of a run: this config's schedule over [start step, train.steps), or the
    source's schedule (continual.schedule=continue). A fresh run starts at step 0."""
    from engine.config import ConfigError

    policy = cfg.continual
    if policy.source_schedule is not None:
        return schedule_from_state_dict(policy.source_schedule)
    start = policy.start_step or 0
    if cfg.train.steps <= start:
        raise ConfigError(
            f"train.steps: {cfg.train.steps} is the global step the run ends at and must exceed the "
            f"continual start step {start} (`strata resume --steps N` counts N from the start step)"
        )
    try:
        return build_schedule(
            cfg.schedule, lr_max, cfg.train.steps - start, start_step=start, current_lr=policy.current_lr
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


# --------------------------------------------------------------------------- anneal branches


def anneal_schedule(
    source: SourceState, steps: int, to_lr: float | None = None, shape: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """(schedule section, warning or None) of a branch that anneals from the source's current LR.

    Target LR and shape default to the source's infinite schedule (`min_ratio * lr_max`,
    `anneal_shape`, METHODS.md §5); other schedules need `to_lr`. The warning says when the
    source step is not in the constant phase (the branch then starts from whatever LR it was at).
    """
    from engine.config import ConfigError

    if steps <= 0:
        raise ConfigError(f"--anneal: needs a positive number of steps, got {steps}")
    current = source.lr_at_step()
    if current is None:
        raise ConfigError(f"--anneal: {source.path} holds no schedule state to read its current LR from")
    infinite = _infinite_shape(source.schedule)
    if infinite is None and to_lr is None:
        raise ConfigError(
            "--anneal-to: the source's schedule is not 'infinite', so the anneal target LR is unknown; give --anneal-to LR"
        )
    warning = None
    if infinite is not None:
        shape_cfg, lr_max = infinite
        lr_const = shape_cfg.const_ratio * lr_max
        if to_lr is None:
            to_lr = shape_cfg.min_ratio * lr_max
        shape = shape or shape_cfg.anneal_shape
        if not math.isclose(current, lr_const, rel_tol=1e-6):
            warning = (
                f"step {source.step} is not in the infinite schedule's constant phase (LR {current:.4g}, "
                f"constant phase {lr_const:.4g}); annealing from {current:.4g}"
            )
    shape = shape or "exp"
    if not 0 <= to_lr < current:
        raise ConfigError(f"--anneal-to: the target LR {to_lr:.4g} must be >= 0 and below the current LR {current:.4g}")
    phase = {
        "name": "infinite",
        "lr_max": current,
        "warmup_steps": 0,
        "cooldown_end": 0,
        "anneal_start": 0,
        "const_ratio": 1.0,
        "min_ratio": to_lr / current,
        "anneal_shape": shape,
    }
    section = {"phases": [phase]}
    try:
        ScheduleConfig.model_validate(section)
    except ValueError as err:
        raise ConfigError(f"--anneal: {err}") from None
    return section, warning


def _infinite_shape(state: dict[str, Any] | None) -> tuple[Any, float] | None:
    """(the infinite shape's config, its lr_max) of a schedule state: the top-level shape, or the
    last infinite phase; None when the schedule has no infinite part."""
    if state is None:
        return None
    cfg = ScheduleConfig.model_validate(state["config"])
    if not cfg.phases:
        return (cfg, float(state["lr_max"])) if cfg.name == "infinite" else None
    for phase in reversed(cfg.phases):
        if phase.name == "infinite":
            return phase, float(phase.lr_max or state["lr_max"])
    return None


def default_anneal_run_dir(source: SourceState) -> Path:
    """`<source run>-anneal-<step>`, next to the source run."""
    return source.run_dir.parent / f"{source.run_dir.name}-anneal-{source.step}"


# --------------------------------------------------------------------------- applying the policy


def fresh_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Gives every parameter the state a never-stepped Adam/AdamW creates on its first step (step 0,
    zero moments), so a reset optimizer can be checkpointed without DCP's state initialization
    (a zero-gradient step that would make the first real update's bias correction use step 2)."""
    from torch.optim.optimizer import _get_scalar_dtype

    optimizer.state.clear()
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            if not param.requires_grad:
                continue
            state = optimizer.state[param]
            if on_device:
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=param.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def check_model_matches(path: Path, model: torch.nn.Module) -> None:
    """The checkpoint holds exactly this model's tensors with the same global shapes."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from engine.config import ConfigError

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {
        key.removeprefix("model."): tuple(meta.size)
        for key, meta in metadata.items()
        if key.startswith("model.") and hasattr(meta, "size")
    }
    own = {name: tuple(tensor.shape) for name, tensor in get_model_state_dict(model).items()}
    if hasattr(model, "whole_model_shapes"):  # pipeline stages (engine.pipeline): this rank loads its share
        own = model.whole_model_shapes()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"model: this config's model does not match the checkpoint {path} "
            f"(missing there: {missing[:3]}, only there: {unexpected[:3]}); keep the source run's model section"
        )
    for name, shape in own.items():
        if saved[name] != shape:
            raise ConfigError(
                f"model: {name} has shape {saved[name]} in the checkpoint {path}, {shape} in this config; "
                "keep the source run's model section"
            )


@dataclass
class ContinualSummary:
    """What a continual run took from its source and what it reset (printed and saved as JSON)."""

    run_dir: str
    source: str
    source_step: int | None
    weights: str
    optimizer: str
    step: dict[str, Any]
    schedule: dict[str, Any]
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        step, sched, data = self.step, self.schedule, self.data
        origin = f" (step {self.source_step})" if self.source_step is not None else ""
        out = [f"continual run {self.run_dir} <- {self.source}{origin}", f"  weights:   {self.weights}"]
        out.append(f"  optimizer: {self.optimizer}")
        counted = f"{step['end'] - step['start']} steps"
        if step["policy"] == "continue":
            out.append(
                f"  step:      continued at {step['start']} -> ends at {step['end']} ({counted}; "
                f"{step['tokens_seen']:,} tokens seen before)"
            )
        else:
            out.append(f"  step:      reset to 0 -> ends at {step['end']} ({counted})")
        source_lr = f" (the source's LR there: {sched['source_lr']:.4g})" if sched.get("source_lr") is not None else ""
        verb = "continued (the source's schedule)" if sched["policy"] == "continue" else "restarted (this config's schedule)"
        out.append(f"  schedule:  {verb}: {sched['describe']}{source_lr}")
        verb = "continued (sampler position from the source)" if data["policy"] == "continue" else "new (fresh sampler)"
        out.append(f"  data:      {verb}, sampler step {data['sampler_step']}")
        for source in data["sources"]:
            where = (
                f"at epoch {source['epoch_start']:.2f}" if source["cursor"] else "from its start"
            )
            replay = " [in the source run's mixture]" if source["in_source_run"] else ""
            out.append(
                f"    {source['name']}: weight {source['weight']:.0%}, {where}, ~{source['epoch_end']:.2f} "
                f"epochs by the end{replay}"
            )
        if data["dropped"]:
            out.append(f"    not in this mixture (dropped): {', '.join(data['dropped'])}")
        out += [f"  note: {note}" for note in self.notes]
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def start_continual_run(trainer: Trainer, notes: list[str] | None = None) -> ContinualSummary:
    """Applies the (resolved) policy to a freshly built trainer, saves the run's own first
    checkpoint (so later resumes never need the source again), prints and saves the summary."""
    from engine.config import ConfigError
    from engine.export import load_hf_into_model

    cfg, policy = trainer.cfg, trainer.cfg.continual
    if not policy.resolved:
        raise ValueError("start_continual_run needs a resolved config (engine.continual.resolve_continual)")
    source: SourceState | None = None
    if policy.from_hf is not None:
        load_hf_into_model(trainer.model, policy.from_hf)
        weights = f"loaded from the Hugging Face directory {policy.from_hf}"
    else:
        source = read_source(policy.source)
        check_model_matches(source.path, trainer.model)
        keep = policy.optimizer == "keep"
        # Optimizer hyperparameters are this config's; only moments and step counts carry over.
        hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
        trainer.checkpointer.load(source.path, trainer.model, trainer.optimizer if keep else None)
        if keep:
            for group, values in zip(trainer.optimizer.param_groups, hyperparameters, strict=True):
                group.update(values)
        weights = f"loaded from {source.path}"
    if policy.optimizer == "reset":
        fresh_adam_state(trainer.optimizer)
        optimizer = "reset (fresh AdamW: zero moments, step 0)"
    else:
        optimizer = "kept (AdamW moments and step counts from the source; lr/betas/eps/weight decay from this config)"
    trainer.step = int(policy.start_step)
    trainer.tokens_seen = source.tokens_seen if source is not None and policy.step == "continue" else 0
    if policy.data == "continue":
        try:
            trainer.loader.load_state_dict(source.loader)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"continual.data: 'continue' cannot take the source's data position: {err}") from None
    notes = list(notes or [])
    if policy.skip_data_steps:
        trainer.loader.skip(policy.skip_data_steps)
        skipped_tokens = policy.skip_data_steps * cfg.data.global_batch_size * cfg.data.seq_len
        notes.append(f"data: {policy.skip_data_steps} global batches (~{skipped_tokens:,} tokens) skipped, never trained on")
    if policy.schedule == "continue":
        old = trainer.schedule
        if old.cfg != cfg.schedule:  # e.g. no --config: the source's own section, which is what goes on
            notes.append("this config's schedule section is not used (schedule: continue)")
        if old.start_step + old.total_steps < cfg.train.steps:
            notes.append(
                f"the source's schedule ends at step {old.start_step + old.total_steps}; later steps keep "
                f"its final LR {old(cfg.train.steps - 1):.4g}"
            )
    summary = ContinualSummary(
        run_dir=str(trainer.run_dir),
        source=str(source.path) if source else str(policy.from_hf),
        source_step=source.step if source else None,
        weights=weights,
        optimizer=optimizer,
        step={
            "policy": policy.step,
            "start": trainer.step,
            "end": cfg.train.steps,
            "tokens_seen": trainer.tokens_seen,
        },
        schedule={
            "policy": policy.schedule,
            "describe": trainer.schedule.describe(),
            "source_lr": policy.current_lr,
            "first_lr": trainer.schedule(trainer.step),
        },
        data=_data_summary(trainer, source),
        notes=notes,
    )
    trainer.save()
    if trainer.ctx.is_main:
        print("\n".join(summary.lines()), flush=True)
        tmp = trainer.run_dir / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary.to_json(), indent=1))
        tmp.replace(trainer.run_dir / SUMMARY_FILE)
    return summary


def _mean_mixture_weights(trainer: Trainer, first_step: int, steps: int) -> list[float]:
    """Each source's share of the coming `steps` sampler steps: the mixture's weights averaged
    over (at most 256 evenly spaced) steps, so a temperature cooldown is counted as it moves."""
    mixture = getattr(getattr(trainer.loader, "sampler", None), "mixture", None)
    if mixture is None:  # a loader without a sampler (tests, benchmarks): the config's weights
        weights = [s.weight for s in trainer.cfg.data.sources]
        return [w / (sum(weights) or 1.0) for w in weights]
    probe = np.unique(np.linspace(first_step, first_step + steps - 1, num=min(steps, 256)).round())
    return np.mean([mixture.weights_at(int(step)) for step in probe], axis=0).tolist()


def _data_summary(trainer: Trainer, source: SourceState | None) -> dict[str, Any]:
    """Per source: weight, where it starts, and the epochs it will have gone through by the end
    (a small subset trained for several epochs, METHODS.md §7 recipe 1, shows up here)."""
    cfg, policy = trainer.cfg, trainer.cfg.continual
    state = trainer.loader.state_dict()
    before = set((source.loader or {}).get("sources", {})) if source is not None else set()
    steps_left = max(cfg.train.steps - trainer.step, 1)
    run_tokens = steps_left * cfg.data.global_batch_size * cfg.data.seq_len
    shares = _mean_mixture_weights(trainer, int(state.get("step", 0)), steps_left)
    sources = []
    for (name, entry), share in zip(state.get("sources", {}).items(), shares, strict=False):
        share = float(share)
        per_epoch = max(int(entry["tokens_per_epoch"]), 1)
        sources.append(
            {
                "name": name,
                "weight": share,
                "cursor": int(entry["cursor"]),
                "epoch_start": entry["cursor"] / per_epoch,
                "epoch_end": (entry["cursor"] + share * run_tokens) / per_epoch,
                "in_source_run": name in before,
            }
        )
    dropped = sorted(before - {s["name"] for s in sources})
    return {"policy": policy.data, "sampler_step": int(state.get("step", 0)), "sources": sources, "dropped": dropped}
