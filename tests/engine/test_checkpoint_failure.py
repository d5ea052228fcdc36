"""A checkpoint save that fails (a full disk, a lost mount) is not a crash: every rank raises
the same CheckpointSaveError, the partial files are removed, the checkpoints before it stay
intact, and the trainer reports it and goes on, stopping with exit 74 only after
checkpoint.max_failed_saves failures in a row. The end-to-end test fills a real (tmpfs) disk."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import yaml
from distributed_runs import run_tree

from engine import checkpoint as checkpoint_module
from engine.checkpoint import Checkpointer, CheckpointSaveError, latest_checkpoint, verify
from engine.dist import DistContext
from engine.report import read_metrics
from engine.signals import CHECKPOINT_FAILED_EXIT_CODE
from tests.conftest import on_small_disk, small_disk_supported, stepped_model_and_optimizer

REPO = Path(__file__).resolve().parents[2]
CPU = DistContext(0, 1, 0, torch.device("cpu"))


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _saves(tmp_path: Path, async_save: bool = False) -> tuple[Checkpointer, callable]:
    model, optimizer = stepped_model_and_optimizer(0)
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=3, async_save=async_save)
    return checkpointer, lambda step: checkpointer.save(step, model, optimizer, {"tokens_seen": step})


@pytest.mark.parametrize("where", ["dcp.save", "torch.save"])
def test_a_failed_save_removes_its_files_keeps_the_last_good_one_and_counts_in_a_row(tmp_path, monkeypatch, where):
    checkpointer, save = _saves(tmp_path)
    save(1)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.dcp if where == "dcp.save" else checkpoint_module.torch, "save", _disk_full)
        for step, in_a_row in ((2, 1), (3, 2)):
            with pytest.raises(CheckpointSaveError, match=f"checkpoint of step {step} failed: .*No space left on device") as err:
                save(step)
            assert err.value.step == step and checkpointer.failed_in_a_row == in_a_row
            assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no step_N.tmp left
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001" and verify(tmp_path / "step_00000001") is None
    save(4)  # space again: the next save commits and the count starts over
    assert checkpointer.failed_in_a_row == 0 and latest_checkpoint(tmp_path).name == "step_00000004"


def test_a_failed_save_whose_error_hides_a_full_disk_says_the_free_space(tmp_path, monkeypatch):
    checkpointer, save = _saves(tmp_path)

    def torch_save_on_a_full_disk(*args, **kwargs):  # torch's zip writer on ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint_module.torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(CheckpointSaveError, match=r"unexpected pos 704 vs 598 \([\d,.]+ MiB free on the disk of ") as err:
        save(1)
    assert str(tmp_path) in str(err.value)
    monkeypatch.setattr(checkpoint_module.torch, "save", _disk_full)
    with pytest.raises(CheckpointSaveError) as err:
        save(2)
    assert "No space left on device" in str(err.value) and "MiB free" not in str(err.value)


def test_a_failed_async_save_is_found_by_poll(tmp_path, monkeypatch):
    checkpointer, save = _saves(tmp_path, async_save=True)
    save(1)
    checkpointer.wait()
    failed = Future()
    failed.set_exception(OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setattr(checkpoint_module.dcp, "async_save", lambda *a, **k: failed)
    save(2)  # staged: the write fails in the background
    with pytest.raises(CheckpointSaveError, match="checkpoint of step 2 failed"):
        checkpointer.poll()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"] and checkpointer.failed_in_a_row == 1


def test_a_failed_rename_while_saving_a_step_again_keeps_the_old_copy(tmp_path, monkeypatch):
    checkpointer, save = _saves(tmp_path)
    save(5)
    before = json.loads((tmp_path / "step_00000005" / "COMPLETE").read_text())
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith("step_") and self.name.endswith(".tmp"):  # the commit's rename
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(CheckpointSaveError, match="Input/output error"):
        save(5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]
    assert verify(tmp_path / "step_00000005") is None
    assert json.loads((tmp_path / "step_00000005" / "COMPLETE").read_text()) == before


@pytest.mark.skipif(not small_disk_supported(), reason="needs unprivileged user + mount namespaces (unshare) for a small tmpfs")
def test_a_full_disk_under_two_ranks_is_reported_and_the_run_stops_cleanly_and_resumes(tiny_corpus, tmp_path):
    """A 3 MiB tmpfs holds the run directory: the step-2 checkpoint (~2.1 MB, two ranks) fits,
    the next ones do not. Saves at 4 and 6 fail with ENOSPC on the ranks, are reported, and the
    run stops at step 6 with exit 74 (max_failed_saves 2); the copy of the run directory taken
    before the tmpfs goes away resumes from step 2 and finishes."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    config = tmp_path / "config.yaml"
    overrides = {"checkpoint.every": 2, "checkpoint.keep_last": 1, "checkpoint.max_failed_saves": 2, "train.eval_batches": 2}
    config.write_text(yaml.safe_dump(run_tree(tiny_corpus, disk / "run", steps=12, **overrides)))
    script = '"$2" -m launch.cli train "$3" --nproc 2; code=$?\ncp -a "$1/run" "$4"; exit $code\n'
    done = on_small_disk(disk, "3m", script, sys.executable, str(config), str(kept))
    out = done.stdout + done.stderr
    assert done.returncode == CHECKPOINT_FAILED_EXIT_CODE, out
    assert "error: checkpoint of step 4 failed:" in out and "No space left on device" in out, out
    assert "stopping at step 6: 2 checkpoint saves in a row failed" in out, out
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["step_00000002"]  # partial files gone
    assert verify(kept / "checkpoints" / "step_00000002") is None
    events = [json.loads(line) for line in (kept / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    assert [(e["event"], e["saving_step"]) for e in events] == [("checkpoint_failed", 4), ("checkpoint_failed", 6)]
    assert json.loads((kept / "summary.json").read_text())["exit_code"] == CHECKPOINT_FAILED_EXIT_CODE

    # space again: the run picks up from its last good checkpoint
    resumed = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(kept / "config.yaml"), "--resume", str(kept),
                              "--set", f"train.run_dir={kept}"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 2 (" in resumed.stdout and "run finished at step 12" in resumed.stdout, resumed.stdout
    assert [r["step"] for r in read_metrics(kept).records][-1] == 12
