"""Learning-rate schedules: the `schedule:` config section and pure functions of the step.

Owns every LR shape (constant, linear, cosine, WSD, inverse-sqrt, infinite, rewarm), their
composition in sequence, and their checkpoint state. It does not touch the optimizer: the
trainer sets `param_group["lr"] = schedule(step)` before each update.

Step convention (one rule for every shape): `schedule(step)` is the LR of the update made at
0-based optimizer step `step`, and the formulas below are written in `t = step - start_step + 1`,
the 1-based count of that update. Hence with warmup `T_w` the first update uses
`lr_max * 1 / T_w` (never a wasted lr=0 step), update `T_w` reaches `lr_max`, and the last update
of a schedule of `T_end` steps uses exactly the final LR (e.g. `min_lr_ratio * lr_max`). Steps
past the end keep the final LR.

Boundaries (`warmup_steps`, `decay_steps`, `cooldown_end`, `anneal_start`, a phase's `steps`):
an int counts steps; a float in [0, 1] is a fraction of the schedule's total steps (rounded to
the nearest step); a float above 1 must be a whole number of steps.

Shapes (lr_min = min_lr_ratio * lr_max; s in [0, 1] the progress through the decay phase):
- constant:     warmup, then lr_max.
- linear:       warmup, then lr_max + (lr_min - lr_max) * s, s over (T_w, T_end].
- cosine:       warmup, then lr_min + (lr_max - lr_min) / 2 * (1 + cos(pi s)).
- wsd:          warmup, lr_max until T_end - T_d, then decay to lr_min over T_d = decay_steps:
                linear 1 - s, cosine (1 + cos(pi s)) / 2, 1-sqrt 1 - sqrt(s)  (times lr_max - lr_min).
- inverse_sqrt: warmup, then lr_max * sqrt(tau / (tau + t - T_w)), tau = inv_sqrt_timescale
                (default T_w, or 1 with no warmup): with tau = T_w this is lr_max * sqrt(T_w / t).
- infinite:     METHODS.md §5 exactly: warmup to lr_max, cooldown (cosine or inv-sqrt, a = 10)
                to lr_const = const_ratio * lr_max by cooldown_end, constant until anneal_start,
                then anneal (exponential or linear) to min_ratio * lr_max at T_end. Authors'
                defaults: warmup 0.05, cooldown_end 0.3, anneal_start 0.8, const 0.25, min 0.01.
                Set cooldown_end = warmup_steps to skip the cooldown (later continual tasks), and
                anneal_start = 1.0 to never anneal (a run meant to branch anneals off later).
- rewarm:       METHODS.md §6: linear warmup from start_lr (a number, or "current" = the LR the
                run was at, passed to `build_schedule(current_lr=...)`) to lr_max over T_w, then
                cosine to lr_min.

Composition: `phases: [...]` runs phases back to back; each phase is a shape with its own `steps`
(length; the last may omit it to take the rest) and optional `lr_max`; a rewarm phase with
start_lr "current" starts from the previous phase's final LR.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

STRICT = ConfigDict(extra="forbid", validate_assignment=True)

ScheduleName = Literal["constant", "linear", "cosine", "wsd", "inverse_sqrt", "infinite", "rewarm"]
INV_SQRT_COOLDOWN_A = 10.0  # METHODS.md §5: h(s) = 1 / sqrt(1 + a s) - 1


def _check_boundary(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(
            "must be a number of steps (int) or a fraction of total steps (float in [0, 1])"
        )
    if isinstance(value, float) and value > 1 and not value.is_integer():
        raise ValueError(f"{value} is neither a fraction in [0, 1] nor a whole number of steps")
    if isinstance(value, int | float) and value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


Boundary = Annotated[int | float, BeforeValidator(_check_boundary)]
"""Steps (int) or a fraction of the schedule's total steps (float in [0, 1])."""

# Which config fields each shape reads (besides `name`); setting another is a config error.
_FIELDS_USED: dict[str, tuple[str, ...]] = {
    "constant": ("warmup_steps",),
    "linear": ("warmup_steps", "min_lr_ratio"),
    "cosine": ("warmup_steps", "min_lr_ratio"),
    "wsd": ("warmup_steps", "min_lr_ratio", "decay_steps", "decay_shape"),
    "inverse_sqrt": ("warmup_steps", "inv_sqrt_timescale"),
    "infinite": (
        "warmup_steps",
        "cooldown_end",
        "anneal_start",
        "const_ratio",
        "min_ratio",
        "cooldown_shape",
        "anneal_shape",
    ),
    "rewarm": ("warmup_steps", "min_lr_ratio", "start_lr"),
}


class _ShapeConfig(BaseModel):
    """Fields of one schedule shape (see the module docstring for the formulas)."""

    model_config = STRICT

    name: ScheduleName = "cosine"
    warmup_steps: Boundary = Field(
        0, description="linear warmup length: steps, or fraction of total"
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final LR / lr_max (linear, cosine, wsd, rewarm)"
    )
    # wsd
    decay_steps: Boundary = Field(
        0.2, description="wsd: decay length at the end: steps, or fraction of total"
    )
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    # inverse_sqrt
    inv_sqrt_timescale: Boundary | None = Field(
        None, description="inverse_sqrt: tau; None = warmup_steps (or 1)"
    )
    # infinite (METHODS.md §5)
    cooldown_end: Boundary = Field(
        0.3, description="infinite: end of cooldown T_cd: steps, or fraction"
    )
    anneal_start: Boundary = Field(
        0.8, description="infinite: start of anneal T_ann: steps, or fraction"
    )
    const_ratio: float = Field(0.25, gt=0, le=1, description="infinite: lr_const / lr_max")
    min_ratio: float = Field(0.01, ge=0, le=1, description="infinite: lr_min / lr_max")
    cooldown_shape: Literal["cosine", "inv_sqrt"] = "cosine"
    anneal_shape: Literal["exp", "linear"] = "exp"
    # rewarm (METHODS.md §6)
    start_lr: float | Literal["current"] = Field(
        0.0, description='rewarm: LR the warmup starts from; "current" = the LR the run was at'
    )

    @model_validator(mode="after")
    def _check_fields_used(self) -> _ShapeConfig:
        used = _FIELDS_USED[self.name]
        unused = sorted(f for f in _changed_shape_fields(self) if f not in used and f != "name")
        if unused:
            raise ValueError(
                f"{unused[0]}: not used by schedule name={self.name!r} (it reads {', '.join(used)})"
            )
        if isinstance(self.start_lr, float) and self.start_lr < 0:
            raise ValueError(f"start_lr: must be >= 0, got {self.start_lr}")
        if self.name == "infinite" and self.anneal_shape == "exp" and self.min_ratio <= 0:
            raise ValueError(
                "min_ratio: must be > 0 for anneal_shape='exp' (use 'linear' to anneal to 0)"
            )
        return self


_SHAPE_FIELDS = frozenset(_ShapeConfig.model_fields)


def _changed_shape_fields(cfg: BaseModel) -> list[str]:
    """Shape fields set to a non-default value (a full dump of the config reloads cleanly)."""
    fields = type(cfg).model_fields
    return [
        f
        for f in cfg.model_fields_set
        if f in _SHAPE_FIELDS
        and getattr(cfg, f) != fields[f].get_default(call_default_factory=True)
    ]


class PhaseConfig(_ShapeConfig):
    """One phase of a composed schedule: a shape plus its length and optional peak LR."""

    steps: Boundary | None = Field(
        None,
        description="phase length: steps, or fraction of total; None = the rest (last phase only)",
    )
    lr_max: float | None = Field(None, gt=0, description="this phase's peak LR; None = optim.lr")


class ScheduleConfig(_ShapeConfig):
    """The `schedule:` config section: one shape, or `phases` run in sequence."""

    phases: list[PhaseConfig] = Field(default_factory=list, description="shapes run back to back")

    @model_validator(mode="after")
    def _check_phases(self) -> ScheduleConfig:
        if not self.phases:
            return self
        clash = sorted(_changed_shape_fields(self))
        if clash:
            raise ValueError(
                f"{clash[0]}: set it inside a phase; with `phases` the top level takes no shape fields"
            )
        for i, phase in enumerate(self.phases[:-1]):
            if phase.steps is None:
                raise ValueError(f"phases.{i}.steps: only the last phase may omit its length")
        return self


# --------------------------------------------------------------------------- shapes (pure math)


def resolve_boundary(value: int | float, total_steps: int) -> int:
    """Steps of a boundary: an int as is, a float in [0, 1] as a fraction of `total_steps`."""
    if isinstance(value, float) and value <= 1.0:
        return int(round(value * total_steps))
    return int(value)


def _cosine(s: float) -> float:
    """1 at s=0 down to 0 at s=1."""
    return 0.5 * (1.0 + math.cos(math.pi * s))


_DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda s: 1.0 - s,
    "cosine": _cosine,
    "1-sqrt": lambda s: 1.0 - math.sqrt(s),
}


@dataclass(frozen=True)
class _Shape:
    """One resolved shape over t in [0, total]: `lr(t)`; `t` past `total` keeps lr(total)."""

    cfg: _ShapeConfig
    lr_max: float
    total: int
    start_lr: float  # rewarm only (resolved "current")
    warmup: int
    where: str

    def lr(self, t: int) -> float:
        t = min(t, self.total)
        if self.warmup > 0 and t <= self.warmup:
            start = self.start_lr if self.cfg.name == "rewarm" else 0.0
            return start + (self.lr_max - start) * t / self.warmup
        return _AFTER_WARMUP[self.cfg.name](self, t)

    def _progress(self, t: int, begin: int) -> float:
        """s in [0, 1] through (begin, total]."""
        span = self.total - begin
        return 1.0 if span <= 0 else min(max((t - begin) / span, 0.0), 1.0)

    def describe(self) -> str:
        c, lr = self.cfg, self.lr_max
        warm = ""
        if self.warmup:
            start = self.start_lr if c.name == "rewarm" else 0.0
            warm = f"warmup {start:.3g}->{lr:.3g} over {self.warmup} steps, "
        lr_min = c.min_lr_ratio * lr
        body = {
            "constant": f"constant {lr:.3g}",
            "linear": f"linear to {lr_min:.3g}",
            "cosine": f"cosine to {lr_min:.3g}",
            "wsd": f"stable {lr:.3g}, {c.decay_shape} decay to {lr_min:.3g} over the last "
            f"{resolve_boundary(c.decay_steps, self.total)} steps",
            "inverse_sqrt": f"inverse-sqrt from {lr:.3g} (tau {self._timescale()})",
            "infinite": self._describe_infinite(),
            "rewarm": f"cosine to {lr_min:.3g}",
        }[c.name]
        return f"{c.name}: {warm}{body}, {self.total} steps"

    def _describe_infinite(self) -> str:
        c, lr = self.cfg, self.lr_max
        t_cd = resolve_boundary(c.cooldown_end, self.total)
        t_ann = resolve_boundary(c.anneal_start, self.total)
        anneal = (
            "no anneal"
            if t_ann >= self.total
            else f"{c.anneal_shape} anneal to {c.min_ratio * lr:.3g}"
        )
        return (
            f"{c.cooldown_shape} cooldown to {c.const_ratio * lr:.3g} by step {t_cd}, constant until "
            f"{t_ann}, {anneal}"
        )

    def _timescale(self) -> int:
        tau = self.cfg.inv_sqrt_timescale
        if tau is None:
            return max(self.warmup, 1)
        return max(resolve_boundary(tau, self.total), 1)


def _constant(shape: _Shape, t: int) -> float:
    return shape.lr_max


def _linear(shape: _Shape, t: int) -> float:
    lr_min = shape.cfg.min_lr_ratio * shape.lr_max
    return shape.lr_max + (lr_min - shape.lr_max) * shape._progress(t, shape.warmup)


def _cosine_decay(shape: _Shape, t: int) -> float:
    lr_min = shape.cfg.min_lr_ratio * shape.lr_max
    return lr_min + (shape.lr_max - lr_min) * _cosine(shape._progress(t, shape.warmup))


def _wsd(shape: _Shape, t: int) -> float:
    decay_begin = shape.total - resolve_boundary(shape.cfg.decay_steps, shape.total)
    if t <= decay_begin:
        return shape.lr_max
    lr_min = shape.cfg.min_lr_ratio * shape.lr_max
    s = shape._progress(t, decay_begin)
    return lr_min + (shape.lr_max - lr_min) * _DECAY_SHAPES[shape.cfg.decay_shape](s)


def _inverse_sqrt(shape: _Shape, t: int) -> float:
    tau = shape._timescale()
    return shape.lr_max * math.sqrt(tau / (tau + max(t - shape.warmup, 0)))


def _infinite(shape: _Shape, t: int) -> float:
    c, lr_max = shape.cfg, shape.lr_max
    t_w = shape.warmup
    t_cd = resolve_boundary(c.cooldown_end, shape.total)
    t_ann = resolve_boundary(c.anneal_start, shape.total)
    t_end = shape.total
    lr_const, lr_min = c.const_ratio * lr_max, c.min_ratio * lr_max
    if t_w < t <= t_cd:  # cooldown (t_cd == t_w: no cooldown phase)
        s = (t - t_w) / (t_cd - t_w)
        if c.cooldown_shape == "cosine":
            return lr_const + (lr_max - lr_const) / 2 * (1 + math.cos(math.pi * s))
        h = lambda x: 1 / math.sqrt(1 + INV_SQRT_COOLDOWN_A * x) - 1
        return lr_max + (lr_const - lr_max) * h(s) / h(1)
    if t <= t_ann:
        return lr_const
    frac = (t - t_ann) / (t_end - t_ann)
    if c.anneal_shape == "exp":
        return lr_const * (lr_min / lr_const) ** frac
    return lr_const + (lr_min - lr_const) * frac


def _rewarm(shape: _Shape, t: int) -> float:
    return _cosine_decay(shape, t)


_AFTER_WARMUP: dict[str, Callable[[_Shape, int], float]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine_decay,
    "wsd": _wsd,
    "inverse_sqrt": _inverse_sqrt,
    "infinite": _infinite,
    "rewarm": _rewarm,
}


def _build_shape(
    cfg: _ShapeConfig, lr_max: float, total: int, current_lr: float | None, where: str
) -> _Shape:
    """Resolves boundaries and checks their order; errors name the field (`where` + name)."""
    warmup = resolve_boundary(cfg.warmup_steps, total)
    if warmup > total:
        raise ValueError(
            f"{where}warmup_steps: {warmup} steps exceeds the schedule's {total} steps"
        )
    if cfg.name == "wsd":
        decay = resolve_boundary(cfg.decay_steps, total)
        if warmup + decay > total:
            raise ValueError(
                f"{where}decay_steps: warmup ({warmup}) + decay ({decay}) exceed the schedule's {total} steps"
            )
    if cfg.name == "infinite":
        t_cd = resolve_boundary(cfg.cooldown_end, total)
        t_ann = resolve_boundary(cfg.anneal_start, total)
        if t_cd < warmup:
            raise ValueError(
                f"{where}cooldown_end: step {t_cd} is before the end of warmup (step {warmup})"
            )
        if t_ann < t_cd:
            raise ValueError(
                f"{where}anneal_start: step {t_ann} is before cooldown_end (step {t_cd})"
            )
        if t_ann > total:
            raise ValueError(
                f"{where}anneal_start: step {t_ann} is past the schedule's {total} steps"
            )
    start_lr = 0.0
    if cfg.name == "rewarm":
        if cfg.start_lr == "current":
            if current_lr is None:
                raise ValueError(
                    f'{where}start_lr: "current" needs the LR the run was at (none known: '
                    "a fresh run, or the checkpoint has no schedule state); give a number"
                )
            start_lr = float(current_lr)
        else:
            start_lr = float(cfg.start_lr)
    return _Shape(
        cfg=cfg, lr_max=lr_max, total=total, start_lr=start_lr, warmup=warmup, where=where
    )


# --------------------------------------------------------------------------- public API


class Schedule:
    """LR as a pure function of the optimizer step; stateful only for checkpoints.

    `schedule(step)` -> absolute LR for the update at 0-based global optimizer step `step`
    (see the module docstring for the t = step - start_step + 1 convention).
    """

    def __init__(
        self,
        cfg: ScheduleConfig,
        lr_max: float,
        total_steps: int,
        *,
        start_step: int = 0,
        current_lr: float | None = None,
    ) -> None:
        self._setup(cfg, lr_max, total_steps, start_step, current_lr)

    def _setup(
        self,
        cfg: ScheduleConfig,
        lr_max: float,
        total_steps: int,
        start_step: int,
        current_lr: float | None,
    ) -> None:
        if lr_max <= 0:
            raise ValueError(f"optim.lr: the schedule's lr_max must be > 0, got {lr_max}")
        if total_steps <= 0:
            raise ValueError(f"train.steps: the schedule needs total_steps > 0, got {total_steps}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.cfg = cfg
        self.lr_max = float(lr_max)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.current_lr = None if current_lr is None else float(current_lr)
        self._phases = self._build_phases()

    def _build_phases(self) -> list[tuple[int, _Shape]]:
        """(offset in t, shape) per phase; a plain schedule is one phase at offset 0."""
        if not self.cfg.phases:
            return [
                (
                    0,
                    _build_shape(
                        self.cfg, self.lr_max, self.total_steps, self.current_lr, "schedule."
                    ),
                )
            ]
        phases: list[tuple[int, _Shape]] = []
        offset, previous_final_lr = 0, self.current_lr
        for i, phase in enumerate(self.cfg.phases):
            where = f"schedule.phases.{i}."
            if phase.steps is None:
                length = self.total_steps - offset
            else:
                length = resolve_boundary(phase.steps, self.total_steps)
            if length <= 0 or offset + length > self.total_steps:
                raise ValueError(
                    f"{where}steps: phase {i} spans {length} steps from step {offset}, "
                    f"outside the schedule's {self.total_steps} steps"
                )
            shape = _build_shape(
                phase, phase.lr_max or self.lr_max, length, previous_final_lr, where
            )
            phases.append((offset, shape))
            offset += length
            previous_final_lr = shape.lr(length)
        if offset != self.total_steps:
            raise ValueError(
                f"schedule.phases: the phases cover {offset} steps, the schedule has {self.total_steps}"
            )
        return phases

    def lr_at(self, t: int) -> float:
        """LR at the 1-based update count `t` within this schedule (t = 0 is the warmup's start)."""
        if t < 0:
            raise ValueError(f"t must be >= 0, got {t}")
        offset, shape = self._phases[0]
        for phase_offset, phase_shape in self._phases:
            if t > phase_offset:
                offset, shape = phase_offset, phase_shape
        return shape.lr(t - offset)

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            raise ValueError(f"step {step} is before this schedule's start_step {self.start_step}")
        return self.lr_at(step - self.start_step + 1)

    def describe(self) -> str:
        start = f" from step {self.start_step}" if self.start_step else ""
        parts = [
            f"[{offset}, {offset + shape.total}) {shape.describe()}"
            if len(self._phases) > 1
            else shape.describe()
            for offset, shape in self._phases
        ]
        return f"LR schedule{start}: " + "; then ".join(parts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.model_dump(mode="json"),
            "lr_max": self.lr_max,
            "total_steps": self.total_steps,
            "start_step": self.start_step,
            "current_lr": self.current_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._setup(
            ScheduleConfig.model_validate(state["config"]),
            state["lr_max"],
            state["total_steps"],
            state["start_step"],
            state.get("current_lr"),
        )

    def __repr__(self) -> str:
        return f"Schedule({self.describe()})"


def build_schedule(
    cfg: ScheduleConfig,
    lr_max: float,
    total_steps: int,
    *,
    start_step: int = 0,
    current_lr: float | None = None,
) -> Schedule:
    """Builds the schedule spanning global steps [start_step, start_step + total_steps).

    `current_lr` is the LR the run was at when this schedule starts (continual pretraining:
    the previous schedule's `schedule_from_state_dict(old)(resume_step)`); a rewarm with
    start_lr "current" needs it. Raises ValueError naming the field (`schedule.<field>` or
    `schedule.phases.<i>.<field>`) when a boundary does not fit in `total_steps`.
    """
    return Schedule(cfg, lr_max, total_steps, start_step=start_step, current_lr=current_lr)


def schedule_from_state_dict(state: dict[str, Any]) -> Schedule:
    """Rebuilds a checkpointed schedule (e.g. to read the LR an old run was at)."""
    schedule = Schedule.__new__(Schedule)
    schedule.load_state_dict(state)
    return schedule
