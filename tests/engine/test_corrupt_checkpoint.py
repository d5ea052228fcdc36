"""Corrupt-checkpoint test: when the newest checkpoint is truncated, lacks its completion
marker, fails to load, or is a leftover temp directory of a crashed save, resume says so and
uses the previous checkpoint (here: one saved by FSDP2 x TP2, resumed on one process)."""

from __future__ import annotations

import os
import shutil

import pytest
from distributed_runs import assert_close, copy_run, losses, run_ranks, shared_run

from engine.checkpoint import MARKER, latest_checkpoint, verify


@pytest.fixture(scope="module")
def saved(tiny_corpus, tmp_path_factory):
    """The 4-process FSDP2 x TP2 run of the parity test (checkpoints at steps 10 and 20)."""
    return shared_run("fsdp2xtp2", tmp_path_factory, tiny_corpus, 4, steps=20,
                      **{"parallel.tp": 2, "checkpoint.every": 10})


def _truncate_biggest_shard(step_dir):
    shard = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    return f"file {shard.name} has"


def _remove_marker(step_dir):
    (step_dir / MARKER).unlink()
    return "no completion marker"


def _garble_metadata_same_size(step_dir):
    """Sizes still match the marker: only the load itself can tell."""
    metadata = step_dir / ".metadata"
    metadata.write_bytes(os.urandom(metadata.stat().st_size))
    return "loading failed"


@pytest.mark.parametrize("damage", [_truncate_biggest_shard, _remove_marker, _garble_metadata_same_size])
def test_resume_skips_a_broken_newest_checkpoint_and_says_so(damage, saved, tmp_path):
    run_dir = copy_run(saved, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step_00000020"
    reason = damage(newest)
    run_ranks(1, run_dir, resume=str(run_dir), overrides=["parallel.tp=1", "train.steps=11"])
    log = (run_dir / "rank0.log").read_text()
    assert f"warning: skipping checkpoint {newest}: {reason}" in log, log
    assert "using the previous one" in log
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000010'} at step 10" in log, log
    assert_close(losses(run_dir), losses(saved), [11])


def test_a_crashed_save_leaves_only_a_temp_dir_that_is_ignored_then_cleaned(saved, tmp_path):
    run_dir = copy_run(saved, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    # a save killed before its commit: files written, no marker, still under the temp name
    (checkpoints / "step_00000020").rename(checkpoints / "step_00000020.tmp")
    (checkpoints / "step_00000020.tmp" / MARKER).unlink()
    assert latest_checkpoint(checkpoints).name == "step_00000010"
    run_ranks(1, run_dir, resume=str(run_dir), overrides=["parallel.tp=1", "train.steps=11"])
    assert "skipping" not in (run_dir / "rank0.log").read_text()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000010", "step_00000011"]
    assert verify(checkpoints / "step_00000011") is None
    shutil.rmtree(run_dir)
