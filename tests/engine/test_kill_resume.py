"""Kill test: a 2-process FSDP2 run (async checkpoints every 3 steps) SIGKILLed at a random
step and resumed from its last committed checkpoint reproduces the uninterrupted run's
per-step losses exactly from the checkpoint step on (CPU, deterministic settings)."""

from __future__ import annotations

import json
import random
import re
import signal
import time

from distributed_runs import RankGroup, losses, run_ranks, run_tree, shared_run

from engine.checkpoint import list_checkpoints, verify

STEPS = 20


def _last_step(metrics) -> int:
    if not metrics.exists():
        return 0
    return max((json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()), default=0)


def _committed(run_dir) -> list:
    return [p for p in list_checkpoints(run_dir / "checkpoints") if verify(p) is None]


def test_sigkill_at_a_random_step_then_resume_reproduces_the_uninterrupted_losses(tiny_corpus, tmp_path_factory, tmp_path):
    reference = losses(shared_run("fsdp2", tmp_path_factory, tiny_corpus, 2, steps=STEPS))
    kill_after = random.Random().randint(4, 12)
    run_dir = tmp_path / "run"
    tree = run_tree(tiny_corpus, run_dir, steps=STEPS, **{"checkpoint.every": 3, "checkpoint.async_save": True})
    group = RankGroup(2, run_dir, tree)
    deadline = time.monotonic() + 240
    # kill once past the chosen step and at least one (async) checkpoint is committed
    while _last_step(run_dir / "metrics.jsonl") < kill_after or not _committed(run_dir):
        assert all(p.exitcode is None for p in group.procs), f"the run ended early:\n{group.logs()}"
        assert time.monotonic() < deadline, group.logs()
        time.sleep(0.002)
    for proc in group.procs:
        proc.kill()  # SIGKILL: no handler, no final checkpoint
    killed_at = _last_step(run_dir / "metrics.jsonl")
    assert group.wait() == [-signal.SIGKILL] * 2, f"killed after step {killed_at}"

    run_ranks(2, run_dir, resume=str(run_dir))
    log = (run_dir / "rank0.log").read_text()
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert 3 <= resumed_at <= killed_at + 1 and resumed_at % 3 == 0, (killed_at, resumed_at)
    got = losses(run_dir)  # the resumed run's records replace the killed run's for the same step
    for step in range(resumed_at + 1, STEPS + 1):
        assert got[step] == reference[step], (killed_at, resumed_at, step, got[step], reference[step])
