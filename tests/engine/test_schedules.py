"""Every schedule's LR at its phase boundaries and interior points, against hand-computed values.

Convention under test: schedule(step) is the LR of update t = step + 1 (1-based), so the
METHODS.md formulas written in t are evaluated at step = t - 1.
"""

import math

import pytest
from pydantic import ValidationError

from engine.schedules import (
    ScheduleConfig,
    build_schedule,
    resolve_boundary,
    schedule_from_state_dict,
)

LR = 1e-3


def lr_at_t(cfg: ScheduleConfig, total: int, t: int, lr_max: float = LR, **kw) -> float:
    return build_schedule(cfg, lr_max, total, **kw)(t - 1)


def test_constant_with_warmup():
    cfg = ScheduleConfig(name="constant", warmup_steps=4)
    s = build_schedule(cfg, LR, 20)
    assert s(0) == pytest.approx(LR / 4)  # first update: lr_max * 1 / T_w, never 0
    assert s(1) == pytest.approx(LR / 2)
    assert s(3) == pytest.approx(LR)  # t = T_w
    assert s(4) == s(19) == s(1000) == pytest.approx(LR)


def test_linear_decay():
    cfg = ScheduleConfig(name="linear", warmup_steps=10, min_lr_ratio=0.1)
    # decay over t in (10, 110]: lr = 1e-3 + (1e-4 - 1e-3) * (t - 10) / 100
    assert lr_at_t(cfg, 110, 10) == pytest.approx(1e-3)
    assert lr_at_t(cfg, 110, 35) == pytest.approx(1e-3 - 9e-4 * 0.25)
    assert lr_at_t(cfg, 110, 60) == pytest.approx(5.5e-4)
    assert lr_at_t(cfg, 110, 110) == pytest.approx(1e-4)
    assert lr_at_t(cfg, 110, 500) == pytest.approx(1e-4)  # past the end: final LR


def test_cosine_with_min_ratio():
    cfg = ScheduleConfig(name="cosine", warmup_steps=0.1, min_lr_ratio=0.1)  # 10 of 100 steps
    assert lr_at_t(cfg, 100, 5) == pytest.approx(5e-4)
    assert lr_at_t(cfg, 100, 10) == pytest.approx(1e-3)
    # s = (t - 10) / 90; t = 55 -> s = 0.5 -> lr_min + (lr_max - lr_min) / 2
    assert lr_at_t(cfg, 100, 55) == pytest.approx(1e-4 + 9e-4 / 2)
    # t = 32.5 is not a step; t = 40 -> s = 1/3 -> cos(pi/3) = 0.5 -> 1e-4 + 9e-4 * 0.75
    assert lr_at_t(cfg, 100, 40) == pytest.approx(1e-4 + 9e-4 * 0.75)
    assert lr_at_t(cfg, 100, 100) == pytest.approx(1e-4)


def test_cosine_without_warmup_starts_at_lr_max():
    s = build_schedule(ScheduleConfig(name="cosine", min_lr_ratio=0.0), LR, 100)
    assert s(0) == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 0.01)))
    assert s(49) == pytest.approx(LR / 2)
    assert s(99) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    "shape, mid_factor",
    [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))],
)
def test_wsd_decay_shapes(shape, mid_factor):
    # warmup 10, stable to t = 80, decay over (80, 100] to 0.1 lr_max
    cfg = ScheduleConfig(
        name="wsd", warmup_steps=10, decay_steps=0.2, decay_shape=shape, min_lr_ratio=0.1
    )
    assert lr_at_t(cfg, 100, 5) == pytest.approx(5e-4)
    assert lr_at_t(cfg, 100, 10) == pytest.approx(1e-3)
    assert lr_at_t(cfg, 100, 50) == pytest.approx(1e-3)
    assert lr_at_t(cfg, 100, 80) == pytest.approx(1e-3)
    assert lr_at_t(cfg, 100, 90) == pytest.approx(1e-4 + 9e-4 * mid_factor)
    assert lr_at_t(cfg, 100, 100) == pytest.approx(1e-4)


def test_wsd_1_sqrt_quarter_point():
    cfg = ScheduleConfig(name="wsd", decay_steps=40, min_lr_ratio=0.0)
    # decay over (60, 100]; t = 70 -> s = 0.25 -> 1 - sqrt(0.25) = 0.5
    assert lr_at_t(cfg, 100, 70) == pytest.approx(5e-4)


def test_inverse_sqrt():
    cfg = ScheduleConfig(name="inverse_sqrt", warmup_steps=100)
    # tau = T_w: lr = lr_max * sqrt(T_w / t) after warmup
    assert lr_at_t(cfg, 10_000, 50) == pytest.approx(5e-4)
    assert lr_at_t(cfg, 10_000, 100) == pytest.approx(1e-3)
    assert lr_at_t(cfg, 10_000, 400) == pytest.approx(5e-4)
    assert lr_at_t(cfg, 10_000, 10_000) == pytest.approx(1e-4)
    tau = ScheduleConfig(name="inverse_sqrt", inv_sqrt_timescale=25)
    assert lr_at_t(tau, 1000, 75) == pytest.approx(5e-4)  # sqrt(25 / (25 + 75))


def _infinite_reference(t, *, t_w, t_cd, t_ann, t_end, lr_max, const, lr_min, cooldown, anneal):
    """METHODS.md §5 transcribed literally."""
    if t <= t_w:
        return lr_max * t / t_w
    if t <= t_cd:
        s = (t - t_w) / (t_cd - t_w)
        if cooldown == "cosine":
            return const + (lr_max - const) / 2 * (1 + math.cos(math.pi * s))
        h = lambda x: 1 / math.sqrt(1 + 10 * x) - 1
        return lr_max + (const - lr_max) * h(s) / h(1)
    if t <= t_ann:
        return const
    if anneal == "exp":
        return const * (lr_min / const) ** ((t - t_ann) / (t_end - t_ann))
    return const + (lr_min - const) * (t - t_ann) / (t_end - t_ann)


@pytest.mark.parametrize("cooldown", ["cosine", "inv_sqrt"])
@pytest.mark.parametrize("anneal", ["exp", "linear"])
def test_infinite_matches_methods_section_5_at_every_step(cooldown, anneal):
    cfg = ScheduleConfig(
        name="infinite",
        warmup_steps=0.05,
        cooldown_end=0.3,
        anneal_start=0.8,
        cooldown_shape=cooldown,
        anneal_shape=anneal,
    )
    s = build_schedule(cfg, 3e-4, 1000)
    ref = dict(
        t_w=50,
        t_cd=300,
        t_ann=800,
        t_end=1000,
        lr_max=3e-4,
        const=0.25 * 3e-4,
        lr_min=0.01 * 3e-4,
        cooldown=cooldown,
        anneal=anneal,
    )
    for t in range(1, 1001):
        assert s(t - 1) == pytest.approx(_infinite_reference(t, **ref), rel=1e-12), t


def test_infinite_hand_values():
    cfg = ScheduleConfig(name="infinite", warmup_steps=0.05)  # authors' defaults otherwise
    # T_w = 50, T_cd = 300, T_ann = 800, T_end = 1000; lr_const = 2.5e-4, lr_min = 1e-5
    assert lr_at_t(cfg, 1000, 25) == pytest.approx(5e-4)
    assert lr_at_t(cfg, 1000, 50) == pytest.approx(1e-3)
    assert lr_at_t(cfg, 1000, 175) == pytest.approx(2.5e-4 + 7.5e-4 / 2)  # s = 0.5
    assert lr_at_t(cfg, 1000, 300) == pytest.approx(2.5e-4)
    assert lr_at_t(cfg, 1000, 550) == pytest.approx(2.5e-4)
    assert lr_at_t(cfg, 1000, 800) == pytest.approx(2.5e-4)
    assert lr_at_t(cfg, 1000, 900) == pytest.approx(2.5e-4 * 0.04**0.5)  # = 5e-5
    assert lr_at_t(cfg, 1000, 1000) == pytest.approx(1e-5)
    inv = ScheduleConfig(name="infinite", warmup_steps=0.05, cooldown_shape="inv_sqrt")
    # s = 0.5: h(0.5) / h(1) = (1/sqrt(6) - 1) / (1/sqrt(11) - 1)
    ratio = (1 / math.sqrt(6) - 1) / (1 / math.sqrt(11) - 1)
    assert lr_at_t(inv, 1000, 175) == pytest.approx(1e-3 - 7.5e-4 * ratio)


def test_infinite_continual_task_skips_warmup_and_cooldown():
    cfg = ScheduleConfig(name="infinite", cooldown_end=0, anneal_start=0.5)
    s = build_schedule(cfg, 1e-3, 100)
    assert s(0) == pytest.approx(2.5e-4)
    assert s(49) == pytest.approx(2.5e-4)
    assert s(99) == pytest.approx(1e-5)


def test_infinite_without_anneal_stays_constant():
    s = build_schedule(
        ScheduleConfig(name="infinite", warmup_steps=10, anneal_start=1.0), 1e-3, 100
    )
    assert s(99) == s(5000) == pytest.approx(2.5e-4)


def test_rewarm_from_given_and_current_lr():
    cfg = ScheduleConfig(name="rewarm", warmup_steps=10, start_lr=1e-4, min_lr_ratio=0.1)
    s = build_schedule(cfg, 6e-4, 110, start_step=500)
    assert s(500) == pytest.approx(1e-4 + 5e-4 / 10)  # t = 1
    assert s(504) == pytest.approx(1e-4 + 5e-4 / 2)
    assert s(509) == pytest.approx(6e-4)
    assert s(559) == pytest.approx(6e-5 + 5.4e-4 / 2)  # t = 60: cosine midpoint
    assert s(609) == pytest.approx(6e-5)
    with pytest.raises(ValueError, match="start_step"):
        s(499)
    current = ScheduleConfig(name="rewarm", warmup_steps=4, start_lr="current")
    s = build_schedule(current, 4e-4, 50, current_lr=2e-5)
    assert s(1) == pytest.approx(2e-5 + 3.8e-4 / 2)
    with pytest.raises(ValueError, match="schedule.start_lr"):
        build_schedule(current, 4e-4, 50)


def test_phases_in_sequence_rewarm_from_previous_final_lr():
    cfg = ScheduleConfig(
        phases=[
            {"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1, "steps": 0.5},
            {"name": "rewarm", "warmup_steps": 10, "start_lr": "current", "lr_max": 2e-3},
        ]
    )
    s = build_schedule(cfg, 1e-3, 200)
    assert s(9) == pytest.approx(1e-3)
    assert s(99) == pytest.approx(1e-4)  # end of phase 0
    assert s(100) == pytest.approx(1e-4 + (2e-3 - 1e-4) / 10)  # phase 1, t = 1
    assert s(109) == pytest.approx(2e-3)
    assert s(199) == pytest.approx(2e-4)
    assert "rewarm" in s.describe() and "cosine" in s.describe()


def test_state_dict_round_trip_resumes_identically():
    cfg = ScheduleConfig(name="rewarm", warmup_steps=0.1, start_lr="current")
    s = build_schedule(cfg, 3e-4, 1000, start_step=2000, current_lr=5e-5)
    clone = schedule_from_state_dict(s.state_dict())
    other = build_schedule(ScheduleConfig(name="constant"), 1.0, 1)
    other.load_state_dict(s.state_dict())
    for step in (2000, 2050, 2100, 2500, 2999, 4000):
        assert clone(step) == other(step) == s(step)


def test_resolve_boundary_fraction_or_steps():
    assert resolve_boundary(0.05, 1000) == 50
    assert resolve_boundary(1.0, 1000) == 1000
    assert resolve_boundary(30, 1000) == 30
    assert resolve_boundary(30.0, 1000) == 30


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"name": "cosine", "cooldown_end": 0.5}, "cooldown_end"),
        ({"name": "sawtooth"}, "name"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"name": "infinite", "min_ratio": 0.0}, "min_ratio"),
        ({"name": "rewarm", "start_lr": "previous"}, "start_lr"),
        ({"warmup_steps": 10, "phases": [{"name": "constant"}]}, "warmup_steps"),
        ({"phases": [{"name": "constant"}, {"name": "cosine"}]}, "phases.0.steps"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        ScheduleConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, total, field",
    [
        ({"name": "cosine", "warmup_steps": 200}, 100, "schedule.warmup_steps"),
        (
            {"name": "infinite", "warmup_steps": 0.5, "cooldown_end": 0.3},
            100,
            "schedule.cooldown_end",
        ),
        (
            {"name": "infinite", "cooldown_end": 0.5, "anneal_start": 0.4},
            100,
            "schedule.anneal_start",
        ),
        ({"name": "wsd", "warmup_steps": 0.9, "decay_steps": 0.2}, 100, "schedule.decay_steps"),
        (
            {"phases": [{"name": "constant", "steps": 80}, {"name": "cosine", "steps": 40}]},
            100,
            "schedule.phases.1.steps",
        ),
    ],
)
def test_build_errors_name_the_field(kwargs, total, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_schedule(ScheduleConfig(**kwargs), LR, total)


def test_full_config_dump_reloads():
    cfg = ScheduleConfig(name="wsd", decay_steps=0.1)
    assert ScheduleConfig.model_validate(cfg.model_dump()) == cfg
