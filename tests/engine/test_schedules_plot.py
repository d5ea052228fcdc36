"""`strata schedule plot CONFIG` writes a PNG of the LR built from a full config."""

import argparse
import struct

import yaml

from launch.commands import schedule as schedule_cmd


def _parse(argv):
    parser = argparse.ArgumentParser()
    schedule_cmd.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_png(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "optim": {"lr": 1e-3},
                "train": {"steps": 500},
                "schedule": {"name": "infinite", "warmup_steps": 0.05},
            }
        )
    )
    out = tmp_path / "plots" / "lr.png"
    args = _parse(["schedule", "plot", str(config), "--out", str(out), "--steps", "1000"])
    assert args.func(args) == 0
    assert _png_size(out) == (800, 400)
    text = capsys.readouterr().out
    assert "infinite" in text and "step 999 = 1e-05" in text


def test_plot_reports_config_errors(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {"schedule": {"name": "cosine", "warmup_steps": 500}, "train": {"steps": 100}}
        )
    )
    args = _parse(["schedule", "plot", str(config), "--out", str(tmp_path / "x.png")])
    assert args.func(args) == 2
    assert "schedule.warmup_steps" in capsys.readouterr().err
    args = _parse(["schedule", "plot", str(config), "--set", "schedule.cooldown_end=0.5"])
    assert args.func(args) == 2
    assert "cooldown_end" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_sampled_steps_cover_long_schedules():
    from engine.schedules import ScheduleConfig, build_schedule

    s = build_schedule(ScheduleConfig(), 1e-3, 1_000_000, start_step=10)
    steps = schedule_cmd.sampled_steps(s)
    assert steps[0] == 10 and steps[-1] == 1_000_009 and len(steps) <= 4001
