"""`strata submit --launcher slurm` against a real one-node SLURM cluster (slurm_cluster fixture):
a 2-task training job, preemption (USR1 -> checkpoint -> requeue -> resume), a job array, and
hostile values that must stay inert. Each job trains a 2-layer dim-64 Llama for a few steps."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from launch_helpers import strata, tiny_config, write_config

pytestmark = pytest.mark.usefixtures("slurm_cluster")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"}


def _submit(tmp_path: Path, config: Path, *options: str) -> str:
    result = strata("submit", str(config), "--launcher", "slurm", *options, env={"STRATA_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"submitted SLURM job (\d+)", result.stdout)
    assert match, result.stdout
    return match.group(1)


def _states(job_id: str) -> dict[str, dict]:
    from launch.slurm import job_states

    return job_states([job_id])


def _wait_until_final(job_id: str, elements: int = 1, timeout: float = 240) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _states(job_id)
        if len(states) >= elements and all(s["state"] in FINAL_STATES for s in states.values()):
            return states
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout}s: {_states(job_id)}")


def _log(job_id: str, tmp_path: Path) -> str:
    result = strata("logs", job_id, env={"STRATA_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_two_task_training_job_finishes_and_hostile_values_stay_inert(corpus, tmp_path):
    marker_name, marker_env = tmp_path / "pwned-by-name", tmp_path / "pwned-by-env"
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", tiny_config(corpus, run_dir, steps=4))
    job_id = _submit(tmp_path, config, "--workers-per-node", "2", "--job-name", f"inert$(touch {marker_name})",
                     "--env", f"PAYLOAD=$(touch {marker_env})`touch {marker_env}`")
    states = _wait_until_final(job_id)
    assert states[job_id]["state"] == "COMPLETED", (states, _log(job_id, tmp_path))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["step"] == 4
    log = _log(job_id, tmp_path)
    assert "0: step 4/4" in log  # srun --label: output carries the rank
    assert not marker_name.exists() and not marker_env.exists()
    jobs = [json.loads(line) for line in
            strata("jobs", "--json", env={"STRATA_HOME": str(tmp_path / "home")}).stdout.splitlines()]
    assert jobs == [{"job": job_id, "name": f"inert$(touch {marker_name})", "state": "COMPLETED",
                     "elapsed": jobs[0]["elapsed"], "exit": "0:0", "restarts": "0", "run_dir": str(run_dir)}]


def test_usr1_checkpoints_requeues_and_the_job_finishes_with_all_steps(corpus, tmp_path):
    run_dir, steps = tmp_path / "run", 40
    config = write_config(tmp_path / "cfg.yaml", tiny_config(corpus, run_dir, steps=steps, checkpoint_every=10))
    job_id = _submit(tmp_path, config, "--workers-per-node", "2", "--requeue", "--signal-lead", "60")
    log_path = run_dir / "slurm" / f"{job_id}.out"
    deadline = time.monotonic() + 180
    while not (log_path.exists() and "step 2/" in log_path.read_text()):
        assert time.monotonic() < deadline, f"job {job_id} never reached step 2: {_states(job_id)}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    states = _wait_until_final(job_id, timeout=300)
    log = _log(job_id, tmp_path)
    assert states[job_id]["state"] == "COMPLETED", (states, log)
    assert states[job_id]["restarts"] == "1"
    stopped = re.search(r"checkpointed step (\d+); exiting 75", log)
    assert stopped, log
    assert int(stopped.group(1)) < steps
    assert f"resumed from {run_dir}/checkpoints/step_{int(stopped.group(1)):08d}" in log
    assert "requeueing job" in log and "restart 1 on" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["step"] == steps


def test_job_array_elements_train_in_their_own_run_dirs(corpus, tmp_path):
    run_dir = tmp_path / "sweep"
    config = write_config(tmp_path / "cfg.yaml", tiny_config(corpus, run_dir, steps=3))
    job_id = _submit(tmp_path, config, "--array", "0-1", "--workers-per-node", "1",
                     "--set", "train.seed={array_task_id}")
    states = _wait_until_final(job_id, elements=2)
    assert sorted(states) == [f"{job_id}_0", f"{job_id}_1"]
    assert all(s["state"] == "COMPLETED" for s in states.values()), states
    for index in (0, 1):
        element = run_dir / f"array_{index}"
        assert json.loads((element / "summary.json").read_text())["step"] == 3
        assert f"seed: {index}" in (element / "config.yaml").read_text()
        assert "step 3/3" in _log(f"{job_id}_{index}", tmp_path)
