"""Single-process trainer: run directory contents, checkpoint round trip, exact resume."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from engine.checkpoint import Checkpointer, latest_checkpoint
from engine.config import load_config
from engine.dist import init_distributed
from engine.entry import run_training
from engine.report import read_metrics
from engine.signals import REQUEUE_EXIT_CODE
from engine.trainer import Trainer
from launch.cli import main
from tests.conftest import tiny_config


def losses(run_dir) -> dict[int, float]:
    records = read_metrics(run_dir / "metrics.jsonl").records
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def full_run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    result = run_training(tiny_config(tiny_corpus, run_dir))
    return run_dir, result


def test_run_directory_is_complete(full_run):
    run_dir, result = full_run
    assert result.exit_code == 0 and result.step == 6
    for name in ("config.yaml", "metrics.jsonl", "report.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir())
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000006"
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    assert result.val["val_tokens"] > 0 and 0 < result.val["val_bpb"] < 10
    saved = load_config(run_dir / "config.yaml")  # the resolved config reloads
    assert saved.train.steps == 6 and saved.model.dim == 64


def test_checkpoint_round_trip_gives_identical_next_step_loss(tiny_corpus, tmp_path):
    cfg = load_config(tiny_config(tiny_corpus, tmp_path / "a", **{"checkpoint.every": 0}))
    ctx = init_distributed("cpu")
    first = Trainer(cfg, ctx)
    for _ in range(2):
        first.train_step(first.loader.next_step())
        first.step += 1
    path = first.save()
    expected, _, _ = first.train_step(first.loader.next_step())
    first.loader.close()

    second = Trainer(cfg, ctx)  # fresh init, then restore
    state = Checkpointer(tmp_path / "a" / "checkpoints", ctx).load(path, second.model, second.optimizer)
    second.loader.load_state_dict(state["loader"])
    second.schedule.load_state_dict(state["schedule"])
    second.step = state["step"]
    got, _, _ = second.train_step(second.loader.next_step())
    second.loader.close()
    assert got == expected


def test_resume_continues_at_the_right_step_with_identical_losses(full_run, tiny_corpus, tmp_path, capsys, monkeypatch):
    full_dir, _ = full_run
    run_dir = tmp_path / "resumed"
    # interrupt the same 6-step run after step 4 (as a preemption would: checkpoint, exit 75)
    monkeypatch.setattr(Trainer, "_stop_agreed", lambda self: self.step == 4)
    assert run_training(tiny_config(tiny_corpus, run_dir)).exit_code == REQUEUE_EXIT_CODE
    monkeypatch.undo()
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"
    code = main(["train", "--resume", str(run_dir)])  # continue as a user would
    assert code == 0
    assert "resumed from" in capsys.readouterr().out
    resumed, full = losses(run_dir), losses(full_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == full[step], step
    events = read_metrics(run_dir / "metrics.jsonl").resumes  # `strata report` marks it
    assert [(e["step"], e["world_size"], e["saved_world_size"]) for e in events] == [(4, 1, 1)]
    assert events[0]["checkpoint"].endswith("step_00000004")


def test_cpu_runs_in_fp32(full_run):
    run_dir, _ = full_run
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.train.dtype == "auto"
    from engine.trainer import autocast_dtype

    assert autocast_dtype(cfg, torch.device("cpu")) is None


def test_mfu_counts_the_flops_of_each_step(tiny_corpus, tmp_path):
    """MFU = FLOPs of the window's tokens (at each step's row length) / time / devices / peak."""
    from models.spec import get_spec

    tree = tiny_config(tiny_corpus, tmp_path / "run", **{"train.steps": 3, "logging.peak_flops": 1e12})
    run_training(tree)
    cfg = load_config(tree)
    per_token = get_spec("llama").flops_per_token(cfg.model, cfg.data.seq_len)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl").records if "mfu" in r]
    assert len(steps) == 3
    for r in steps:  # log_every 1: a window is one step
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s_per_device"] / 1e12, rel=1e-9)


def test_profiler_window_writes_a_trace_and_an_operator_table(tiny_corpus, tmp_path, capsys):
    tree = tiny_config(tiny_corpus, tmp_path / "run", **{"logging.profile_at": 2, "logging.profile_steps": 2,
                                                         "logging.memory_snapshot": True})
    assert run_training(tree).exit_code == 0
    out = tmp_path / "run" / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["rank0_step2.ops.txt", "rank0_step2.trace.json.gz"]
    trace = json.loads(gzip.decompress((out / "rank0_step2.trace.json.gz").read_bytes()))
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("addmm" in name or "mm" == name.split("::")[-1] for name in names)  # the model's matmuls
    table = (out / "rank0_step2.ops.txt").read_text()
    assert table.startswith("steps 2-3, rank 0, cpu") and "Self CPU" in table
    printed = capsys.readouterr().out
    assert "profile of steps 2-3 written to" in printed
    assert "logging.memory_snapshot: CUDA only, not taken on cpu" in printed  # said, not silently dropped


def test_named_val_sets_are_logged_beside_the_main_one(tiny_corpus, tmp_path):
    tree = tiny_config(tiny_corpus, tmp_path / "run", **{"data.val_sets": {"again": str(tiny_corpus / "val")},
                                                         "train.steps": 2, "train.eval_every": 1})
    result = run_training(tree)
    assert result.val["val_loss/again"] == result.val["val_loss"]  # the same ShardSet twice
    assert result.val["val_bpb/again"] == result.val["val_bpb"] and result.val["val_tokens/again"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss/again" in r] == [1, 2]


def test_a_val_set_name_with_a_slash_is_a_config_error():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="data.val_sets"):
        load_config({"data": {"val_sets": {"a/b": "x"}}})


def test_wandb_offline_logs_the_run_and_a_resume_continues_the_same_wandb_run(tiny_corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from engine.metrics import WANDB_ID_FILE, MetricsSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    tree = tiny_config(tiny_corpus, run_dir, **{"logging.wandb_project": "strata-tests", "logging.wandb_mode": "offline",
                                                "train.steps": 2})  # fmt: skip
    assert run_training(tree).exit_code == 0
    run_id = (run_dir / WANDB_ID_FILE).read_text()
    assert [p.name.endswith(f"-{run_id}") for p in (run_dir / "wandb").glob("offline-run-*")] == [True]
    sink = MetricsSink(run_dir, tensorboard=False, wandb={"project": "strata-tests", "entity": None,
                                                          "mode": "offline", "config": {}})  # fmt: skip
    assert sink.wandb.id == run_id  # the resumed process appends to the same W&B run
    logged, log = [], sink.wandb.log
    sink.wandb.log = lambda data, step: (logged.append((step, data)), log(data, step=step))
    sink.write({"step": 3, "loss": 1.5, "mfu": None, "note": "x", "val_loss/old": float("nan")})
    assert logged == [(3, {"loss": 1.5})]  # numbers only, finite only, at the run's step
    sink.close()


def test_wandb_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from engine.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb_project: .*wandb is not installed"):
        load_config({"logging": {"wandb_project": "p"}})
