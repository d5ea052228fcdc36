"""`strata report` and engine.report: the one metrics reader, run summaries, the plot, the CLI."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from engine.checkpoint import step_dir_name
from engine.config import load_config
from engine.entry import run_training
from engine.report import load_run, read_metrics, report_panels, summarize
from engine.signals import REQUEUE_EXIT_CODE
from engine.trainer import Trainer
from launch.cli import main
from models.spec import get_spec
from tests.conftest import tiny_config

TORN = "invalid JSON (torn or corrupt line)"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def raw_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_run(tiny_corpus, tmp_path_factory):
    """6 steps, a record every 2 steps, evals at 3 (between two log steps) and 6, checkpoints 3, 6."""
    run_dir = tmp_path_factory.mktemp("report") / "plain"
    tree = tiny_config(tiny_corpus, run_dir, **{"logging.log_every": 2, "train.eval_every": 3})
    assert run_training(tree).exit_code == 0
    return run_dir


@pytest.fixture(scope="module")
def resumed_run(tiny_corpus, tmp_path_factory):
    """Stopped after step 5, its step-5 checkpoint lost (as a kill before the save would), then
    resumed from step 3 with `strata train --resume`: steps 4 and 5 are logged twice."""
    run_dir = tmp_path_factory.mktemp("report") / "resumed"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_stop_agreed", lambda self: self.step == 5)
        assert run_training(tiny_config(tiny_corpus, run_dir)).exit_code == REQUEUE_EXIT_CODE
    shutil.rmtree(run_dir / "checkpoints" / step_dir_name(5))
    assert main(["train", "--resume", str(run_dir)]) == 0
    return run_dir


def test_summary_numbers_are_what_metrics_jsonl_says(plain_run):
    lines = raw_lines(plain_run)
    windows = [r for r in lines if "step_time_s" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in windows] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    (eval_only,) = [r for r in lines if r["step"] == 3]  # the eval's own record: one step's loss, no timing
    assert "tokens_per_s" not in eval_only and "loss" in eval_only  # (it was 0.0: a dip to 0 in TensorBoard)
    s = summarize(load_run(plain_run))
    assert s["status"] == "finished" and s["exit_code"] == 0
    assert (s["steps_done"], s["steps_planned"]) == (6, 6)
    assert (
        s["tokens_seen"]
        == windows[-1]["tokens_seen"]
        == json.loads((plain_run / "summary.json").read_text())["tokens_seen"]
    )
    assert s["train_time_s"] == pytest.approx(sum(r["step_time_s"] for r in windows) * 2)
    assert s["train_loss_last"] == {"step": 6, "loss": windows[-1]["loss"]}
    lowest = min(windows, key=lambda r: r["loss"])
    assert s["train_loss_min"] == {"step": lowest["step"], "loss": lowest["loss"]}
    val = {r["step"]: r for r in evals}
    assert s["val"]["last"] == {
        "step": 6,
        "val_loss": val[6]["val_loss"],
        "val_bpb": val[6]["val_bpb"],
    }
    best = min(evals, key=lambda r: r["val_loss"])
    assert s["val"]["best"] == {
        "step": best["step"],
        "val_loss": best["val_loss"],
        "val_bpb": best["val_bpb"],
    }
    for key in (
        "tokens_per_s",
        "tokens_per_s_per_device",
        "data_wait_frac",
    ):  # the eval's 0 tokens/s not counted
        assert s[f"{key}_median"] == statistics.median(r[key] for r in windows), key
    assert s["devices"] == 1 and s["mfu_median"] is None and s["peak_mem_gb"] is None
    assert s["lr_final"] == windows[-1]["lr"]
    norms = [r["grad_norm"] for r in windows]
    assert s["grad_norm"]["median"] == statistics.median(norms)
    assert s["grad_norm"]["max"] == max(norms)
    assert s["grad_norm"]["spikes"] == 0 and s["non_finite_losses"] == 0
    assert s["resumes"] == [] and s["bad_lines"] == {} and s["continual"] is None
    assert s["checkpoints"] == {"committed": [3, 6], "broken": []}
    model = get_spec("llama").build(load_config(plain_run / "config.yaml").model)  # a real one
    assert s["model"]["family"] == "llama"
    assert s["model"]["params"] == sum(p.numel() for p in model.parameters())
    assert 0 < s["model"]["non_embedding_params"] < s["model"]["params"]
    assert s["config"] == {
        "seq_len": 32,
        "global_batch_size": 8,
        "tokens_per_step": 256,
        "schedule": "cosine",
        "lr": 3e-3,
        "steps": 6,
        "log_every": 2,
        "sources": ["tiny"],
    }


def test_a_resumed_run_is_reported_once_per_step_with_its_resume(resumed_run):
    lines = [r for r in raw_lines(resumed_run) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 4, 5, 6]  # the file holds both segments
    history = read_metrics(resumed_run)
    assert [r["step"] for r in history.records] == [1, 2, 3, 4, 5, 6]
    last_of = {r["step"]: r for r in lines}  # the second segment's records of steps 4 and 5
    assert all(record["loss"] == last_of[record["step"]]["loss"] for record in history.records)
    s = summarize(load_run(resumed_run))
    assert s["resumes"] == [
        {
            "step": 3,
            "checkpoint": str(resumed_run / "checkpoints" / step_dir_name(3)),
            "world_size": 1,
            "saved_world_size": 1,
        }
    ]
    assert s["status"] == "finished" and s["steps_done"] == 6 and s["logged_records"] == 6
    assert s["checkpoints"]["committed"] == [3, 6]
    assert s["tokens_seen"] == lines[-1]["tokens_seen"]


def test_read_metrics_merges_steps_drops_redone_ones_and_counts_bad_lines(tmp_path):
    def line(**record) -> str:
        return json.dumps(record)

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "\n".join(
            [
                line(step=1, loss=5.0),
                line(step=2, loss=4.0),
                line(step=2, val_loss=4.5),  # the eval of step 2: merged with its train record
                line(step=3, loss=3.0, only_first=True),
                '{"step": 4, "loss": 2.'
                + line(step=2, event="resume", checkpoint="c", world_size=2, saved_world_size=1),
                line(
                    step=3, loss=3.5
                ),  # re-done after the resume: replaces step 3, and step 4 is gone
                "[1, 2]",
                line(loss=1.0),
                "",
                line(step=4, loss=2.5),
                line(
                    step=2, loss=9.0
                ),  # started over without a checkpoint (no event): 2.. replaced
                '{"step": 3, "lo',
            ]
        )
    )
    records, resumes, bad = read_metrics(path)
    assert records == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 9.0}]
    assert [(e["step"], e["world_size"], e["saved_world_size"]) for e in resumes] == [(2, 2, 1)]
    assert bad == {TORN: 2, "not a JSON object": 1, "no integer step": 1}
    without_restart = path.read_text().split('\n{"step": 2, "loss": 9.0}')[0]
    path.write_text(without_restart)
    records, _, _ = read_metrics(tmp_path)  # a run directory works as well
    assert records == [
        {"step": 1, "loss": 5.0},
        {"step": 2, "loss": 4.0, "val_loss": 4.5},
        {"step": 3, "loss": 3.5},
        {"step": 4, "loss": 2.5},
    ]


def test_a_crashed_run_with_a_torn_last_line_is_reported(plain_run, tmp_path, capsys):
    run_dir = tmp_path / "crashed"
    shutil.copytree(plain_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    (run_dir / "summary.json").unlink()  # the process died before writing it
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 7, "loss": 3.1')
    assert main(["report", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (s,) = report["runs"]
    assert s["bad_lines"] == {TORN: 1} and s["steps_done"] == 6
    assert s["status"].startswith("in progress / stopped")
    assert s["checkpoints"] == {"committed": [], "broken": []}
    assert (
        report["plot"] == str(run_dir / "report.png")
        and (run_dir / "report.png").read_bytes()[:8] == PNG_MAGIC
    )
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "in progress / stopped" in out and TORN in out
    # the next process's first record starts on a line of its own
    from engine.metrics import MetricsSink

    sink = MetricsSink(run_dir, tensorboard=False)
    sink.event(6, "resume", checkpoint="x", world_size=1, saved_world_size=1)
    sink.close()
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "resume"
    history = read_metrics(run_dir)
    assert history.bad_lines == {TORN: 1} and [e["step"] for e in history.resumes] == [6]


def test_two_runs_side_by_side_write_one_png(plain_run, resumed_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # one table line per row
    assert main(["report", str(plain_run), str(resumed_run)]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "resumed" in out and "step 3 (1 rank)" in out
    assert "report.png (x: tokens)" in out  # several runs: equal tokens on the x axis
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("*.tmp"))
    assert (
        main(
            [
                "report",
                str(plain_run),
                str(resumed_run),
                "--x",
                "step",
                "--out",
                str(tmp_path / "a" / "b.png"),
            ]
        )
        == 0
    )
    assert "b.png (x: step)" in capsys.readouterr().out and (tmp_path / "a" / "b.png").is_file()


def test_mixture_and_sequence_length_panels_appear_when_logged(tmp_path, capsys):
    run_dir = tmp_path / "bare"  # a metrics.jsonl alone: no config, no summary, no checkpoints
    run_dir.mkdir()
    records = [
        {
            "step": s,
            "loss": 6.0 - s / 10,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens_seen": 256 * s,
            "tokens_per_s": 100.0,
            "tokens_per_s_per_device": 50.0,
            "data_wait_frac": 0.01,
            "step_time_s": 2.56,
            "mfu": 0.3,
            "mixture_weight/web": 0.7 - s / 100,
            "mixture_weight/code": 0.3 + s / 100,
            "mixture_temperature": 2.0,
            "seq_len": float(2 ** (5 + s % 3)),
        }
        for s in range(1, 9)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = load_run(run_dir)
    assert report_panels([run]) == ["loss", "lr", "throughput", "grad_norm", "mixture", "seq_len"]
    s = summarize(run)
    assert s["mfu_median"] == pytest.approx(0.3) and s["devices"] == 2 and s["train_time_s"] is None
    assert s["config_problem"].startswith("config file not found")
    assert main(["report", str(run_dir)]) == 0
    assert "config file not found" in capsys.readouterr().out
    assert (run_dir / "report.png").read_bytes()[:8] == PNG_MAGIC


def test_grad_norm_spikes_and_non_finite_losses_are_counted(tmp_path):
    run_dir = tmp_path / "spiky"
    run_dir.mkdir()
    norms = [1.0, 1.1, 0.9, 1.0, 1.2, 9.0, 1.0, float("nan"), 1.1, 30.0]
    losses = [5.0, 4.9, float("nan"), 4.8, 4.7, 4.6, 4.5, 4.4, float("inf"), 4.3]
    (run_dir / "metrics.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "step": k + 1,
                    "loss": loss,
                    "grad_norm": norm,
                    "step_time_s": 1.0,
                    "skipped_steps": 2,
                }
            )
            + "\n"
            for k, (loss, norm) in enumerate(zip(losses, norms, strict=True))
        )
    )
    s = summarize(load_run(run_dir))
    assert (
        s["grad_norm"]["spikes"] == 2 and s["grad_norm"]["max"] == 30.0
    )  # 9.0 and 30.0; NaN not judged
    assert s["non_finite_losses"] == 2 and s["skipped_steps"] == 2
    assert s["train_loss_min"] == {"step": 10, "loss": 4.3}
    json.dumps(s, allow_nan=False)  # --json never prints NaN


def test_missing_run_directory_or_metrics_is_exit_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert main(["report", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"report: error: run directory not found: {missing}"
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no metrics.jsonl in {tmp_path}" in err


def test_a_model_section_that_does_not_build_is_named_not_fatal():
    from engine.report import model_facts

    assert model_facts({}) == {"family": "llama", "params": None, "non_embedding_params": None}
    facts = model_facts({"family": "llama", "dim": 7, "n_heads": 4})
    assert facts["params"] is None and facts["problem"] == "model: n_heads (4) must divide dim (7)"
    facts = model_facts({"family": "rwkv"})
    assert facts["params"] is None and facts["problem"].startswith("model.family")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_metrics_write_onto_a_full_disk_is_said_once_and_counted_never_fatal(tmp_path, capsys):
    from engine.metrics import MetricsSink

    sink = MetricsSink(tmp_path, tensorboard=False)
    sink.write({"step": 1, "loss": 5.0})
    good, sink.file = sink.file, open("/dev/full", "a")  # every write: ENOSPC
    good.close()
    for step in (2, 3):
        sink.write({"step": step, "loss": 4.0})
    sink.event(3, "checkpoint_failed", saving_step=3, reason="disk full")
    sink.close()
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 1 and "training goes on" in err
    assert f"{sink.failed_writes} write(s) to {tmp_path / 'metrics.jsonl'} failed" in err and sink.failed_writes >= 3
    assert [r["step"] for r in read_metrics(tmp_path).records] == [1]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_tensorboard_write_onto_a_full_disk_is_said_once_never_fatal_and_no_traceback(tmp_path, capfd):
    import time

    from engine.metrics import MetricsSink

    sink = MetricsSink(tmp_path, tensorboard=True)
    sink.write({"step": 1, "loss": 5.0})
    sink.tb.flush()
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    events.unlink()
    events.symlink_to("/dev/full")  # TensorBoard appends with a fresh open per record: each one ENOSPC
    step = 2
    while sink.tb is not None and step < 400:  # its writer thread fails, the next add_scalar raises it
        sink.write({"step": step, "loss": 4.0})
        step += 1
        time.sleep(0.01)
    assert sink.tb is None, "the failed TensorBoard write never surfaced"
    sink.write({"step": step, "loss": 3.0})
    sink.close()
    err = capfd.readouterr().err
    assert err.count("writing TensorBoard events") == 1 and "training goes on" in err, err
    assert "Traceback" not in err, err
    assert [r["step"] for r in read_metrics(tmp_path).records] == list(range(1, step + 1))


def test_a_run_stopped_by_failing_checkpoints_says_so_and_how_to_go_on(tmp_path):
    from engine.report import EXIT_STATUS, closing_line

    line = closing_line({"exit_code": 74, "step": 8, "tokens_seen": 4096}, tmp_path)
    assert line.startswith("run stopped: checkpoints failing at step 8 (4,096 tokens)"), line
    assert line.endswith(f"free space on the checkpoint disk, then `strata train --resume {tmp_path}`"), line
    assert "--resume" not in closing_line({"exit_code": 0, "step": 8}, tmp_path)
    assert EXIT_STATUS[74] == "stopped: checkpoint saves failing (exit 74)"


def test_the_progress_line_of_an_eval_between_log_steps_shows_no_throughput(capsys):
    from engine.metrics import ProgressLine

    progress = ProgressLine(total_steps=6, start_step=0)
    progress.update(1, {"step": 2, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 1234.0})
    progress.update(2, {"step": 3, "loss": 4.9, "lr": 1e-3, "val_loss": 5.1})
    window, eval_only = capsys.readouterr().out.splitlines()
    assert "1,234 tok/s" in window and "tok/s" not in eval_only and "val 5.1000" in eval_only
