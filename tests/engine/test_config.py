"""Config errors stop at once with exit code 2 and a one-line message naming the field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from launch.cli import main


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("model:\n  dimm: 64\n", "model.dimm: unknown key"),
        ("model:\n  dim: sixty\n", "model.dim:"),
        ("model:\n  dim: 64\n  n_heads: 5\n", "n_heads (5) must divide dim (64)"),
        ("optim:\n  lr: -1\n", "optim.lr:"),
        ("data:\n  global_batch_size: 10\n  micro_batch_size: 4\n", "micro_batch_size (4) must divide"),
        ("trian:\n  steps: 3\n", "trian: unknown key"),
        ("train:\n  steps: 0\n", "train.steps:"),
        ("schedule:\n  name: cosin\n", "schedule.name:"),
    ],
)
def test_bad_config_names_the_field(tmp_path, yaml_text, field):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, yaml_text))
    assert field in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_exits_2_with_one_line(tmp_path, capsys):
    code = main(["train", str(write(tmp_path, "model:\n  n_layerz: 2\n"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["config error: model.n_layerz: unknown key"]


def test_set_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  dim: 64\n  n_heads: 4\n"), ["optim.lr=1e-3", "model.qk_norm=true", "train.steps=7"])
    assert cfg.optim.lr == 1e-3 and cfg.model.qk_norm is True and cfg.train.steps == 7


def test_override_of_unknown_field_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^optim.learning_rate: unknown key$"):
        load_config(None, ["optim.learning_rate=1"])


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["optim.lr"])


def test_an_override_indexes_a_list_without_touching_the_callers_tree():
    tree = {"data": {"sources": [{"path": "a", "name": "a"}, {"path": "b", "name": "b"}]}}
    cfg = load_config(tree, ["data.sources.1.path=elsewhere"])
    assert [s.path for s in cfg.data.sources] == ["a", "elsewhere"]
    assert tree["data"]["sources"][1]["path"] == "b"  # the dict passed in is copied, lists included
    with pytest.raises(ConfigError, match=r"^data.sources: '2' is not an index of this list of 2 \(use 0..1"):
        load_config(tree, ["data.sources.2.path=x"])


def test_seq_len_beyond_model(tmp_path):
    with pytest.raises(ConfigError, match="data.seq_len .* exceeds model.max_seq_len"):
        load_config(None, ["data.seq_len=1024", "model.max_seq_len=512"])


PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_shipped_preset_validates(preset):
    """configs/*.yaml load as they ship (continual recipes as `strata resume` starts them)."""
    overrides = ["continual.source=runs/demo"] if preset.name.startswith("continual_") else []
    cfg = load_config(preset, overrides)
    assert cfg.model.family in ("llama", "gla")


@pytest.mark.parametrize(("overrides", "field"), [
    (["train.steps=100", "schedule.warmup_steps=500"], "schedule.warmup_steps: 500 steps exceeds the schedule's 100 steps"),
    (["train.steps=100", "schedule.name=wsd", "schedule.warmup_steps=60", "schedule.decay_steps=50"], "schedule.decay_steps:"),
])
def test_a_schedule_that_cannot_run_fails_at_load_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(field)


def test_cli_reports_the_schedule_field_before_anything_starts(tmp_path, capsys):
    config = write(tmp_path, "train:\n  steps: 10\nschedule:\n  warmup_steps: 20\n")
    assert main(["submit", str(config), "--launcher", "local"]) == 2
    assert capsys.readouterr().err.strip() == "config error: schedule.warmup_steps: 20 steps exceeds the schedule's 10 steps"


def test_a_resolved_continual_config_is_checked_from_its_start_step():
    """A pinned continual run's schedule spans [start_step, train.steps), as run_schedule builds it."""
    resolved = {
        "train": {"steps": 100},
        "schedule": {"name": "rewarm", "start_lr": "current", "warmup_steps": 10},
        "continual": {"source": "runs/src", "start_step": 60, "current_lr": 1e-3},
    }
    assert load_config(resolved).continual.start_step == 60
    with pytest.raises(ConfigError, match=r"^schedule.warmup_steps: 50 steps exceeds the schedule's 40 steps"):
        load_config(resolved, ["schedule.warmup_steps=50"])
    source_schedule = {"train": {"steps": 100}, "schedule": {"warmup_steps": 500},  # not this run's schedule
                       "continual": {"source": "runs/src", "schedule": "continue", "start_step": 60,
                                     "source_schedule": {"kind": "the source's state"}}}
    assert load_config(source_schedule).continual.schedule == "continue"


def test_resolving_a_continual_run_still_raises_a_config_error():
    """resolve_continual pins the start step by assignment, then names the field itself."""
    from engine.continual import ContinualConfig, run_schedule

    cfg = load_config(None, ["continual.source=runs/src", "train.steps=100", "schedule.warmup_steps=50"])
    cfg.continual = ContinualConfig(source="runs/src", start_step=60, current_lr=1e-3)
    with pytest.raises(ConfigError, match=r"^schedule.warmup_steps: 50 steps exceeds the schedule's 40 steps"):
        run_schedule(cfg, cfg.optim.lr)


def test_schedule_plot_steps_is_the_length_the_schedule_is_checked_over(tmp_path):
    from launch.commands.schedule import schedule_from_config

    config = write(tmp_path, "train:\n  steps: 10\nschedule:\n  warmup_steps: 20\n")
    assert schedule_from_config(str(config), [], 100, None).total_steps == 100
    with pytest.raises(ConfigError, match=r"^schedule.warmup_steps: 20 steps exceeds the schedule's 10 steps"):
        schedule_from_config(str(config), [], None, None)
