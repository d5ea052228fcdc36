"""SIGTERM test: `strata train --nproc 2` receiving SIGTERM (forwarded by the launcher to its
ranks) finishes the current step, checkpoints, and exits with the requeue code; the resumed
run continues with the uninterrupted run's losses (exactly: same layout, deterministic CPU)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from distributed_runs import losses, run_ranks, run_tree, shared_run

from engine.checkpoint import latest_checkpoint
from engine.signals import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
STEPS = 20


def _strata(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigterm_checkpoints_exits_for_requeue_and_the_resumed_run_continues(tiny_corpus, tmp_path_factory, tmp_path):
    reference = losses(shared_run("fsdp2", tmp_path_factory, tiny_corpus, 2, steps=STEPS))
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(run_tree(tiny_corpus, run_dir, steps=STEPS, **{"logging.progress": True})))
    launcher = _strata("train", str(config), "--nproc", "2")
    lines, ranks = [], []
    try:
        for line in launcher.stdout:
            lines.append(line)
            if match := re.search(r"started 2 ranks \(pids (\d+), (\d+)\)", line):
                ranks = [int(match.group(1)), int(match.group(2))]
            if "[rank0] step 2/" in line:
                # hold the ranks so the signal lands mid-run however fast the steps are
                for pid in ranks:
                    os.kill(pid, signal.SIGSTOP)
                launcher.send_signal(signal.SIGTERM)  # forwarded by the launcher to every rank
            if "received SIGTERM; forwarding" in line:
                for pid in ranks:
                    os.kill(pid, signal.SIGCONT)
        code = launcher.wait(timeout=240)
    finally:
        launcher.kill()
    out = "".join(lines)
    assert code == REQUEUE_EXIT_CODE, out
    stopped = int(re.search(r"stop requested \(SIGTERM\): checkpointed step (\d+); exiting 75", out).group(1))
    assert 2 <= stopped < STEPS, out
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{stopped:08d}"

    run_ranks(2, run_dir, resume=str(run_dir))  # the requeued job (ranks started directly)
    out = (run_dir / "rank0.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in out
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == reference[step], (stopped, step, got[step], reference[step])
