"""`strata submit --launcher ray`: CPU workers on an embedded Ray instance bound to 127.0.0.1,
the single-process losses, and the failure policy (a worker killed by PID mid-run -> the group
restarts from the latest checkpoint; nothing trained twice after the restore point; a run that
keeps failing exits non-zero). One Ray instance serves the in-process tests of this module."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from launch_helpers import read_losses, strata, tiny_config, write_config

from engine.checkpoint import latest_checkpoint
from launch.ray_launcher import (
    LOOPBACK,
    SAMPLES_DIR,
    WORKERS_FILE,
    RayLauncher,
    RayOptions,
    RayRun,
    connect,
    node_device_plan,
)


def test_cli_runs_two_cpu_workers_with_the_single_process_losses(corpus, tmp_path):
    from engine.entry import run_training

    assert run_training(tiny_config(corpus, tmp_path / "single", steps=4), []).exit_code == 0
    config = write_config(tmp_path / "cfg.yaml", tiny_config(corpus, tmp_path / "unused", steps=4))
    result = strata("submit", str(config), "--launcher", "ray", "--workers-per-node", "2",
                    "--run-dir", str(tmp_path / "ray"), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "on a local Ray instance on 127.0.0.1" in out
    assert "(rank0 pid=" in out and "step 4/4" in out  # worker logs reach the driver, rank-prefixed
    # the launcher says how the run ended itself (rank 0's own last line can be lost in teardown)
    assert "[launcher] run finished at step 4 " in out and f"outputs in {tmp_path / 'ray'}/" in out
    single, ray = read_losses(tmp_path / "single"), read_losses(tmp_path / "ray")
    assert len(ray) == 4 and max(abs(a - b) for a, b in zip(single, ray, strict=True)) < 1e-5


@pytest.fixture(scope="module")
def local_ray():
    options = RayOptions(num_cpus=2, object_store_mb=128)
    connect(options)
    import ray

    yield ray
    ray.shutdown()


def _descendants_listening() -> set[str]:
    import psutil

    addresses = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    addresses.add(conn.laddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return addresses


def test_local_instance_listens_on_loopback_only(local_ray):
    addresses = _descendants_listening()
    assert addresses, "found no Ray servers to check"
    assert addresses <= {LOOPBACK, "::ffff:127.0.0.1", "::1"}, addresses


def _read_samples(run_dir: Path) -> list[dict]:
    records = []
    for path in sorted((run_dir / "launcher" / SAMPLES_DIR).glob("rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def _kill_rank1_after_first_checkpoint(run_dir: Path, steps: int, report: dict) -> None:
    """Freeze the group right after a checkpoint exists, check it is mid-run, kill rank 1 by PID."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        workers = run_dir / "launcher" / WORKERS_FILE
        if workers.exists() and latest_checkpoint(run_dir / "checkpoints") is not None:
            pids = {w["rank"]: w["pid"] for w in json.loads(workers.read_text())["workers"]}
            os.kill(pids[0], signal.SIGSTOP)  # rank 0 frozen: no rank can pass the next collective
            metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
            report["step_at_kill"] = json.loads(metrics[-1])["step"]
            os.kill(pids[1], signal.SIGKILL)
            os.kill(pids[0], signal.SIGCONT)
            report["killed"] = pids[1]
            return
        time.sleep(0.02)


def test_killed_worker_restarts_from_the_latest_checkpoint_without_retraining_samples(local_ray, corpus, tmp_path):
    run_dir, steps = tmp_path / "run", 30
    config = write_config(tmp_path / "cfg.yaml", tiny_config(corpus, run_dir, steps=steps, checkpoint_every=5))
    report: dict = {}
    killer = threading.Thread(target=_kill_rank1_after_first_checkpoint, args=(run_dir, steps, report))
    killer.start()
    run = RayRun(str(config), (f"train.run_dir={run_dir}",), None, str(run_dir))
    status = RayLauncher(run, RayOptions(workers_per_node=2, max_failures=2, sample_log=True)).launch()
    killer.join()
    assert "killed" in report and report["step_at_kill"] < steps, report
    assert status == 0
    assert json.loads((run_dir / "summary.json").read_text())["step"] == steps
    assert json.loads((run_dir / "launcher" / WORKERS_FILE).read_text())["attempt"] == 1

    records = _read_samples(run_dir)
    second = [r for r in records if r["attempt"] == 1]
    restore_step = min(r["step"] for r in second) - 1
    assert restore_step >= 5 and restore_step % 5 == 0  # resumed from a checkpoint, not from scratch
    kept = [r for r in records if r["attempt"] == 0 and r["step"] <= restore_step] + second
    for rank in (0, 1):
        assert sorted(r["step"] for r in kept if r["rank"] == rank) == list(range(1, steps + 1))
    trained = [tuple(s) for r in kept for s in r["samples"]]
    assert len(trained) == len(set(trained)), "a sample was trained twice after the restore point"
    # the steps redone after the restore are the very same samples (the sampler is deterministic)
    first = {(r["rank"], r["step"]): r["samples"] for r in records if r["attempt"] == 0}
    redone = [r for r in second if (r["rank"], r["step"]) in first]
    assert all(first[(r["rank"], r["step"])] == r["samples"] for r in redone)


def test_run_that_keeps_failing_exits_nonzero_after_max_failures(local_ray, corpus, tmp_path, capfd):
    run_dir = tmp_path / "run"
    config = tiny_config(corpus, run_dir, steps=2)
    config["data"]["sources"] = [{"path": str(tmp_path / "no-such-shardset")}]
    path = write_config(tmp_path / "cfg.yaml", config)
    run = RayRun(str(path), (), None, str(run_dir))
    status = RayLauncher(run, RayOptions(workers_per_node=2, max_failures=0)).launch()
    out = capfd.readouterr().out
    assert status == 1
    assert "no-such-shardset" in out  # the worker's error reaches the driver
    assert "no restarts left (--max-failures 0): the run failed" in out


def test_ray_encoding_gives_the_process_pool_result_in_order(local_ray):
    import numpy as np

    from data_pipeline import sources
    from data_pipeline.prepare import _encoded_batches
    from data_pipeline.tokenizer import train_byte_level_bpe
    from launch.ray_launcher import ray_encoded_batches

    texts = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 3) for i in range(60)]
    tokenizer = train_byte_level_bpe(texts, vocab_size=300)
    records = [(i, "src", sources.KIND_TEXT, t.encode()) for i, t in enumerate(texts)]
    records.append((60, "src", sources.KIND_JSON, b"{not json"))
    batches = [records[i:i + 7] for i in range(0, len(records), 7)]
    encoder_args = (tokenizer.to_str(), 0, "uint16", "text", 1_000_000)
    expected = list(_encoded_batches(iter(batches), encoder_args, workers=1))
    got = list(ray_encoded_batches(iter(batches), encoder_args, workers=2))
    assert [b for b, _ in got] == batches
    for (_, want), (_, have) in zip(expected, got, strict=True):
        assert have.outcomes == want.outcomes
        assert np.array_equal(have.tokens, want.tokens) and np.array_equal(have.doc_lengths, want.doc_lengths)
    assert got[-1][1].outcomes[-1] == "invalid_json"


def test_prepare_on_ray_writes_the_same_shards_as_local_workers(local_ray, tmp_path):
    """`strata prepare --ray`: PrepareOptions.encode_map on Ray tasks, byte-identical output."""
    from functools import partial

    from data_pipeline.prepare import PrepareOptions, prepare
    from launch.ray_launcher import ray_encoded_batches

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"line {i} " * (i % 9 + 1)}) + "\n" for i in range(300)))
    common = {"train_tokenizer": 300, "batch_bytes": 2048, "progress": False, "shard_size": "4kb"}
    prepare([str(src)], tmp_path / "local", PrepareOptions(workers=1, **common))
    ray_map = partial(ray_encoded_batches, address=None)
    prepare([str(src)], tmp_path / "ray", PrepareOptions(workers=2, encode_map=ray_map, **common))
    local_files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    ray_files = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    assert local_files == ray_files and len(local_files) > 4
    for rel in local_files:
        assert (tmp_path / "local" / rel).read_bytes() == (tmp_path / "ray" / rel).read_bytes(), rel


def test_gpu_ranks_of_a_node_see_all_the_node_group_gpus():
    described = [
        {"rank": 0, "node_id": "a", "gpu_ids": ["3"]}, {"rank": 1, "node_id": "a", "gpu_ids": ["1"]},
        {"rank": 2, "node_id": "b", "gpu_ids": ["0"]}, {"rank": 3, "node_id": "b", "gpu_ids": ["10"]},
    ]
    assert node_device_plan(described) == {0: ("1,3", 1), 1: ("1,3", 0), 2: ("0,10", 0), 3: ("0,10", 1)}
    assert node_device_plan([{"rank": 0, "node_id": "a", "gpu_ids": []}]) == {0: None}


def test_a_rank_ended_by_the_hang_watchdog_is_named_as_a_hang_not_a_dead_actor(tmp_path):
    """The watchdog's os._exit(124) kills the Ray actor, so Ray only says the worker died: the
    launcher names the hang from the report the watchdog wrote during this attempt."""
    import subprocess
    import sys

    from launch.ray_launcher import _hang_report

    started = time.time()
    assert _hang_report(str(tmp_path), 1, since=started) is None
    watchdog = ("import sys, threading; from pathlib import Path; from engine.watchdog import HangWatchdog\n"
                "watchdog = HangWatchdog(0.3, Path(sys.argv[1]), rank=1); watchdog.progress('step 24')\n"
                "threading.Event().wait()\n")  # fmt: skip
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", watchdog, str(tmp_path)], cwd=repo, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(repo)})  # fmt: skip
    assert done.returncode == 124
    report = _hang_report(str(tmp_path), 1, since=started)
    assert report is not None and report.startswith("the hang watchdog: rank 1: no progress for "), report
    assert "during step 24" in report and report.endswith(f"stacks in {tmp_path / 'hangs' / 'rank1.txt'}"), report
    assert _hang_report(str(tmp_path), 0, since=started) is None  # another rank's report
    assert _hang_report(str(tmp_path), 1, since=time.time() + 60) is None  # an earlier attempt's
