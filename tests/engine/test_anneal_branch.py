"""Anneal branches (`strata resume CKPT --anneal STEPS`): a new run that anneals from the infinite
schedule's constant phase to lr_min, keeps optimizer and data position, and never writes into
the source run, which can go on un-annealed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_resume_policy import LR, LR_CONST, run_source

from engine.config import ConfigError, load_config
from engine.continual import SUMMARY_FILE, SourceState, anneal_schedule, run_schedule
from engine.schedules import ScheduleConfig, build_schedule, schedule_from_state_dict
from launch.cli import main

LR_MIN = 0.01 * LR  # the source's infinite schedule: min_ratio 0.01


@pytest.fixture(scope="module")
def source(tiny_corpus, tmp_path_factory):
    return run_source(tiny_corpus, tmp_path_factory.mktemp("anneal") / "run")


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def logged_lrs(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if "lr" in r}


def test_anneal_forks_a_branch_and_leaves_the_main_run_untouched(source, capsys):
    before = snapshot(source.run_dir)
    assert main(["resume", str(source.run_dir), "--anneal", "4"]) == 0
    assert snapshot(source.run_dir) == before
    branch = source.run_dir.parent / "run-anneal-6"
    lrs = logged_lrs(branch)
    assert sorted(lrs) == [7, 8, 9, 10]
    ratio = (LR_MIN / LR_CONST) ** 0.25  # exp anneal from lr_const to lr_min over 4 updates
    for k, step in enumerate((7, 8, 9, 10), start=1):
        assert lrs[step] == pytest.approx(LR_CONST * ratio**k, rel=1e-9)
    assert lrs[10] == pytest.approx(LR_MIN)
    summary = json.loads((branch / SUMMARY_FILE).read_text())
    assert summary["optimizer"].startswith("kept") and summary["data"]["policy"] == "continue"
    assert summary["data"]["sampler_step"] == 6 and summary["step"]["start"] == 6
    out = capsys.readouterr().out
    assert f"note: anneal branch: exp anneal of the LR from {LR_CONST:.4g} to {LR_MIN:.4g} over 4 steps" in out
    assert "constant phase" not in out  # step 6 is in it: no warning
    # the main run goes on un-annealed at its constant LR
    assert main(["train", "--resume", str(source.run_dir), "--set", "train.steps=8"]) == 0
    main_lrs = logged_lrs(source.run_dir)
    assert main_lrs[7] == pytest.approx(LR_CONST) and main_lrs[8] == pytest.approx(LR_CONST)


def test_anneal_shape_and_target_can_be_given(source, tmp_path):
    run_dir = tmp_path / "lin"
    argv = ["resume", str(source.step_dir), "--anneal", "4", "--anneal-shape", "linear", "--anneal-to", "1e-4"]
    assert main([*argv, "--run-dir", str(run_dir), "--no-train"]) == 0
    cfg = load_config(run_dir / "config.yaml")
    schedule = run_schedule(cfg, cfg.optim.lr)
    for k in range(1, 5):
        assert schedule(5 + k) == pytest.approx(LR_CONST + (1e-4 - LR_CONST) * k / 4)
    assert cfg.train.steps == 10 and cfg.optim.lr == LR  # the peak LR setting is left alone


def _state(schedule_section: dict, total: int = 10) -> dict:
    return build_schedule(ScheduleConfig.model_validate(schedule_section), LR, total).state_dict()


def test_anneal_outside_the_constant_phase_warns_and_starts_from_the_current_lr(tmp_path):
    state = _state({"name": "infinite", "warmup_steps": 2, "cooldown_end": 6, "anneal_start": 1.0})
    source = SourceState(tmp_path / "r" / "checkpoints" / "step_00000003", 3, 0, state, None)
    section, warning = anneal_schedule(source, 5)
    current = schedule_from_state_dict(state)(3)
    assert "not in the infinite schedule's constant phase" in warning
    phase = section["phases"][0]
    assert phase["lr_max"] == pytest.approx(current) and phase["min_ratio"] == pytest.approx(LR_MIN / current)


def test_anneal_of_a_non_infinite_schedule_needs_a_target(tmp_path):
    state = _state({"name": "cosine"})
    source = SourceState(tmp_path / "r" / "checkpoints" / "step_00000004", 4, 0, state, None)
    with pytest.raises(ConfigError, match="--anneal-to"):
        anneal_schedule(source, 5)
    section, warning = anneal_schedule(source, 5, to_lr=1e-5)
    assert warning is None and section["phases"][0]["anneal_shape"] == "exp"
    with pytest.raises(ConfigError, match="below the current LR"):
        anneal_schedule(source, 5, to_lr=1.0)


def test_anneal_reads_lr_min_from_an_infinite_phase(tmp_path):
    phases = {"phases": [{"name": "constant", "steps": 4}, {"name": "infinite", "lr_max": 1e-3, "warmup_steps": 0,
              "cooldown_end": 0, "anneal_start": 1.0, "min_ratio": 0.1, "anneal_shape": "linear"}]}  # fmt: skip
    source = SourceState(tmp_path / "r" / "checkpoints" / "step_00000006", 6, 0, _state(phases), None)
    section, warning = anneal_schedule(source, 3)
    assert warning is None  # 0.25 x 1e-3: the phase's constant LR
    phase = section["phases"][0]
    assert phase["lr_max"] == pytest.approx(2.5e-4) and phase["min_ratio"] == pytest.approx(1e-4 / 2.5e-4)
    assert phase["anneal_shape"] == "linear"
