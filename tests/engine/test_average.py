"""`strata average`: checkpoint weights averaged into a full checkpoint the other commands take."""

from __future__ import annotations

import json

import pytest
import torch

from engine.entry import run_training
from engine.export import load_checkpoint_weights
from launch.cli import main
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run_dir(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("avg") / "run"
    tree = tiny_config(tiny_corpus, run_dir, **{"checkpoint.every": 2, "checkpoint.keep_last": 5,
                                                "schedule": {"name": "constant", "warmup_steps": 1}})  # fmt: skip
    assert run_training(tree).exit_code == 0
    return run_dir


def test_the_last_k_checkpoints_average_to_their_mean(run_dir, tmp_path, capsys):
    out = tmp_path / "avg"
    assert main(["average", str(run_dir), "--last", "2", "--out", str(out)]) == 0
    assert "averaged 2 checkpoints (step_00000004, step_00000006)" in capsys.readouterr().out
    averaged, _, _ = load_checkpoint_weights(out)
    four, _, _ = load_checkpoint_weights(run_dir / "checkpoints" / "step_00000004")
    six, _, _ = load_checkpoint_weights(run_dir / "checkpoints" / "step_00000006")
    for name, tensor in averaged.items():
        torch.testing.assert_close(tensor, (four[name].double() + six[name].double()).div(2).float(), msg=name)
    record = json.loads((out / "averaged.json").read_text())
    assert record["weights"] == [0.5, 0.5] and record["checkpoints"][-1].endswith("step_00000006")
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6  # the newest source's counters


def test_weights_and_the_other_commands_take_it(run_dir, tiny_corpus, tmp_path, capsys):
    steps = [str(run_dir / "checkpoints" / f"step_0000000{s}") for s in (2, 6)]
    out = tmp_path / "weighted"
    assert main(["average", *steps, "--weights", "0,1", "--out", str(out)]) == 0  # all weight on step 6
    weighted, _, _ = load_checkpoint_weights(out)
    six, _, _ = load_checkpoint_weights(run_dir / "checkpoints" / "step_00000006")
    for name, tensor in weighted.items():
        torch.testing.assert_close(tensor, six[name], msg=name)
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(tiny_corpus / "val"), "--json", "--max-batches", "1"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["step"] == 6 and row["results"]["val"]["val_loss"] > 0
    resumed = tmp_path / "continued"
    argv = ["resume", str(out), "--steps", "2", "--optimizer", "reset", "--run-dir", str(resumed)]
    assert main(argv) == 0  # continual pretraining from the averaged weights
    assert json.loads((resumed / "summary.json").read_text())["step"] == 8


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--last", "1"], "1 checkpoint(s) found: averaging needs at least 2"),
        (["--weights", "1,x"], "comma-separated numbers"),
        (["--weights", "1,1"], "--weights: 3 non-negative numbers"),
    ],
)
def test_bad_input_is_exit_2(run_dir, tmp_path, capsys, argv, message):
    base = [str(run_dir), "--out", str(tmp_path / "x")]
    if argv[0] == "--weights":
        base = [str(run_dir), "--last", "3", "--out", str(tmp_path / "x")]
    assert main(["average", *base, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
