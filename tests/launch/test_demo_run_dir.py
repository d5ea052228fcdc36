"""`strata demo` owns its run directory: a re-run moves the last demo run aside to
`<run_dir>.previous` (replacing an older one) and trains from scratch, instead of training over
it and appending to its metrics; a first run (no run directory yet) changes nothing."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from launch.commands import demo


def test_no_previous_run_moves_nothing(tmp_path):
    assert demo.set_aside_previous_run(tmp_path / "runs" / "demo") is None
    assert not (tmp_path / "runs").exists()


def test_previous_run_is_renamed_and_an_older_one_replaced(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    previous = demo.set_aside_previous_run(run_dir)
    assert previous == tmp_path / "runs" / "demo.previous"
    assert not run_dir.exists()
    assert (previous / "metrics.jsonl").read_text() == '{"step": 1}\n'

    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 2}\n')
    assert demo.set_aside_previous_run(run_dir) == previous
    assert (previous / "metrics.jsonl").read_text() == '{"step": 2}\n'  # the older one is gone
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo.previous"]


def test_demo_sets_the_last_run_aside_before_training(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    seen = {}

    def fake_training(cfg):
        seen["run_dir_exists"] = run_dir.exists()
        return SimpleNamespace(exit_code=1)  # stop before evaluation

    monkeypatch.setattr(demo, "prepare_corpus", lambda data_dir: None)
    monkeypatch.setattr("engine.entry.run_training", fake_training)
    args = argparse.Namespace(
        config=str(demo.DEFAULT_CONFIG), data_dir=str(tmp_path / "data"), launcher="inprocess",
        workers=1, overrides=[f"train.run_dir={run_dir}"],
    )
    assert demo.run(args) == 1
    assert seen == {"run_dir_exists": False}
    assert (tmp_path / "runs" / "demo.previous" / "metrics.jsonl").is_file()
    out = capsys.readouterr().out
    assert f"demo: moved the previous demo run {run_dir} to {run_dir}.previous" in out
