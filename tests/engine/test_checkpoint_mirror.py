"""Checkpoint mirror: a 2-process run uploads its checkpoints to S3 (a local moto server, the
real S3 protocol) and prunes them; a fresh machine resumes from the bucket on 1 process and
continues the loss curve (1e-4); a remote step without its marker or with a truncated file is
skipped for the previous one; an unreachable mirror never stops training; a path mirror works; `strata doctor` probes it."""

from __future__ import annotations

import logging
import multiprocessing.forkserver
import os
import threading

import pytest
import torch
from distributed_runs import assert_close, losses, run_ranks, run_tree

from engine import checkpoint_mirror
from engine.checkpoint import MARKER, Checkpointer, list_checkpoints, verify
from engine.checkpoint_mirror import CheckpointMirror
from engine.config import load_config
from engine.dist import DistContext
from engine.preflight import config_checks
from tests.conftest import stepped_model_and_optimizer, tiny_config

BUCKET = "strata-ckpt"
STEPS, EVERY = 11, 3  # checkpoints at 3, 6, 9 (no final one): the mirror keeps 6 and 9
CPU = DistContext(0, 1, 0, torch.device("cpu"))


def _restart_forkserver() -> None:
    """Forked ranks inherit the forkserver's environment: start a new one after changing it."""
    multiprocessing.forkserver._forkserver._stop()


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (random port) with one bucket; env set for the ranks."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    _restart_forkserver()
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _restart_forkserver()
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", []))


def _tree(corpus, run_dir, mirror: str) -> dict:
    return run_tree(corpus, run_dir, steps=STEPS, **{"checkpoint.every": EVERY, "checkpoint.keep_last": 3,
                    "checkpoint.save_final": False, "checkpoint.mirror": mirror, "checkpoint.mirror_keep_last": 2})  # fmt: skip


@pytest.fixture(scope="module")
def mirrored(s3, tiny_corpus, tmp_path_factory):
    """The uninterrupted 2-process run, mirrored to s3://BUCKET/run."""
    run_dir = tmp_path_factory.mktemp("mirrored") / "run"
    return run_ranks(2, run_dir, _tree(tiny_corpus, run_dir, f"s3://{BUCKET}/run"))


def test_bucket_holds_the_kept_complete_steps(s3, mirrored):
    keys = _keys(s3, "run/")
    steps = sorted({key.split("/")[0] for key in keys})
    assert steps == ["step_00000006", "step_00000009"], keys  # step 3 pruned (mirror_keep_last=2)
    for step in steps:
        local = mirrored / "checkpoints" / step
        assert sorted(k.split("/", 1)[1] for k in keys if k.startswith(step)) == sorted(
            str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "checkpoint mirror s3://strata-ckpt/run: 3 uploaded, 0 failed" in (mirrored / "rank0.log").read_text()


def test_fresh_machine_resumes_from_the_bucket(tiny_corpus, mirrored, tmp_path):
    run_dir = tmp_path / "fresh"  # nothing local: another node's empty disk
    run_ranks(1, run_dir, _tree(tiny_corpus, run_dir, f"s3://{BUCKET}/run"), resume=str(run_dir))
    log = (run_dir / "rank0.log").read_text()
    assert f"fetched checkpoint s3://{BUCKET}/run/step_00000009" in log, log
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000009'} at step 9" in log, log
    assert verify(run_dir / "checkpoints" / "step_00000009") is None
    got = losses(run_dir)
    assert sorted(got) == [10, 11]
    assert_close(got, losses(mirrored), [10, 11])


def test_incomplete_remote_steps_are_skipped_for_the_previous_one(s3, tiny_corpus, mirrored, tmp_path):
    for key in _keys(s3, "run/"):  # a copy of the mirror, then break it
        s3.copy_object(Bucket=BUCKET, Key=f"broken/{key}", CopySource={"Bucket": BUCKET, "Key": f"run/{key}"})
    for key in _keys(s3, "broken/step_00000009/"):  # step 12: uploaded all but its marker
        if key != MARKER:
            s3.copy_object(Bucket=BUCKET, Key=f"broken/step_00000012/{key}",
                           CopySource={"Bucket": BUCKET, "Key": f"broken/step_00000009/{key}"})  # fmt: skip
    shard = next(k for k in _keys(s3, "broken/step_00000009/") if k.endswith(".distcp"))
    body = s3.get_object(Bucket=BUCKET, Key=f"broken/step_00000009/{shard}")["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=f"broken/step_00000009/{shard}", Body=body[: len(body) // 2])  # step 9: truncated

    run_dir = tmp_path / "fresh"
    run_ranks(1, run_dir, _tree(tiny_corpus, run_dir, f"s3://{BUCKET}/broken"), resume=str(run_dir))
    log = (run_dir / "rank0.log").read_text()
    assert "skipping checkpoint s3://strata-ckpt/broken/step_00000009: file " in log and "as downloaded" in log, log
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000006'} at step 6" in log, log
    assert "step_00000012" not in log  # no marker: never a candidate
    assert not list(run_dir.glob("checkpoints/*.tmp"))  # the failed download left nothing behind
    got = losses(run_dir)
    assert_close(got, losses(mirrored), range(7, STEPS + 1))


def test_unreachable_mirror_fails_uploads_loudly_and_training_finishes(s3, tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"  # a bucket that does not exist: every upload fails
    run_ranks(1, run_dir, run_tree(tiny_corpus, run_dir, steps=3, **{"checkpoint.every": 2,
              "checkpoint.mirror": "s3://strata-no-such-bucket/run"}))  # fmt: skip
    log = (run_dir / "rank0.log").read_text()
    assert log.count("error: checkpoint mirror: uploading step_0000000") == 2, log
    assert "0 uploaded, 2 failed" in log
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000003", "step_00000002"]
    assert all(verify(p) is None for p in list_checkpoints(run_dir / "checkpoints"))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_path_mirror_round_trip_and_connection_refused(tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "nfs" / "mirror"
    saver = Checkpointer(tmp_path / "a", CPU, keep_last=1, mirror=str(mirror), mirror_keep_last=2)
    for step in (1, 2, 3):
        model, optimizer = stepped_model_and_optimizer(step)
        saver.save(step, model, optimizer, {"tokens_seen": step})
    saver.wait()
    assert sorted(p.name for p in mirror.iterdir()) == ["step_00000002", "step_00000003"]
    assert all(verify(p) is None for p in mirror.iterdir())

    # two nodes sharing a disk fetch the same step at once: one intact directory, no leftovers
    fetchers = [CheckpointMirror(str(mirror), 2, tmp_path / "b") for _ in range(2)]
    threads = [threading.Thread(target=f.fetch, args=(3, tmp_path / "b")) for f in fetchers]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["step_00000003"]

    fresh, fresh_optimizer = stepped_model_and_optimizer(9)
    loader = Checkpointer(tmp_path / "c", CPU, mirror=str(mirror))
    path, state = loader.load_latest(fresh, fresh_optimizer)
    assert path == tmp_path / "c" / "step_00000003" and state["tokens_seen"] == 3
    want, _ = stepped_model_and_optimizer(3)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), want.state_dict().values(), strict=True))

    # connection refused: retried, counted, reported; the local checkpoint is intact
    for key, value in {"S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(checkpoint_mirror, "RETRY_BACKOFF_S", 0.01)
    offline = Checkpointer(tmp_path / "d", CPU, mirror=f"s3://{BUCKET}/x")
    model, optimizer = stepped_model_and_optimizer(4)
    offline.save(4, model, optimizer, {"tokens_seen": 4})
    offline.wait()
    assert offline.mirror.failed_uploads == 1 and "Could not connect" in offline.mirror.last_error
    assert verify(tmp_path / "d" / "step_00000004") is None
    assert "0 uploaded, 1 failed" in capsys.readouterr().out


def test_doctor_checks_that_the_mirror_is_writable(s3, tiny_corpus, tmp_path):
    for mirror, status in ((f"s3://{BUCKET}/doctor", "ok"), ("s3://strata-no-such-bucket/x", "failure"),
                           (str(tmp_path / "nfs"), "ok"), ("hf://datasets/x", "failure")):  # fmt: skip
        cfg = load_config(tiny_config(tiny_corpus, tmp_path / "run", **{"checkpoint.mirror": mirror}))
        [check] = [c for c in config_checks(cfg, 1) if c.name == "checkpoint mirror"]
        assert check.status == status, check
        if mirror.startswith("hf://"):  # the URL is wrong: no credentials hint, no exception name
            assert check.detail.startswith("unsupported scheme hf://") and "credentials" not in check.hint
    assert _keys(s3, "doctor/") == [] and not (tmp_path / "nfs").exists()  # the probe is gone, and the dir it made
