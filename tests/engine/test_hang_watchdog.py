"""The hang watchdog (train.hang_timeout_s): a rank that makes no progress for that long dumps
every thread's stack (stderr and RUN_DIR/hangs/rank<R>.txt) and exits 124; progress keeps it
quiet. End to end: a frozen peer (SIGSTOP) leaves rank 0 blocked in a collective, and the run
ends in seconds with the stacks instead of waiting out the process group's 10-minute timeout."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from distributed_runs import run_tree

from engine.signals import HANG_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]

BLOCKED = """
import sys, threading, time
from pathlib import Path
from engine.watchdog import HangWatchdog

watchdog = HangWatchdog(float(sys.argv[1]), Path(sys.argv[2]), rank=3)
if sys.argv[3] == "busy":  # progress every 50 ms for 2 s: never fires
    for step in range(40):
        time.sleep(0.05)
        watchdog.progress(f"step {step}")
    watchdog.close()
else:
    watchdog.progress("a read that never returns")
    threading.Event().wait()  # blocked in C, as in a stuck collective
"""


def _run(timeout_s: float, run_dir: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED, str(timeout_s), str(run_dir), mode], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip


def test_no_progress_dumps_every_stack_and_exits_124_and_progress_keeps_it_quiet(tmp_path):
    done = _run(0.5, tmp_path, "blocked")
    assert done.returncode == HANG_EXIT_CODE, done.stderr
    assert "error: rank 3: no progress for" in done.stderr and "during a read that never returns" in done.stderr
    report = (tmp_path / "hangs" / "rank3.txt").read_text()
    assert "train.hang_timeout_s=0.5" in report and "in wait" in report and "<string>" in report  # the main thread's frame

    quiet = _run(0.5, tmp_path / "busy", "busy")
    assert quiet.returncode == 0 and quiet.stderr == "" and not (tmp_path / "busy" / "hangs").exists()


def test_a_frozen_rank_ends_the_run_with_the_stacks_of_the_rank_waiting_for_it(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    overrides = {"logging.progress": True, "train.hang_timeout_s": 4}
    config.write_text(yaml.safe_dump(run_tree(tiny_corpus, run_dir, steps=500, **overrides)))
    launcher = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config), "--nproc", "2"], cwd=REPO,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines, ranks, frozen_at = [], [], None
    try:
        for line in launcher.stdout:
            lines.append(line)
            if match := re.search(r"started 2 ranks \(pids (\d+), (\d+)\)", line):
                ranks = [int(match.group(1)), int(match.group(2))]
            if frozen_at is None and "[rank0] step 3/" in line:
                os.kill(ranks[1], signal.SIGSTOP)  # a frozen peer: rank 0 waits in its next collective
                frozen_at = time.monotonic()
        code = launcher.wait(timeout=120)
    finally:
        launcher.kill()
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = "".join(lines)
    assert code == HANG_EXIT_CODE, out
    assert time.monotonic() - frozen_at < 60, out  # seconds, not the collective's 10-minute timeout
    assert re.search(r"rank 0: no progress for \d+ s \(train.hang_timeout_s=4\) during step \d+", out), out
    assert f"rank 0 exited with status {HANG_EXIT_CODE}" in out, out
    report = (run_dir / "hangs" / "rank0.txt").read_text()
    assert "in all_reduce" in report and "engine/trainer.py" in report, report  # where it stuck: a collective of the loop
