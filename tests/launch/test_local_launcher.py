"""`strata submit --launcher local`: N ranks on this machine behave like one process, and the
launcher propagates failures, the requeue exit code and preemption signals."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

from launch_helpers import REPO, read_losses, tiny_config, write_config

from engine.signals import REQUEUE_EXIT_CODE
from launch.local import LocalGroup, _ForwardSignals, rank_environment


def test_nproc2_gives_the_single_process_losses(corpus, tmp_path):
    from engine.entry import run_training

    single = tiny_config(corpus, tmp_path / "single", steps=4)
    assert run_training(single, []).exit_code == 0
    config = write_config(tmp_path / "cfg.yaml", tiny_config(corpus, tmp_path / "unused", steps=4))
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "submit", str(config), "--launcher", "local", "--nproc", "2",
         "--run-dir", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[rank0] step 4/4" in result.stdout  # rank-prefixed live progress
    one, two = read_losses(tmp_path / "single"), read_losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 1e-5, (one, two)


def _group(scripts: list[str]) -> tuple[LocalGroup, io.StringIO]:
    sink = io.StringIO()
    envs = [rank_environment(r, len(scripts), r, len(scripts), "127.0.0.1", 1) for r in range(len(scripts))]
    return LocalGroup([[sys.executable, "-c", s] for s in scripts], envs, sink), sink


def test_one_failing_rank_stops_the_others_and_sets_the_status():
    group, sink = _group(["import time; print('waiting', flush=True); time.sleep(120)",
                          "import os, sys; print('rank', os.environ['RANK'], 'fails'); sys.exit(3)"])
    status = group.wait(failure_grace_s=5)
    assert status == 3
    assert all(p.poll() is not None for p in group.procs)  # the sleeper was stopped, not waited for
    out = sink.getvalue()
    assert "[rank1] rank 1 fails" in out and "[rank0] waiting" in out
    assert "rank 1 exited with status 3" in out


def test_requeue_code_passes_through_when_every_rank_checkpointed():
    group, _ = _group([f"import sys; sys.exit({REQUEUE_EXIT_CODE})"] * 2)
    assert group.wait() == REQUEUE_EXIT_CODE


def test_rank_environment_is_complete():
    env = rank_environment(3, 4, 1, 2, "127.0.0.1", 29500, base={})
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} \
        == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_sigusr1_to_the_launcher_reaches_every_rank_and_the_requeue_code_comes_back():
    waiter = ("import signal, sys, time\n"
              "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
              "print('ready', flush=True)\n"
              "time.sleep(120)\n")
    group, sink = _group([waiter, waiter])
    while sink.getvalue().count("ready") < 2:
        time.sleep(0.05)
    with _ForwardSignals(group):
        os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM or a user sends to the launcher
        assert group.wait(failure_grace_s=5) == REQUEUE_EXIT_CODE
    assert "received SIGUSR1; forwarding to every rank" in sink.getvalue()
